"""What a person sees is what was given: user text through the console and its tables is never rich markup."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from rich.console import Console

from llmexp.configuration.compose import compose_config
from llmexp.display import console
from llmexp.results import columns, report, summary
from llmexp.results.record import comparison

from .conftest import run_llmexp

# Brackets a path or list override carries, rich tags open and closing, an emoji code, quotes, '=', spaces, non-ASCII.
USER_TEXT = [
    "model.path=/data/run[3]", "evaluation.tasks=[perplexity]", "[bold]not bold[/bold]", "[/]", "[red]",
    ":smile:", "tracker.project='a \"quoted\" x=y'", "naïve café 日本", "[link=https://x]y[/link]",
]


@pytest.mark.parametrize("text", USER_TEXT)
def test_warnings_errors_and_banners_print_user_text_literally(capsys, text):
    console.warn(f"w {text}")
    console.error(f"e {text}")
    console.stage_banner(f"s {text}")
    err = capsys.readouterr().err
    assert f"w {text}" in err and f"error: e {text}" in err and f"s {text}" in err


def test_a_results_table_and_a_jobs_table_show_their_cells_literally(capsys, tmp_path):
    from llmexp.launchers.sweep_jobs import SweepJob, finish

    record = {
        "stages": {"[bold]stage[/]": {"metrics": {"tasks=[perplexity]": 1.0, ":smile:": 2.0}}},
        "model_stats": {}, "wall_time_s": 1.0, "run_dir": str(tmp_path / "run[3]"),
    }
    summary.print_results(record)
    jobs = [SweepJob(0, USER_TEXT[:3], str(tmp_path / "0"), status="completed"),
            SweepJob(1, USER_TEXT[3:], str(tmp_path / "1"), status="failed", reason="ValueError: [/] at [3]")]
    assert finish(tmp_path, jobs) == 1
    out = capsys.readouterr().out
    for text in ["[bold]stage[/]", "tasks=[perplexity]", ":smile:", str(tmp_path / "run[3]"), "ValueError: [/] at [3]"]:
        assert text in out, text
    flat = " ".join(out.split())  # the overrides column folds long cells
    for text in USER_TEXT:
        assert all(word in flat for word in text.split()), text
    assert [job["overrides"] for job in json.loads((tmp_path / "jobs.json").read_text())] == [USER_TEXT[:3], USER_TEXT[3:]]


def test_a_bad_override_with_brackets_is_quoted_back_literally(tmp_path):
    done = run_llmexp("model.path='/no/such/run[3] [bold]x[/bold]'", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "/no/such/run[3] [bold]x[/bold]" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())


# The stages of `llmexp` with no arguments (2026-12-06, the README's table), as its results.json holds them.
DEFAULT_RUN = json.loads((Path(__file__).parent / "fixtures/default_run_results.json").read_text())
# What its stages declare they report, asked with the default config that ran them.
DECLARED = columns.declared_metrics({"config": OmegaConf.to_container(compose_config([]), resolve=True), **DEFAULT_RUN})
DEFAULT_STAGES = ["baseline_eval", "fp8_eval", "prune_eval", "distill_eval", "distill_fp8_eval", "width_prune_eval",
                  "width_distill_eval"]


def _render(width: int, show) -> str:
    screen = Console(width=width, file=io.StringIO(), markup=False, emoji=False)
    show(screen)
    return screen.file.getvalue()


def _header(text: str) -> list:
    line = next(line for line in text.splitlines() if line.startswith("┃"))
    return [cell.strip() for cell in line.strip("┃").split("┃")]


@pytest.mark.parametrize("width, shown", [
    (80, ["stage", "mc_cloze_acc", "word_problem_em", "perplexity", "size_mb"]),
    (120, ["stage", "precision", "parameters", "mc_cloze_acc", "word_problem_em", "perplexity", "kl_to_baseline",
           "size_mb"]),
    (160, ["stage", "made_by", "precision", "layers", "parameters", "mc_cloze_acc", "word_problem_em", "perplexity",
           "kl_to_baseline", "size_mb", "tokens_per_s"]),
    (250, ["stage", "made_by", "precision", "layers", "parameters", "mc_cloze_acc", "word_problem_em", "perplexity",
           "kl_to_baseline", "flip_rate_multiple_choice", "size_mb", "tokens_per_s", "train_time_s"]),
])
def test_the_comparison_keeps_whole_columns_that_fit_and_names_those_left_out(width, shown):
    rows = comparison(DEFAULT_RUN["stages"])
    text = _render(width, lambda screen: summary.print_comparison(rows, DECLARED, screen))
    table = [line for line in text.splitlines() if not line.startswith("not shown")]
    assert "…" not in text and max(len(line) for line in table) <= width
    assert _header(text) == shown
    body = [line for line in text.splitlines() if line.startswith("│")]
    assert [line.strip("│").split("│")[0].strip() for line in body] == DEFAULT_STAGES  # every name whole
    sizes = {line.split("│")[1].strip(): line.split("│")[shown.index("size_mb") + 1].strip() for line in body}
    assert sizes["baseline_eval"] == "6.439" and sizes["fp8_eval"] == "1.733"  # bytes_on_disk / 10^6
    candidates = columns.present(report.report_rows(rows), columns.columns_of(report.report_rows(rows), DECLARED).console())
    left_out = [column for column in candidates if column not in shown]
    notes = [line for line in text.splitlines() if line.startswith("not shown")]
    if left_out:
        assert notes == [f"not shown in {width} columns: {', '.join(left_out)}; comparison.md and comparison.csv "
                         "have every column"]
    else:
        assert notes == []


def test_the_results_table_folds_long_metric_names_rather_than_cutting_anything():
    text = _render(50, lambda screen: summary.print_results(dict(DEFAULT_RUN, comparison=[]), screen))
    assert "…" not in text
    stages, metrics = [], []
    for line in (line for line in text.splitlines() if line.startswith("│")):
        stage, metric, value = (cell.strip() for cell in line.strip("│").split("│"))
        if value:  # a row of its own; a blank value is the rest of the metric name above
            stages.append(stage)
            metrics.append(metric)
        else:
            metrics[-1] += metric
    expected = [(name, metric) for name, stage in DEFAULT_RUN["stages"].items() for metric in stage["metrics"]
                if not metric.endswith(columns.PAIRED_SUFFIXES)]
    assert metrics == [metric for _, metric in expected]
    assert [stage for stage in stages if stage] == list(DEFAULT_RUN["stages"])
