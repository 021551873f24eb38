"""GRPO's advantages, loss and gradients against TRL 1.16's GRPOTrainer, run for real on the same batch.

A GRPOTrainer on a tiny Llama (CPU, no vLLM) takes a fixed batch through its own code: a
``rollout_func`` hands it fixed completions and a reward function fixed rewards, so its
``_generate_and_score_completions`` computes the masks, the old and reference log-probabilities and
the advantages, and its ``compute_loss`` the loss. Between the two the policy's weights move (what
the later of ``num_iterations`` updates see), so the ratios leave [1 - eps, 1 + eps] and clipping
is exercised. llmexp's functions get the same batch; loss and gradients must agree within 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from llmexp.plugins.grpo.loss import ClippedObjective, completion_logprobs, group_advantages
from tests.conftest import REPO

GROUP = 4
PROMPTS = ["Question: Taren has 6 books .\nAnswer:", "Question: Mia has 3 apples .\nAnswer:"]
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]  # the second group's rewards are all equal
COMPLETION_LENGTHS = [5, 9, 3, 12, 7, 12, 1, 6]
MAX_COMPLETION = 12
TEMPERATURE = 0.9


@pytest.fixture(scope="module")
def tokenizer():
    from llmexp.data.embedded import build_world
    from llmexp.data.tokenizer import word_level_tokenizer

    return word_level_tokenizer(build_world(0).vocabulary())


@pytest.fixture(scope="module")
def start_dir(tokenizer, tmp_path_factory):
    """A 2-layer Llama saved where TRL loads its policy and its reference from (random weights, fp32)."""
    from llmexp.models.loading import build_model, save_model

    torch.manual_seed(0)
    config = OmegaConf.load(REPO / "llmexp/conf/model/tiny_llama.yaml")
    config.num_layers = 2
    path = tmp_path_factory.mktemp("grpo") / "start"
    save_model(build_model(config, tokenizer).float(), tokenizer, path)
    return path


@pytest.fixture
def start_model(start_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(start_dir, dtype=torch.float32)


def fixed_batch(tokenizer):
    """Per completion (group-major): its prompt's ids and its completion's ids (EOS-terminated unless full)."""
    prompt_ids = [tokenizer(prompt)["input_ids"][:-1] for prompt in PROMPTS]  # without the tokenizer's </s>
    assert len(prompt_ids[0]) == len(prompt_ids[1])  # equal lengths: TRL's forward numbers positions from 0
    generator = torch.Generator().manual_seed(1)
    completions = []
    for length in COMPLETION_LENGTHS:
        ids = torch.randint(5, len(tokenizer), (length,), generator=generator).tolist()
        if length < MAX_COMPLETION:
            ids[-1] = tokenizer.eos_token_id
        completions.append(ids)
    return [ids for ids in prompt_ids for _ in range(GROUP)], completions


def move_weights(model, scale: float) -> None:
    """The same seeded change to every weight of ``model``: what an optimiser step between iterations does."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def trl_trainer(start_dir, tokenizer, tmp_path, loss_type: str, beta: float, scale_rewards: bool,
                kl_correction: bool = True):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompt_ids, completion_ids = fixed_batch(tokenizer)

    def rollout(prompts, trainer):
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    def fixed_rewards(prompts, completions, **kwargs):
        return list(REWARDS)

    args = GRPOConfig(
        model_init_kwargs={"dtype": torch.float32},
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=len(REWARDS),
        num_generations=GROUP, gradient_accumulation_steps=1, num_iterations=2, max_completion_length=MAX_COMPLETION,
        temperature=TEMPERATURE, beta=beta, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type,
        scale_rewards=scale_rewards, use_bias_correction_kl=kl_correction, bf16=False, logging_steps=1,
    )
    return GRPOTrainer(model=str(start_dir), reward_funcs=fixed_rewards, args=args, processing_class=tokenizer,
                       train_dataset=Dataset.from_dict({"prompt": PROMPTS}), rollout_func=rollout)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,scale_rewards,kl_correction",
                         [(0.04, True, True), (0.04, False, False), (0.0, True, True)])
def test_loss_and_gradients_equal_trls_grpo_trainer(loss_type, beta, scale_rewards, kl_correction, tokenizer, start_dir,
                                                    start_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    ours = start_model
    trainer = trl_trainer(start_dir, tokenizer, tmp_path, loss_type, beta, scale_rewards, kl_correction)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(GROUP)])
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"]

    # the advantages, and the log-probabilities the completions had before the update
    advantages, zero_std = group_advantages(torch.tensor(REWARDS), GROUP, scale_rewards)
    torch.testing.assert_close(advantages, inputs["advantages"], rtol=0, atol=1e-5)
    assert zero_std.tolist() == [False] * GROUP + [True] * GROUP
    with torch.no_grad():
        old = completion_logprobs(ours, prompt_ids, prompt_mask, completion_ids, mask, TEMPERATURE)
    torch.testing.assert_close(old * mask, inputs["old_per_token_logps"] * mask, rtol=0, atol=1e-5)
    if beta:
        torch.testing.assert_close(old * mask, inputs["ref_per_token_logps"] * mask, rtol=0, atol=1e-5)

    move_weights(trainer.model, 0.05)
    move_weights(ours, 0.05)
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()

    objective = ClippedObjective(beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                                 max_completion_tokens=MAX_COMPLETION, kl_correction=kl_correction)
    logprobs = completion_logprobs(ours, prompt_ids, prompt_mask, completion_ids, mask, TEMPERATURE)
    loss, logs = objective(logprobs, inputs["old_per_token_logps"], inputs.get("ref_per_token_logps"), advantages,
                           mask, step_tokens=float(mask.sum()), accumulation=1)
    loss.backward()

    assert logs["clip_fraction"] > 0.05  # the update moved some ratios out of the clip range
    assert float(loss.detach()) == pytest.approx(float(trl_loss.detach()), abs=1e-5)
    trl_grads = dict(trainer.model.named_parameters())
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, trl_grads[name].grad, rtol=0, atol=1e-5, msg=name)
    assert max(float(p.grad.abs().max()) for p in ours.parameters()) > 1e-3  # gradients that say something
    trl_metrics = trainer._metrics["train"]
    assert float(logs["clip_fraction"]) == pytest.approx(trl_metrics["clip_ratio/region_mean"][-1], abs=1e-6)
    if beta:  # TRL logs the ratio-weighted KL under its correction; llmexp logs the estimate of KL itself
        assert float(logs["kl"]) > 0
        if not kl_correction:
            assert float(logs["kl"]) == pytest.approx(trl_metrics["kl"][-1], abs=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_two_micro_batches_accumulate_to_trls_step(loss_type, tokenizer, start_dir, start_model, tmp_path, monkeypatch):
    """Split over two micro-batches, the summed micro-batch losses / 2 (what the training loop's accumulation makes)
    equal TRL's loss over two accumulation steps: dapo's denominator is the whole step's tokens."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    ours = start_model
    trainer = trl_trainer(start_dir, tokenizer, tmp_path, loss_type, 0.04, True)
    trainer.args.gradient_accumulation_steps = trainer.args.steps_per_generation = 2
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(GROUP)])
    move_weights(trainer.model, 0.05)
    move_weights(ours, 0.05)
    objective = ClippedObjective(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                                 max_completion_tokens=MAX_COMPLETION)
    step_tokens = float(inputs["completion_mask"].sum())
    trl_total = ours_total = 0.0
    for rows in (slice(0, 5), slice(5, 8)):  # uneven halves: dapo's per-step denominator is what makes them add up
        part = {key: value[rows] if torch.is_tensor(value) and value.dim() > 0 else value
                for key, value in inputs.items()}
        trl_total += float(trainer.compute_loss(trainer.model, part).detach())
        logprobs = completion_logprobs(ours, part["prompt_ids"], part["prompt_mask"], part["completion_ids"],
                                       part["completion_mask"], TEMPERATURE)
        loss, _ = objective(logprobs, part["old_per_token_logps"], part["ref_per_token_logps"], part["advantages"],
                            part["completion_mask"], step_tokens=step_tokens, accumulation=2)
        ours_total += float(loss.detach()) / 2
    assert ours_total == pytest.approx(trl_total, abs=1e-5)
