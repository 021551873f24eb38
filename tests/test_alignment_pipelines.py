"""``pipeline=grpo_word_problems`` and ``pipeline=align`` end to end at toy scale: each stage starts from the model
it should, reads what it should, and each comparison with a baseline evaluation is made item by item."""

from __future__ import annotations

import math

import pytest

from tests.conftest import read_results, run_llmexp

# a baseline of 12 steps, cached in the test's own directory; small steps, groups and evaluations
TINY = ["model.baseline.max_steps=12", "model.baseline.warmup_steps=2", "parallelism.global_batch=4",
        "parallelism.micro_batch=2", "data.seq_len=48"]


def run(tmp_path, *args):
    result = run_llmexp(*TINY, *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                        env={"LLMEXP_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (baseline,) = [path for path in (tmp_path / "cache" / "baselines").iterdir() if path.is_dir()]
    return read_results(tmp_path / "run"), baseline / "model"


@pytest.mark.slow
def test_grpo_and_its_sft_control_start_from_the_baseline_and_are_compared_with_it(tmp_path):
    record, baseline = run(tmp_path, "pipeline=grpo_word_problems", "data.problems=100",
                           "pipeline.nodes.grpo.max_steps=3", "pipeline.nodes.grpo.group_size=2",
                           "pipeline.nodes.grpo.max_completion_tokens=12", "pipeline.nodes.baseline_eval.limit=12")
    stages = record["stages"]
    assert list(stages) == ["baseline_eval", "grpo", "grpo_eval", "sft", "sft_eval"]
    # the baseline evaluation scores the embedded baseline; GRPO and the control both adapt it
    assert {stages[key]["input_model"] for key in ("baseline_eval", "grpo", "sft")} == {str(baseline)}
    assert stages["sft"]["metrics"]["steps"] == stages["grpo"]["metrics"]["steps"] == 3
    for key in ("grpo_eval", "sft_eval"):
        metrics = stages[key]["metrics"]
        assert metrics["word_problems_n"] == 12
        gained, lost = metrics["word_problem_em_gained"], metrics["word_problem_em_lost"]
        assert metrics["word_problem_em_delta"] == pytest.approx((gained - lost) / 12)
        assert 0 < metrics["word_problem_em_mcnemar_p"] <= 1
        assert math.isfinite(metrics["kl_to_baseline"]) and metrics["kl_to_baseline"] >= 0
    rows = {row["stage"]: row for row in record["comparison"]}
    assert rows["grpo_eval"]["made_by"] == "grpo" and rows["sft_eval"]["made_by"] == "sft"


@pytest.mark.slow
def test_align_rewards_grpo_with_the_reward_model_trained_after_sft(tmp_path):
    record, baseline = run(tmp_path, "pipeline=align", "pipeline.nodes.sft.max_steps=4",
                           "pipeline.nodes.dpo.max_steps=2", "pipeline.nodes.reward.max_steps=2",
                           "pipeline.nodes.reward.val_every=0", "pipeline.nodes.grpo.max_steps=2",
                           "pipeline.nodes.grpo.group_size=2", "pipeline.nodes.grpo.max_completion_tokens=12",
                           "pipeline.nodes.sft_eval.limit=6")
    stages = record["stages"]
    assert list(stages) == ["sft", "sft_eval", "dpo", "dpo_eval", "reward", "grpo", "grpo_eval"]
    assert stages["sft"]["input_model"] == str(baseline)
    assert stages["dpo"]["input_model"] == stages["reward"]["input_model"] == stages["grpo"]["input_model"] == "sft"
    assert 0 <= stages["reward"]["metrics"]["pairwise_accuracy"] <= 1
    # GRPO was rewarded by the reward model alone: its logged reward is that model's score
    assert stages["grpo"]["metrics"]["reward_mean"] == pytest.approx(stages["grpo"]["metrics"]["reward_reward_model"])
    for key in ("dpo_eval", "grpo_eval"):
        metrics = stages[key]["metrics"]
        assert metrics["text2sql_n"] == 6 and 0 < metrics["text2sql_em_mcnemar_p"] <= 1
