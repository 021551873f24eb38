"""``llmexp report``: a real multirun's jobs in one table, deltas against a baseline, the points that did not run."""

import csv
import json
import shutil
from pathlib import Path

import pytest

from llmexp.errors import UserError
from llmexp.cli.report import accuracy_metrics, baseline_row, run_names, swept_keys
from llmexp.sdk import Metric, MetricKind
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
    assert "against **0 technique.limit=8 evaluate**" in markdown  # the run (job 0), its swept value, its stage
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


def test_accuracies_are_the_declared_qualities_the_rows_carry_in_declared_order():
    rows = [{"mmlu_acc": 0.5, "mc_cloze_acc": 1.0, "gsm_exact_match_strict-match": 0.1, "mmlu_acc_delta": 0.0,
             "code_pass_at_1": 0.2, "tokens_per_s": 3.0, "perplexity": 9.0}]
    quality, info, cost = MetricKind.QUALITY, MetricKind.INFO, MetricKind.COST
    declared = [Metric(name, higher, name, kind) for name, higher, kind in (
        ("mc_cloze_acc", True, quality), ("word_problem_em", True, quality), ("mmlu_acc", True, quality),
        ("mmlu_acc_delta", True, info), ("gsm_exact_match_strict-match", True, quality), ("perplexity", False, info),
        ("code_pass_at_1", True, quality), ("tokens_per_s", True, cost))]
    assert accuracy_metrics(rows, declared) == ["mc_cloze_acc", "mmlu_acc", "gsm_exact_match_strict-match", "code_pass_at_1"]


COMPRESS_EVALS = ["baseline_eval", "fp8_eval", "prune_eval", "distill_eval", "distill_fp8_eval", "width_prune_eval",
                  "width_distill_eval"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two real runs of one day: the default compress pipeline and one technique (pipeline=technique_then_evaluation), both tiny."""
    root = tmp_path_factory.mktemp("runs")
    day = root / "outputs" / "2026-12-06"
    compress = run_llmexp(
        "pipeline.nodes.baseline.max_steps=3", "pipeline.nodes.distill.max_steps=2",
        "pipeline.nodes.width_distill.max_steps=2",
        *[f"pipeline.nodes.{key}.calibration_size=8" for key in ("prune", "width_prune", "fp8", "distill_fp8")],
        *[f"pipeline.nodes.{key}.limit=6" for key in COMPRESS_EVALS],
        f"hydra.run.dir={day / '10-00-00'}", cwd=root, env={"OMP_NUM_THREADS": "1"},
    )
    assert compress.returncode == 0, compress.stderr[-3000:]
    single = run_llmexp("technique.max_steps=3", "evaluation.limit=6", f"hydra.run.dir={day / '11-00-00'}", cwd=root,
                        env={"OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    return day


@pytest.mark.slow
def test_every_row_names_its_run_pipeline_and_technique(two_runs, tmp_path):
    out = tmp_path / "report"
    result = run_llmexp("report", str(two_runs / "10-00-00"), str(two_runs / "11-00-00"), "--out", str(out),
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with open(out / "report.csv", newline="") as handle:
        rows = [{key: row[key] for key in ("run", "pipeline", "technique", "stage", "run_dir")}
                for row in csv.DictReader(handle)]
    compress_run, single_run = str(two_runs / "10-00-00"), str(two_runs / "11-00-00")
    makers = ["pretrain", "quantize", "prune", "distill", "quantize", "prune", "distill"]
    assert rows == [
        *({"run": "10-00-00", "pipeline": "compress", "technique": maker, "stage": stage, "run_dir": compress_run}
          for maker, stage in zip(makers, COMPRESS_EVALS)),
        {"run": "11-00-00", "pipeline": "technique_then_evaluation", "technique": "pretrain", "stage": "evaluate", "run_dir": single_run},
    ]
    printed = [[cell.strip() for cell in line.strip("│").split("│")] for line in result.stdout.splitlines()
               if line.startswith("│")]
    header = next(line for line in result.stdout.splitlines() if line.startswith("┃"))
    columns = [cell.strip() for cell in header.strip("┃").split("┃")]
    assert [[cells[columns.index(key)] for key in ("run", "pipeline", "technique", "stage")] for cells in printed] == [
        [row["run"], row["pipeline"], row["technique"], row["stage"]] for row in rows
    ]
    assert "…" not in result.stdout
    # A row of either run is the baseline by its run's name.
    result = run_llmexp("report", str(two_runs), "--baseline", "run=11-00-00", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "against **11-00-00 " in (out / "report.md").read_text()


def test_runs_are_named_by_their_path_below_the_folder_they_share():
    assert run_names([Path("out/2026-12-06/10-00-00"), Path("out/2026-12-06/11-00-00")]) == {
        "out/2026-12-06/10-00-00": "10-00-00", "out/2026-12-06/11-00-00": "11-00-00"}
    assert run_names([Path("multirun/a/0"), Path("multirun/a/1"), Path("multirun/b/0")]) == {
        "multirun/a/0": "a/0", "multirun/a/1": "a/1", "multirun/b/0": "b/0"}
    assert run_names([Path("out/run")]) == {"out/run": "run"}
    # A copy of a results.json inside a run (a tracker's mirror) is named below the run, never "."
    assert run_names([Path("o/run"), Path("o/run/wandb/files")]) == {"o/run": "run", "o/run/wandb/files": "run/wandb/files"}
