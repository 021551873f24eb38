"""The embedded default end to end: `llmexp` with no arguments learns, compresses, evaluates and reports."""

from __future__ import annotations

import pytest

from .conftest import read_results, run_llmexp


@pytest.mark.slow
def test_default_run_learns_the_embedded_world_then_compresses_it(tmp_path):
    result = run_llmexp("hydra.run.dir=run", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_results(tmp_path / "run")
    assert record["status"] == "completed"
    stages = record["stages"]
    train = stages["baseline"]["metrics"]
    scores = stages["baseline_eval"]["metrics"]
    assert train["steps"] == 1000 and train["final_loss"] < 1.0
    assert scores["mc_cloze_acc"] > 0.6  # chance is 0.25 on 150 questions
    assert 1.0 < scores["perplexity"] < 3.0
    assert 0.0 <= scores["mc_letter_acc"] <= 1.0 and 0.0 <= scores["word_problem_em"] <= 1.0
    assert (tmp_path / "run/baseline/model/model.safetensors").exists()
    assert stages["baseline"]["model_stats"]["parameters"] == 1_607_808
    fp8 = stages["fp8_eval"]["metrics"]
    assert abs(fp8["perplexity_rel_delta"]) < 0.005 and fp8["flip_rate_multiple_choice"] <= 0.02
    pruned, distilled = stages["prune_eval"]["metrics"], stages["distill_eval"]["metrics"]
    assert stages["prune"]["model_stats"]["layers"] == 6
    assert distilled["kl_to_baseline"] < pruned["kl_to_baseline"]  # distillation moves it back toward its teacher
    assert stages["width_prune"]["model_stats"]["parameters"] < 1_607_808
    assert (tmp_path / "run/comparison.md").exists() and (tmp_path / "run/pareto.png").exists()
    assert "run directory:" in result.stdout and "Comparison" in result.stdout


@pytest.mark.slow
def test_same_seed_same_numbers(tmp_path):
    args = ["technique.max_steps=40", "evaluation.limit=24"]
    first = run_llmexp(*args, "hydra.run.dir=a", cwd=tmp_path)
    second = run_llmexp(*args, "hydra.run.dir=b", cwd=tmp_path)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    a, b = read_results(tmp_path / "a"), read_results(tmp_path / "b")
    measured = ("time", "per_s", "memory")  # of the machine, not of the training

    def outcome(results, stage):
        return {k: v for k, v in results["stages"][stage]["metrics"].items() if not any(m in k for m in measured)}

    for stage in ("pretrain", "evaluate"):
        assert outcome(a, stage) == outcome(b, stage)
    other = run_llmexp(*args, "seed=1", "hydra.run.dir=c", cwd=tmp_path)
    assert read_results(tmp_path / "c")["stages"]["pretrain"]["metrics"]["final_loss"] != a["stages"]["pretrain"]["metrics"]["final_loss"]
    assert other.returncode == 0
