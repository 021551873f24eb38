"""The compress pipeline end to end on a checkpoint, and which pipeline a command line means."""

from __future__ import annotations

import pytest

from llmexp.configuration.compose import compose_config, with_implied_pipeline

from .conftest import read_results, run_llmexp

EVALS = ["baseline_eval", "fp8_eval", "prune_eval", "distill_eval", "distill_fp8_eval", "width_prune_eval",
         "width_distill_eval"]


@pytest.mark.parametrize(
    "overrides, pipeline",
    [
        ([], "compress"),
        (["seed=1", "hydra.run.dir=x"], "compress"),
        (["technique=lora"], "technique_then_evaluation"),
        (["technique.max_steps=5"], "technique_then_evaluation"),
        (["evaluation.limit=5"], "technique_then_evaluation"),
        (["technique=sft", "pipeline=technique_only"], "technique_only"),
        (["pipeline=customize", "pipeline.nodes.lora.rank=4"], "customize"),
    ],
)
def test_choosing_a_technique_means_that_technique_not_the_whole_workflow(overrides, pipeline):
    assert compose_config(overrides).pipeline.name == pipeline
    assert (with_implied_pipeline(overrides) != overrides) == (pipeline == "technique_then_evaluation")


def test_a_comparison_the_baseline_evaluation_cannot_support_stops_before_anything_runs(tmp_path):
    """Not minutes later, after training: the plan sees that fp8_eval's task has no baseline rows to pair with."""
    result = run_llmexp("pipeline=compress", "pipeline.nodes.baseline_eval.tasks=[perplexity]",
                        "pipeline.nodes.fp8_eval.tasks=[multiple_choice]", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert ("pipeline.nodes.fp8_eval runs task(s) multiple_choice, which pipeline.nodes.baseline_eval does not"
            in result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_compress_pipeline_takes_a_checkpoint_as_its_baseline(tmp_path, tiny_checkpoint):
    result = run_llmexp(
        "pipeline=compress",
        f"model.path={tiny_checkpoint}",
        "pipeline.nodes.baseline.max_steps=0",
        "pipeline.nodes.distill.max_steps=3",
        "pipeline.nodes.width_distill.max_steps=3",
        "pipeline.nodes.prune.calibration_size=8",
        "pipeline.nodes.width_prune.calibration_size=8",
        "pipeline.nodes.fp8.calibration_size=8",
        "pipeline.nodes.distill_fp8.calibration_size=8",
        *[f"pipeline.nodes.{key}.limit=6" for key in EVALS],
        "hydra.run.dir=run",
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_results(tmp_path / "run")
    stages = record["stages"]
    assert record["status"] == "completed"
    assert stages["baseline"]["artifacts"]["model"] == str(tiny_checkpoint)  # pointed at, not copied
    assert not (tmp_path / "run/baseline/model").exists()
    assert stages["fp8"]["model_stats"]["precision"] == "fp8" and stages["fp8"]["model_stats"]["simulated"] is True
    assert stages["prune"]["model_stats"]["layers"] == 1  # a quarter of 2 layers, rounded up
    assert stages["width_prune"]["metrics"]["ffn_hidden_size"] == 256
    assert stages["distill"]["metrics"]["steps"] == 3 and stages["width_distill"]["metrics"]["steps"] == 3
    assert "kl_to_baseline" not in stages["baseline_eval"]["metrics"]
    fp8, pruned = stages["fp8_eval"]["metrics"], stages["prune_eval"]["metrics"]
    assert 0 < fp8["kl_to_baseline"] < pruned["kl_to_baseline"]  # FP8 moves the model less than dropping a layer
    assert {"flip_rate_multiple_choice", "mc_cloze_acc_delta_se", "perplexity_rel_delta"} <= set(fp8)
    rows = record["comparison"]
    assert [row["stage"] for row in rows] == EVALS
    assert rows[1]["made_by"] == "quantize" and rows[2]["layers"] == 1
    table = (tmp_path / "run/comparison.md").read_text()
    assert table.count("\n") == 2 + len(EVALS) and "| fp8_eval | quantize | fp8 | yes |" in table
    assert (tmp_path / "run/pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "Comparison" in result.stdout
