"""``llmexp report``: a real multirun's jobs in one table, deltas against a baseline, the points that did not run."""

import csv
import json
import shutil

import pytest

from llmexp.errors import UserError
from llmexp.report_command import accuracy_metrics, baseline_row, swept_keys
from tests.conftest import run_llmexp

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tiny_checkpoint, tmp_path_factory):
    """A real Hydra multirun of evaluations over three limits, one of them infeasible (skipped)."""
    root = tmp_path_factory.mktemp("report")
    result = run_llmexp(
        "-m", "technique=evaluate", f"model.path={tiny_checkpoint}", "technique.tasks=[multiple_choice,throughput]",
        "technique.limit=8,4,0", f"hydra.sweep.dir={root / 'sweep'}", cwd=root, env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "sweep"


def _results(job_dir):
    return json.loads((job_dir / "results.json").read_text())


def test_report_tables_every_job_with_deltas_and_lists_the_skipped_one(sweep, tmp_path):
    out = tmp_path / "report"
    result = run_llmexp("report", str(sweep), "--baseline", "technique.limit=8", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with open(out / "report.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["technique.limit"] for row in rows] == ["4", "8"]  # grouped (sorted) by the swept key
    by_limit = {row["technique.limit"]: row for row in rows}
    jobs = {_results(sweep / job)["config"]["technique"]["limit"]: _results(sweep / job) for job in ("0", "1")}
    for limit, row in by_limit.items():
        metrics = jobs[int(limit)]["stages"]["evaluate"]["metrics"]
        assert float(row["mc_letter_acc"]) == pytest.approx(metrics["mc_letter_acc"])
        baseline = jobs[8]["stages"]["evaluate"]["metrics"]
        assert float(row["mc_letter_acc_vs_baseline"]) == pytest.approx(metrics["mc_letter_acc"] - baseline["mc_letter_acc"])
    assert float(by_limit["8"]["tokens_per_s_vs_baseline"]) == 0.0
    markdown = (out / "report.md").read_text()
    assert "## Not completed" in markdown and "| skipped | technique.limit=0 must be at least 1. |" in markdown
    assert "against **technique.limit=8" in markdown
    assert (out / "pareto_throughput.png").read_bytes()[:8] == PNG
    assert not (out / "pareto_size.png").exists()  # no row has a size: nothing to plot
    assert "skipped" in result.stderr and "technique.limit=0" in result.stderr


def test_a_job_that_died_before_writing_results_is_listed_as_failed(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    (copy / "1" / "results.json").unlink()
    result = run_llmexp("report", str(copy), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    markdown = (copy / "report.md").read_text()
    assert f"| {copy / '1'} | failed | no results.json: the job ended before writing it |" in markdown


def test_bad_input_exits_2_and_writes_nothing(sweep, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_llmexp("report", str(empty), cwd=tmp_path)
    assert result.returncode == 2 and "no results.json under" in result.stderr
    assert list(empty.iterdir()) == []
    out = tmp_path / "out"
    result = run_llmexp("report", str(sweep), "--baseline", "technique.limit=5", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2 and "matches 0 rows, not one" in result.stderr and not out.exists()
    result = run_llmexp("report", str(tmp_path / "absent"), cwd=tmp_path)
    assert result.returncode == 2 and "is not a directory" in result.stderr


def test_swept_keys_are_those_whose_values_differ():
    runs = [{"a": "1", "b": "x"}, {"a": "2", "b": "x"}, {"a": "3", "b": "x", "c": "y"}]
    assert swept_keys(runs) == ["a", "c"]
    assert swept_keys([{"a": "1"}]) == []


def test_baseline_must_match_one_row():
    rows = [{"stage": "s", "k": "1", "label": "k=1 s"}, {"stage": "s", "k": "2", "label": "k=2 s"}]
    assert baseline_row(rows, "k=2")["k"] == "2"
    with pytest.raises(UserError, match="matches 2 rows, not one.*k=1 s; k=2 s"):
        baseline_row(rows, "stage=s")
    with pytest.raises(UserError, match="'k' is not key=value"):
        baseline_row(rows, "k")


def test_accuracies_are_the_embedded_ones_then_the_described_tasks():
    rows = [{"mmlu_acc": 0.5, "mc_cloze_acc": 1.0, "gsm_exact_match_strict-match": 0.1, "mmlu_acc_delta": 0.0,
             "code_pass_at_1": 0.2, "tokens_per_s": 3.0, "perplexity": 9.0}]
    assert accuracy_metrics(rows) == ["mc_cloze_acc", "mmlu_acc", "gsm_exact_match_strict-match", "code_pass_at_1"]
