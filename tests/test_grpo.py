"""technique=grpo: its rewards, its plan's refusals, and short real runs through the ``llmexp`` command."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional

import pytest

from llmexp.errors import UserError
from llmexp.plugins.grpo.rewards import Rewards, RewardModelScore, exact_match, format_reward, user_function
from llmexp.plugins.grpo.rollouts import request_seed
from tests.conftest import read_results, run_llmexp

# a random 2-layer model rarely writes "####": a reward every completion spreads over makes the groups differ
USER_REWARDS = textwrap.dedent("""
    def distinct_words(prompts, completions, answers):
        return [len(set(completion.split())) / 10 for completion in completions]

    def digit_share(prompts, completions, answers):
        return [sum(word.isdigit() for word in c.split()) / max(len(c.split()), 1) for c in completions]
""")
WORD_PROBLEMS = ["data=word_problems", "data.problems=200"]
SHORT = ["pipeline=technique_only", "technique.group_size=4",
         "technique.max_completion_tokens=12", "parallelism.global_batch=4", "parallelism.micro_batch=2",
         "technique.lr=0.01", "technique.warmup_steps=0"]
LOGGED = ("reward_mean", "reward_std", "zero_advantage_groups", "kl", "completion_length", "clip_fraction")


def test_exact_match_and_format_read_the_strict_answer():
    completions = ["6 + 9 = 15 . 15 - 5 = 10 . #### 10", "#### 11", "the answer is 10", "####10 then #### 12",
                   "#### $1,000"]
    answers = [10, 10, 10, 10, 1000]
    assert exact_match([""] * 5, completions, answers) == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert format_reward([""] * 5, completions, answers) == [1.0, 1.0, 0.0, 1.0, 1.0]


def test_rewards_are_summed_with_their_weights_and_each_is_kept():
    rewards = Rewards(["exact_match", "format"], [exact_match, format_reward], [2.0, 0.5])
    per_function, totals = rewards(["q", "q"], ["#### 3", "#### 4"], [3, 3])
    assert per_function == [[1.0, 1.0], [0.0, 1.0]]
    assert totals == [2.5, 0.5]
    short = Rewards(["short"], [lambda prompts, completions, answers: [1.0]], [1.0])
    with pytest.raises(UserError, match="returned 1 values for 2 completions"):
        short(["q", "q"], ["a", "b"], [None, None])


def test_a_users_reward_is_imported_by_its_module_and_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    function = user_function("my_rewards:distinct_words", "technique.rewards")
    assert function(["q"], ["a b a c"], [None]) == [0.3]
    with pytest.raises(UserError, match="technique.rewards names 'my_rewards:missing'"):
        user_function("my_rewards:missing", "technique.rewards")
    with pytest.raises(UserError, match="module 'no_such_module' does not import"):
        user_function("no_such_module:f", "technique.rewards")


def test_sampling_seeds_depend_on_the_position_alone():
    seeds = {request_seed(0, g, p, m) for g in range(3) for p in range(4) for m in range(4)}
    assert len(seeds) == 48 and all(0 <= seed < 2**63 for seed in seeds)
    assert request_seed(0, 1, 2, 3) == request_seed(0, 1, 2, 3) != request_seed(1, 1, 2, 3)


def refusal(tmp_path: Path, *args: str) -> str:
    """What ``llmexp plan technique=grpo <args>`` says when it refuses (exit 2), on one line; "" when it plans."""
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    result = run_llmexp("plan", "technique=grpo", *args, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode in (0, 2), result.stderr[-2000:]
    return " ".join((result.stdout + result.stderr).split()) if result.returncode == 2 else ""


@pytest.mark.parametrize("args,fragment", [
    (["technique.group_size=1"], "technique.group_size=1: a group needs at least 2 completions"),
    (["technique.epsilon=0"], "technique.epsilon=0.0: the clipping range must be positive"),
    (["technique.temperature=0"], "technique.temperature=0.0: GRPO samples its groups"),
    (["technique.loss_type=ppo"], "technique.loss_type=ppo is not one of grpo, dr_grpo, dapo"),
    (["technique.rewards=[exact_match,nice]"], "technique.rewards names 'nice', which is no reward"),
    (["technique.rewards=[reward_model]"], "technique.rewards has reward_model and technique.reward_model is not set"),
    (["technique.rewards=[reward_model]", "technique.reward_model=/no/such/dir"],
     "technique.reward_model=/no/such/dir is neither an earlier stage of this pipeline nor a directory"),
    (["technique.rewards=[no_such_module:f]"], "module 'no_such_module' does not import"),
    (["technique.reward_weights=[1,2]"], "technique.reward_weights has 2 values for 1 rewards"),
    (["technique.val_every=10"], "technique.val_every=10: grpo validates no loss while it trains"),
    (["parallelism=dp2"], "parallelism=dp2 (2 ranks) with technique=grpo"),
    (["technique.max_completion_tokens=200"],
     "technique.max_completion_tokens=200 with data.seq_len=64 (the most prompt tokens kept) needs 264 positions, and "
     "the model's context is 256"),
])
def test_bad_settings_are_refused_by_the_plan(tmp_path, args, fragment):
    assert fragment in refusal(tmp_path, "data=word_problems", *args)


def test_answers_are_needed_for_exact_match_and_prompts_for_any_reward(tmp_path):
    assert "technique.rewards has exact_match, which compares a completion with the prompt's answer, and " \
           "data=preference has no answers" in refusal(tmp_path, "data=preference")
    assert "data=jsonl with technique=grpo" in refusal(tmp_path, "data=jsonl")
    assert refusal(tmp_path, "data=embedded") == ""  # the world's word problems, as data=word_problems has them
    assert refusal(tmp_path, "data=preference", "technique.rewards=[my_rewards:distinct_words]") == ""
    assert run_llmexp("plan", "technique=grpo", "data=word_problems", cwd=tmp_path).returncode == 0


@pytest.fixture(scope="module")
def tiny_classifier(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with a one-label sequence-classification head, saved as technique=reward_model saves one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=1,
                                                               pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("classifier") / "reward_model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_saved_classifier_scores_each_completion(tiny_classifier):
    score = RewardModelScore(tiny_classifier, max_len=64)
    prompts = ["Question: Mia has 3 apples .\nAnswer:"] * 3
    completions = ["3 + 1 = 4 . #### 4", "#### 9", "3 + 1 = 4 . #### 4"]
    scores = score(prompts, completions, [4, 4, 4])
    assert len(scores) == 3 and scores[0] == pytest.approx(scores[2], abs=1e-5) and scores[0] != scores[1]
    alone = score(prompts[1:2], completions[1:2], [4])  # padding in a batch does not change a score
    assert alone[0] == pytest.approx(scores[1], abs=1e-5)


def test_the_plan_counts_reference_reward_model_and_generation(tmp_path, tiny_checkpoint, tiny_classifier):
    def parts(*args):
        result = run_llmexp("plan", "--json", "technique=grpo", "data=word_problems", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)["memory_breakdown"]

    plain = parts()
    assert plain["reference"] == plain["weights"] and plain["kv_cache"] > 0
    assert "reference" not in parts("technique.beta=0")
    assert parts("technique.group_size=16")["activations"] > plain["activations"]
    with_classifier = parts("technique.rewards=[reward_model]", f"technique.reward_model={tiny_classifier}")
    assert with_classifier["reward_model"] > 0
    assert "not a sequence classifier" in refusal(tmp_path, "data=word_problems", "technique.rewards=[reward_model]",
                                                  f"technique.reward_model={tiny_checkpoint}")


def reward_pipeline(*stages: str):
    """A pipeline of a reward_model stage ``rm`` and a grpo stage ``rl`` rewarded by it, on the preference pairs."""
    from llmexp.configuration.compose import compose_config
    from llmexp.planning.planner import make_plan

    return make_plan(compose_config([
        "pipeline=technique_only", "data=preference", "+technique@pipeline.nodes.rm=reward_model",
        "+technique@pipeline.nodes.rl=grpo", f"pipeline.stages=[{','.join(stages)}]",
        "pipeline.nodes.rl.rewards=[reward_model]", "pipeline.nodes.rl.reward_model=rm"]))


def test_an_earlier_reward_model_stage_rewards_and_is_counted():
    plan = reward_pipeline("rm", "rl")
    assert plan.feasible, plan.problems
    assert plan.memory_breakdown["reward_model"] == plan.memory_breakdown["weights"]
    misordered = reward_pipeline("rl", "rm")
    assert not misordered.feasible
    assert any("pipeline.nodes.rl.reward_model=rm is neither an earlier stage of this pipeline nor a directory" in p
               for p in misordered.problems)


def run_ok(tmp_path: Path, *args: str, run_dir: str = "run", console: Optional[list] = None) -> dict:
    """The run's results.json; ``console`` (a list) receives its stderr."""
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    result = run_llmexp(*args, f"hydra.run.dir={tmp_path / run_dir}", cwd=tmp_path,
                        env={"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1", "LLMEXP_PROGRESS_INTERVAL": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    if console is not None:
        console.append(result.stderr)
    return read_results(tmp_path / run_dir)


def log_rows(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "grpo/train_log.jsonl").read_text().splitlines()]


def test_a_short_run_logs_every_steps_rewards_kl_and_clipping(tmp_path, tiny_checkpoint):
    console = []
    record = run_ok(tmp_path, "technique=grpo", *SHORT, *WORD_PROBLEMS, f"model.path={tiny_checkpoint}",
                    "technique.max_steps=4",
                    "technique.num_iterations=2", "technique.rewards=[format,my_rewards:distinct_words]",
                    "technique.reward_weights=[1.0,2.0]", console=console)
    metrics = record["stages"]["grpo"]["metrics"]
    rows = log_rows(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        assert all(key in row for key in LOGGED), row
        assert 1 <= row["completion_length"] <= 12
        assert row["reward_mean"] == pytest.approx(row["reward_format"] + 2 * row["reward_distinct_words"], abs=1e-5)
        assert 0 <= row["zero_advantage_groups"] <= 1 and 0 <= row["clip_fraction"] <= 1
    # step 1 samples from the starting weights: ratio 1, policy = reference; step 2 reuses those completions after
    # an update (num_iterations=2): the ratios move, and so does the KL
    assert rows[0]["kl"] == 0 and rows[0]["clip_fraction"] == 0
    assert rows[1]["reward_mean"] == rows[0]["reward_mean"] and rows[1]["kl"] > 0
    assert rows[2]["reward_mean"] != rows[1]["reward_mean"]  # a new generation batch
    assert metrics["steps"] == 4 and metrics["generation_time_s"] > 0 and metrics["optimisation_time_s"] > 0
    assert metrics["scoring_time_s"] >= 0 and metrics["reward_mean"] == pytest.approx(rows[-1]["reward_mean"], abs=1e-5)
    assert (tmp_path / "run/grpo/model/config.json").exists()
    # each step's progress line (off a terminal) gives the step's mean reward beside its loss
    lines = re.findall(r"^grpo: step (\d+)/4 \(\d+%\) loss \S+ reward_mean (\S+) ", console[0], re.M)
    assert [(int(step), float(reward)) for step, reward in lines] == [
        (row["step"], pytest.approx(row["reward_mean"], rel=1e-3)) for row in rows]


def test_grpo_raises_a_reward_the_policy_can_learn(tmp_path, tiny_checkpoint):
    """From random weights, rewarded by the share of number words, 10 steps more than double that share: the
    advantages reach the completions they belong to, with the sign that makes a rewarded completion likelier."""
    run_ok(tmp_path, "technique=grpo", *SHORT, *WORD_PROBLEMS, f"model.path={tiny_checkpoint}",
           "technique.max_steps=10", "technique.rewards=[my_rewards:digit_share]")
    rewards = [row["reward_mean"] for row in log_rows(tmp_path / "run")]
    assert sum(rewards[-3:]) / 3 > 2 * sum(rewards[:3]) / 3 + 0.1, rewards


def test_a_reward_model_directory_rewards_the_preference_prompts(tmp_path, tiny_checkpoint, tiny_classifier):
    record = run_ok(tmp_path, "technique=grpo", *SHORT, "data=preference", f"model.path={tiny_checkpoint}",
                    "technique.max_steps=2", "technique.rewards=[reward_model]",
                    f"technique.reward_model={tiny_classifier}")
    rows = log_rows(tmp_path / "run")
    assert all(row["reward_reward_model"] == pytest.approx(row["reward_mean"], abs=1e-5) for row in rows)
    assert all(row["reward_std"] > 0 and row["zero_advantage_groups"] == 0 for row in rows)  # scores differ
    assert record["stages"]["grpo"]["metrics"]["steps"] == 2


def test_a_reward_model_stage_rewards_the_grpo_stage_after_it(tmp_path, tiny_checkpoint):
    record = run_ok(tmp_path, "pipeline=technique_only", "data=preference", f"model.path={tiny_checkpoint}",
                    "+technique@pipeline.nodes.rm=reward_model", "+technique@pipeline.nodes.rl=grpo",
                    "pipeline.stages=[rm,rl]", "pipeline.nodes.rm.max_steps=2", "pipeline.nodes.rl.max_steps=2",
                    "pipeline.nodes.rl.rewards=[reward_model]", "pipeline.nodes.rl.reward_model=rm",
                    "pipeline.nodes.rl.group_size=4", "pipeline.nodes.rl.max_completion_tokens=8",
                    "parallelism.global_batch=4", "parallelism.micro_batch=2")
    metrics = record["stages"]["rl"]["metrics"]
    assert metrics["steps"] == 2 and metrics["reward_std"] > 0
    assert metrics["reward_reward_model"] == pytest.approx(metrics["reward_mean"], abs=1e-5)


def test_a_killed_run_resumes_and_samples_what_the_uninterrupted_one_did(tmp_path, tiny_checkpoint):
    """SIGKILL after a checkpoint and a logged step past it; the rerun resumes there, and every resumed step's rewards,
    KL and lengths are the uninterrupted run's: same seeds per completion, same weights, the reference as refreshed
    at the checkpoint's step (ref_refresh_steps = checkpoint_every), and the completions sampled before it for the
    repeats still to come (every checkpoint falls inside a generation batch's 3 repeats)."""
    args = ["technique=grpo", *SHORT, *WORD_PROBLEMS, f"model.path={tiny_checkpoint}", "technique.max_steps=24",
            "technique.rewards=[my_rewards:distinct_words]", "technique.checkpoint_every=8",
            "technique.num_iterations=3", "technique.ref_refresh_steps=8"]
    run_ok(tmp_path, *args, run_dir="clean")
    clean_rows = log_rows(tmp_path / "clean")
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "llmexp", *args, f"hydra.run.dir={run_dir}"], cwd=tmp_path, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        checkpoint = step_past_a_checkpoint(run_dir, process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    resumed = run_ok(tmp_path, *args, run_dir="killed")["stages"]["grpo"]["metrics"]
    assert checkpoint <= resumed["resumed_from_step"] < 24 and resumed["steps"] == 24
    rows = log_rows(run_dir)
    assert [row["step"] for row in rows] == list(range(1, 25))
    for row, reference in zip(rows, clean_rows):
        for key in LOGGED:
            assert row[key] == pytest.approx(reference[key], abs=1e-5), (row["step"], key)


def step_past_a_checkpoint(run_dir: Path, process: subprocess.Popen, timeout: float = 120) -> int:
    """Wait until a checkpoint exists and the log has a whole row past it; its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run finished before it could be killed"
        steps = [int(p.name[5:13]) for p in (run_dir / "grpo/checkpoints").glob("step-*.ckpt")]
        log = run_dir / "grpo/train_log.jsonl"
        logged = [json.loads(line)["step"] for line in (log.read_text().split("\n")[:-1] if log.exists() else [])]
        if steps and logged and logged[-1] > max(steps):
            return max(steps)
        time.sleep(0.02)
    raise AssertionError("no checkpoint with a logged step past it appeared in time")
