"""The comparison table and Pareto plots a run with several evaluations writes."""

import csv

import pytest

from llmexp.configuration.compose import compose_config
from llmexp.results.columns import columns_of
from llmexp.results.report import markdown_table, pareto_front, report_rows, table_columns, write_report
from llmexp.techniques.plugin_manager import technique

ROWS = [
    {"stage": "baseline_eval", "made_by": "pretrain", "precision": "fp32", "layers": 8, "parameters": 1000,
     "bytes_on_disk": 4000, "mc_cloze_acc": 1.0, "word_problem_em": 0.30, "tokens_per_s": 100.0},
    {"stage": "fp8_eval", "made_by": "quantize", "precision": "fp8", "simulated": True, "layers": 8, "parameters": 1000,
     "bytes_on_disk": 1500, "mc_cloze_acc": 1.0, "word_problem_em": 0.28, "tokens_per_s": 60.0},
    {"stage": "prune_eval", "made_by": "prune", "precision": "fp32", "layers": 6, "parameters": 750,
     "bytes_on_disk": 3000, "mc_cloze_acc": 0.9, "word_problem_em": 0.10, "tokens_per_s": 130.0},
    {"stage": "worse", "made_by": "prune", "precision": "fp32", "layers": 6, "parameters": 750,
     "bytes_on_disk": 3000, "mc_cloze_acc": 0.5, "word_problem_em": 0.05, "tokens_per_s": 90.0},
]
# What the evaluations of those rows declare they report: the evaluate technique's, for their tasks.
_CONFIG = compose_config(["technique=evaluate", "technique.tasks=[multiple_choice,word_problems,throughput]"])
DECLARED = {row["stage"]: technique("evaluate").metrics(_CONFIG, _CONFIG.technique) for row in ROWS}


def test_size_is_relative_to_the_first_row_and_absent_columns_are_left_out():
    rows = report_rows(ROWS)
    assert [row["size_pct"] for row in rows] == [100.0, 37.5, 75.0, 75.0]
    assert [row["size_mb"] for row in rows] == [0.004, 0.0015, 0.003, 0.003]  # bytes on disk / 10^6
    columns = table_columns(rows, DECLARED)
    assert columns[:6] == ["stage", "made_by", "precision", "simulated", "layers", "parameters"]
    assert "gsm8k_em" not in columns and {"size_mb", "size_pct"} <= set(columns)
    table = markdown_table(rows, columns)
    assert table.splitlines()[3].startswith("| fp8_eval | quantize | fp8 | yes | 8 | 1,000 |")


def test_the_pareto_front_keeps_only_points_no_other_beats_on_both_axes():
    points = [(row["tokens_per_s"], row["mc_cloze_acc"]) for row in ROWS]
    # faster is better: baseline (100, 1.0) beats fp8 (60, 1.0) and worse (90, 0.5); prune (130, 0.9) is the fastest
    assert pareto_front(points, higher_cost_is_better=True) == [0, 2]
    sizes = [(pct, acc) for pct, (_, acc) in zip([100.0, 37.5, 75.0, 75.0], points)]
    assert pareto_front(sizes, higher_cost_is_better=False) == [1]  # smallest and as accurate as any


def test_write_report_writes_the_table_csv_and_a_png(tmp_path):
    written = write_report(tmp_path, ROWS, DECLARED)
    assert set(written) == {"table", "csv", "plot"}
    with open(written["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["stage"] for row in rows] == ["baseline_eval", "fp8_eval", "prune_eval", "worse"]
    assert float(rows[1]["size_pct"]) == pytest.approx(37.5)
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_no_plot_without_two_comparable_points(tmp_path):
    written = write_report(tmp_path, [dict(ROWS[0]), {"stage": "x", "made_by": "y"}], DECLARED)
    assert "plot" not in written and not (tmp_path / "pareto.png").exists()


def test_every_point_is_labelled_with_its_row(monkeypatch):
    from matplotlib.axes import Axes

    from llmexp.results.report import pareto_png

    texts = []
    annotate = Axes.annotate
    monkeypatch.setattr(Axes, "annotate", lambda self, text, *a, **k: texts.append(text) or annotate(self, text, *a, **k))
    rows = [dict(row, label=f"point {i}") for i, row in enumerate(report_rows(ROWS))]
    declared = columns_of(rows, DECLARED)
    assert pareto_png(rows, declared.qualities(rows), declared.costs(rows), label="label")[:8] == b"\x89PNG\r\n\x1a\n"
    # two accuracies x two cost axes, each panel labelling the four points
    assert sorted(texts) == sorted([f"point {i}" for i in range(4)] * 4)
