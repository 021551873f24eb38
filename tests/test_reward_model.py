"""technique=reward_model: its loss against TRL's RewardTrainer, its held-out figures, and real runs of ``llmexp``."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llmexp.data.preference import preference_data, read_preference_file
from llmexp.data.records import PreferencePair
from llmexp.plugins.reward import RewardModel, RewardModelConfig, classifier_parameters
from llmexp.plugins.reward.classifier import add_lora, sequence_classifier
from llmexp.plugins.reward.diagnostics import pair_diagnostics
from llmexp.plugins.reward.losses import RewardLoss, bradley_terry_loss
from llmexp.plugins.reward.scoring import PairCollate, encode_pair, reward_scores
from llmexp.plugins.reward.stage import pair_margin
from tests.conftest import REPO, read_results, run_llmexp

FAST = ["pipeline=technique_only", "parallelism.micro_batch=8", "parallelism.global_batch=8", "data.seq_len=32"]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_ok(tmp_path: Path, *args: str) -> dict:
    result = run_llmexp(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_results(tmp_path / "run")


def run_refused(tmp_path: Path, *args: str) -> str:
    result = run_llmexp(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert not (tmp_path / "outputs").exists()  # nothing half-written
    return " ".join(result.stderr.split())


def held_out_figures_of(directory: Path, data_cfg) -> dict:
    """The held-out figures of a saved reward model, recomputed from the directory alone with plain transformers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.model_max_length == data_cfg.seq_len  # the length the stage cut sequences to, saved with it
    _, held_out = preference_data(data_cfg)
    prompts = [pair.prompt for pair in held_out]
    max_len = tokenizer.model_max_length
    chosen = reward_scores(model, tokenizer, prompts, [pair.chosen for pair in held_out], max_len)
    rejected = reward_scores(model, tokenizer, prompts, [pair.rejected for pair in held_out], max_len)

    def lengths(side):
        return [len(tokenizer(getattr(pair, side), add_special_tokens=False)["input_ids"]) for pair in held_out]

    return pair_diagnostics(chosen, rejected, lengths("chosen"), lengths("rejected"))


@pytest.fixture(scope="module")
def causal_lm(tiny_checkpoint):
    from llmexp.models.loading import load_model

    return load_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def classifier(causal_lm):
    causal, tokenizer = causal_lm
    torch.manual_seed(0)
    return sequence_classifier(causal, tokenizer, "technique"), tokenizer


def tiny_numbers(layers: int = 2) -> dict:
    """The architecture numbers of tiny_llama with ``layers`` layers (the tiny checkpoint has 2)."""
    return {**OmegaConf.to_container(OmegaConf.load(REPO / "llmexp/conf/model/tiny_llama.yaml")), "num_layers": layers}


# -- the loss against TRL 1.16's RewardTrainer --------------------------------------------------------------------

PAIRS = [
    PreferencePair("write the SQL query that answers the question .\nwhat pet does Kalo have ?",
                   "SELECT pet FROM people WHERE name = Kalo", "SELECT town FROM people WHERE name = Kalo", 0.5),
    PreferencePair("what is the job of Dorfen ?", "SELECT job FROM people", "SELECT job", 0.0),
    PreferencePair("where does Yabel live ?", "Dorville", "Yabel lives in a town far away", 2.0),
]


@pytest.mark.parametrize("with_margin, center", [(True, 0.0), (True, 0.01), (False, 0.0)])
def test_the_loss_and_its_gradients_equal_trl_reward_trainers_on_the_same_batch(tmp_path, classifier, with_margin,
                                                                                  center):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    model, tokenizer = classifier
    examples = [encode_pair(pair, pair.margin if with_margin else 0.0, tokenizer, 32) for pair in PAIRS]
    trl_examples = [example if with_margin else {k: v for k, v in example.items() if k != "margin"}
                    for example in examples]
    trainer = RewardTrainer(
        model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(trl_examples),
        args=RewardConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                          center_rewards_coefficient=center or None),
    )
    ours_batch = PairCollate(tokenizer.pad_token_id)(examples)
    trl_batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(trl_examples)
    for key in ("input_ids", "attention_mask"):  # the same layout: chosen rows, then rejected, right-padded
        assert torch.equal(ours_batch[key], trl_batch[key])

    model.train()
    model.zero_grad()
    trl_loss = trainer.compute_loss(model, dict(trl_batch))
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ours = RewardLoss(center)(model, ours_batch)
    ours.loss.backward()
    assert ours.loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    for ours_grad, trl_grad in zip((p.grad for p in model.parameters()), trl_grads):
        torch.testing.assert_close(ours_grad, trl_grad, atol=1e-6, rtol=1e-5)
    model.zero_grad()
    # and the value is the formula's
    rewards = model(input_ids=ours_batch["input_ids"], attention_mask=ours_batch["attention_mask"]).logits[:, 0]
    r_c, r_r = rewards.detach()[:3], rewards.detach()[3:]
    margins = torch.tensor([0.5, 0.0, 2.0]) if with_margin else torch.zeros(3)
    expected = torch.log1p(torch.exp(-(r_c - r_r - margins))).mean() + center * ((r_c + r_r) ** 2).mean()
    assert ours.loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_the_margin_shifts_the_loss_as_bradley_terry_says():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    assert bradley_terry_loss(chosen, rejected, torch.zeros(2)).item() == pytest.approx(
        (math.log1p(math.exp(-1)) + math.log(2)) / 2)
    # a margin of 1 on the first pair makes it count as a tie
    assert bradley_terry_loss(chosen, rejected, torch.tensor([1.0, 0.0])).item() == pytest.approx(math.log(2))


# -- held-out figures -----------------------------------------------------------------------------------------------

def test_a_length_biased_scorer_correlates_fully_with_length_and_prefers_the_longer_side():
    chosen_lengths, rejected_lengths = [3, 9, 4, 12, 5], [8, 2, 10, 6, 5]
    figures = pair_diagnostics([float(n) for n in chosen_lengths], [float(n) for n in rejected_lengths],
                               chosen_lengths, rejected_lengths)
    assert figures["reward_length_correlation"] == pytest.approx(1.0)
    assert figures["longer_preferred"] == 1.0  # every pair of unequal length: the longer scores higher
    assert figures["chosen_longer"] == 0.5  # the data: 2 of the 4 unequal pairs have the longer side chosen
    assert figures["pairwise_accuracy"] == 0.4  # 2 of 5 (the equal-length pair is a tie, not a win)
    assert figures["reward_margin"] == pytest.approx((-5 + 7 - 6 + 6 + 0) / 5)


def test_a_scorer_blind_to_length_shows_no_length_bias():
    chosen_lengths, rejected_lengths = [3, 9, 4, 12], [8, 2, 10, 6]
    figures = pair_diagnostics([1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], chosen_lengths, rejected_lengths)
    assert figures["pairwise_accuracy"] == 1.0 and figures["reward_margin"] == 1.0
    assert figures["longer_preferred"] == 0.5  # it picks the chosen side, longer or not
    assert abs(figures["reward_length_correlation"]) < 0.3


def test_length_figures_are_left_out_when_every_response_has_the_same_length():
    figures = pair_diagnostics([2.0, 0.0], [1.0, 1.0], [8, 8], [8, 8])
    assert figures == {"pairwise_accuracy": 0.5, "reward_margin": 0.0}


# -- data: margins per record ---------------------------------------------------------------------------------------

def test_a_records_margin_is_read_and_overrides_the_technique_margin(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.5},
                                                  {"prompt": "p", "chosen": "c", "rejected": "d"}])
    pairs = read_preference_file(path)
    assert [pair.margin for pair in pairs] == [1.5, None]
    assert [pair_margin(pair, 0.25) for pair in pairs] == [1.5, 0.25]


# -- the saved classifier -------------------------------------------------------------------------------------------

def test_scores_of_a_padded_batch_equal_each_sequence_scored_alone(classifier):
    model, tokenizer = classifier
    prompts = [pair.prompt for pair in PAIRS]
    responses = [pair.rejected for pair in PAIRS]  # lengths 8, 2 and 7 words: padding in every batch of them
    together = reward_scores(model, tokenizer, prompts, responses, 32)
    alone = [reward_scores(model, tokenizer, [p], [r], 32)[0] for p, r in zip(prompts, responses)]
    assert together == pytest.approx(alone, abs=1e-5)
    assert len(set(together)) == 3


def test_a_run_saves_a_classifier_that_plain_transformers_loads_and_that_reproduces_its_held_out_figures(
        tmp_path, tiny_checkpoint):
    results = run_ok(tmp_path, "technique=reward_model", f"model.path={tiny_checkpoint}", "technique.max_steps=20",
                     "technique.val_every=10", "technique.lr=3e-3", *FAST)
    stage = results["stages"]["reward_model"]
    metrics = stage["metrics"]
    assert stage["artifacts"]["reward_model"] == str(tmp_path / "run/reward_model/reward_model")
    assert metrics["steps"] == 20 and metrics["trainable_fraction"] == 1.0
    assert 0 <= metrics["pairwise_accuracy"] <= 1
    assert "val_accuracy" in metrics and "val_margin" in metrics  # the loop's validation, from the loss's logs
    rows = [json.loads(line) for line in (tmp_path / "run/reward_model/train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [10, 20]
    assert all("accuracy" in row and "margin" in row for row in rows if "loss" in row)

    directory = tmp_path / "run/reward_model/reward_model"
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["pad_token_id"] == 0  # the embedded tokenizer's <pad>: each row is scored at its EOS
    assert not (tmp_path / "run/reward_model/reward_model.partial").exists()
    data_cfg = OmegaConf.create(results["config"]["data"])
    recomputed = held_out_figures_of(directory, data_cfg)
    assert recomputed == {name: pytest.approx(metrics[name], abs=1e-4) for name in recomputed}

    # the recipe a user without llmexp follows (scoring.reward_input_ids): prompt + newline with BOS, the
    # completion's tokens, EOS; the score of the one row is the reward
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompt, completion = "Question: what pet does Kalo have ?\nAnswer:", "a cat #### 3"
    ids = (tokenizer(prompt + "\n")["input_ids"] + tokenizer(completion, add_special_tokens=False)["input_ids"]
           + [tokenizer.eos_token_id])
    with torch.no_grad():
        by_hand = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert reward_scores(model, tokenizer, [prompt], [completion], tokenizer.model_max_length) == [
        pytest.approx(by_hand, abs=1e-6)]
    assert results["stages"].keys() == {"reward_model"}  # it hands on no model


def test_a_user_jsonl_with_margins_trains_and_a_bad_margin_is_refused(tmp_path, tiny_checkpoint):
    rows = [{"prompt": f"what does person {i} eat ?", "chosen": f"person {i} eats bread",
             "rejected": "no idea", "margin": 1.0 if i % 2 else 0.0} for i in range(20)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    results = run_ok(tmp_path, "technique=reward_model", "data=preference", f"data.path={path}",
                     "data.validation_split=0.25", f"model.path={tiny_checkpoint}", "technique.max_steps=10",
                     "technique.val_every=0", *FAST)
    metrics = results["stages"]["reward_model"]["metrics"]
    # every chosen side here is longer: the data's share, and what the model learnt of it, are reported
    assert metrics["chosen_longer"] == 1.0
    assert metrics["longer_preferred"] == metrics["pairwise_accuracy"]
    assert "reward_length_correlation" in metrics

    rows[3]["margin"] = "big"
    write_jsonl(path, rows)
    message = run_refused(tmp_path, "technique=reward_model", "data=preference", f"data.path={path}",
                          f"model.path={tiny_checkpoint}")
    assert "pairs.jsonl:4: margin is 'big'" in message


def test_lora_trains_adapters_and_the_score_head_and_saves_a_merged_plain_classifier(tmp_path, tiny_checkpoint):
    results = run_ok(tmp_path, "technique=reward_model", f"model.path={tiny_checkpoint}", "technique.lora_rank=4",
                     "technique.lora_alpha=8", "technique.target_modules=[q_proj,v_proj]", "technique.max_steps=10",
                     "technique.lr=1e-2", "technique.val_every=0", *FAST)
    metrics = results["stages"]["reward_model"]["metrics"]
    # rank 4 on q (128->128) and v (128->64) in 2 layers, and the 128 -> 1 score head
    assert metrics["trainable_parameters"] == 4 * ((128 + 128) + (128 + 64)) * 2 + 128
    node = OmegaConf.structured(RewardModelConfig(lora_rank=4, target_modules=["q_proj", "v_proj"]))
    assert RewardModel.trainable_parameters(None, node, tiny_numbers()) == metrics["trainable_parameters"]

    from transformers import AutoModelForCausalLM

    directory = tmp_path / "run/reward_model/reward_model"
    assert not (directory / "adapter_config.json").exists()  # merged: a plain classifier, no PEFT needed
    recomputed = held_out_figures_of(directory, OmegaConf.create(results["config"]["data"]))
    assert recomputed["pairwise_accuracy"] == pytest.approx(metrics["pairwise_accuracy"])
    from transformers import AutoModelForSequenceClassification

    trained = AutoModelForSequenceClassification.from_pretrained(directory)
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    q_trained = trained.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q_trained, base.model.layers[0].self_attn.q_proj.weight)  # adapters merged in
    assert torch.equal(trained.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_the_plans_parameter_counts_are_the_classifiers(causal_lm, classifier):
    model, _ = classifier
    assert classifier_parameters(tiny_numbers()) == sum(p.numel() for p in model.parameters())
    node = OmegaConf.structured(RewardModelConfig(lora_rank=8))
    lora = add_lora(sequence_classifier(*causal_lm, "technique"), node)
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert RewardModel.trainable_parameters(None, node, tiny_numbers()) == trainable  # adapters and the score head


def test_the_plan_holds_the_classifier_in_full_or_its_adapters(tmp_path):
    def plan(*args):
        result = run_llmexp("plan", "--json", "technique=reward_model", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout)

    full, lora = plan(), plan("technique.lora_rank=16")
    assert full["feasible"] and lora["feasible"]
    assert "adapter" not in full["memory_breakdown"]
    assert full["memory_breakdown"]["optimizer"] == 8 * classifier_parameters(tiny_numbers(8))  # Adam
    assert lora["memory_breakdown"]["adapter"] == 4 * lora["trainable_parameters"]
    assert lora["memory_per_device_bytes"] < full["memory_per_device_bytes"]


# -- refusals before anything runs ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "args, fragment",
    [
        (["technique.lora_rank=-1"], "technique.lora_rank=-1 is negative"),
        (["technique.center_rewards_coefficient=-0.5"], "technique.center_rewards_coefficient=-0.5 must be 0"),
        (["technique.margin=nan"], "technique.margin=nan is not a number"),
        (["technique.lora_rank=8", "technique.target_modules=[q_proj,query_key_value]"],
         "technique.target_modules names query_key_value"),
        (["data.validation_split=0"], "held-out pairs, and the data holds none"),
        (["data=jsonl", "data.path=x.jsonl"], "data=jsonl holds no preference pairs"),
        (["technique.max_steps=0"], "technique.max_steps=0 must be at least 1"),
    ],
)
def test_bad_settings_are_refused_before_the_run_naming_the_field(tmp_path, tiny_checkpoint, args, fragment):
    message = run_refused(tmp_path, "technique=reward_model", f"model.path={tiny_checkpoint}", *args)
    assert fragment in message


def test_without_a_base_model_a_user_file_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 4)
    message = run_refused(tmp_path, "technique=reward_model", "data=preference", f"data.path={path}")
    assert "model.path" in message


# -- resume -----------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(tmp_path, tiny_checkpoint):
    command = ["technique=reward_model", f"model.path={tiny_checkpoint}", "technique.max_steps=60",
               "technique.checkpoint_every=20", "technique.log_every=5", "technique.val_every=0",
               "pipeline=technique_only", "data.seq_len=32", "parallelism.micro_batch=4", "parallelism.global_batch=8"]
    clean = run_llmexp(*command, "hydra.run.dir=clean", cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr[-3000:]
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "llmexp", *command, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not list((run_dir / "reward_model/checkpoints").glob("step-*.ckpt")):
            assert process.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (run_dir / "reward_model/reward_model").exists()

    resumed = run_llmexp(*command, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after, reference = (read_results(d)["stages"]["reward_model"]["metrics"] for d in (run_dir, tmp_path / "clean"))
    assert 20 <= after["resumed_from_step"] < 60 and after["steps"] == 60
    assert after["final_loss"] == pytest.approx(reference["final_loss"], abs=1e-4)
    assert after["pairwise_accuracy"] == reference["pairwise_accuracy"]
    assert after["reward_margin"] == pytest.approx(reference["reward_margin"], abs=1e-4)
