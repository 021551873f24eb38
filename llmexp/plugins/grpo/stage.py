"""The grpo stage: prompts in, groups of sampled completions rewarded, the policy trained on the shared loop.

One optimiser step takes ``parallelism.global_batch`` prompts (its generation batch), in
micro-batches of ``parallelism.micro_batch`` prompts; each prompt brings ``group_size``
completions. The loop's "examples" are (step, generation batch, slot) triples laid out in the
order they are trained on (``shuffle=False``): generation batch g serves the optimiser steps
g * num_iterations .. (g + 1) * num_iterations - 1, as TRL's RepeatSampler repeats it, and the
loss samples its completions when it first meets it, from the weights of that moment, then
reuses them, their rewards and their old and reference log-probabilities for the repeats.
The batch in use is saved in the loop's checkpoints (``KeptExperience``), so a run resumed in the
middle of its repeats goes on with the completions the interrupted run sampled.

The step's time is split three ways (the figures GRPO systems compare): ``generation_time_s``
(the engine sampling completions), ``scoring_time_s`` (the rewards, the advantages, and the
completions' log-probabilities under the reference and, for num_iterations > 1, the sampling
weights: the no-grad passes of an experience batch) and ``optimisation_time_s`` (the rest: the
policy's forward and backward passes and the optimiser), this attempt's.
"""

from __future__ import annotations

import copy
import random
import time
from typing import Any, Dict, List, Optional

import lightning as L
import torch

from llmexp.plugins.grpo.loss import ClippedObjective, completion_logprobs, group_advantages
from llmexp.plugins.grpo.prompts import Prompt, training_prompts
from llmexp.plugins.grpo.rewards import Rewards, load_rewards
from llmexp.plugins.grpo.rollouts import Rollouts, Sampler, Sampling
from llmexp.sdk import (
    LossOutput, StageContext, StageResult, base_model, stage_node_path, train, trained_model_result,
)


def run_grpo(ctx: StageContext) -> StageResult:
    cfg, node = ctx.config, ctx.stage_config
    start = base_model(ctx)
    model, tokenizer = start.model, start.tokenizer
    prompts, _ = training_prompts(cfg.data)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if node.beta else None
    batches = generation_batches(prompts, node, cfg.parallelism.global_batch, cfg.seed)
    loss = GroupPolicyLoss(ctx, model, batches, tokenizer, load_rewards(ctx, stage_node_path(ctx)), reference)
    callbacks = [KeptExperience(loss)]
    if reference is not None and node.ref_refresh_steps:
        callbacks.append(ReferenceRefresh(model, reference, node.ref_refresh_steps, node.ref_mixup_alpha))
    try:
        metrics = train(ctx, model, loss, schedule(node, cfg.parallelism.global_batch), collate, None, shuffle=False,
                        extra_modules=[reference] if reference is not None else [], callbacks=callbacks)
    finally:
        loss.close()
    metrics.update(loss.figures(metrics["train_time_s"]))
    return trained_model_result(ctx, model, tokenizer, metrics, save=node.save_model)


def generation_batches(prompts: List[Prompt], node, global_batch: int, seed: int) -> List[List[Prompt]]:
    """The prompts of each generation batch: seeded passes over the prompts, each in a new order."""
    count = -(-node.max_steps // node.num_iterations)
    rng = random.Random(seed)
    stream: List[Prompt] = []
    while len(stream) < count * global_batch:
        stream.extend(rng.sample(prompts, len(prompts)))
    return [stream[g * global_batch:(g + 1) * global_batch] for g in range(count)]


def schedule(node, global_batch: int) -> List[Dict[str, int]]:
    """The loop's examples in training order: one per (optimiser step, prompt of its generation batch)."""
    return [{"step": step, "generation": step // node.num_iterations, "slot": slot}
            for step in range(node.max_steps) for slot in range(global_batch)]


def collate(examples: List[Dict[str, int]]) -> Dict[str, Any]:
    """A micro-batch: its step, its generation batch and the slots of its prompts there (a step's micro-batches
    never straddle two steps: global_batch is a multiple of micro_batch)."""
    return {"step": examples[0]["step"], "generation": examples[0]["generation"],
            "slots": [example["slot"] for example in examples]}


class GroupPolicyLoss:
    """The loss the loop calls per micro-batch: samples and scores a generation batch when it first meets it, then
    GRPO's clipped objective on the micro-batch's completions (``llmexp.plugins.grpo.loss``). The engine samples
    from ``policy`` itself (not a compiled wrapper of it: it runs its own decoding steps)."""

    def __init__(self, ctx: StageContext, policy, batches: List[List[Prompt]], tokenizer, rewards: Rewards,
                 reference):
        node, parallelism = ctx.stage_config, ctx.config.parallelism
        self.node, self.policy, self.batches, self.tokenizer = node, policy, batches, tokenizer
        self.rewards, self.reference = rewards, reference
        self.run_seed = ctx.config.seed
        self.seq_len = ctx.config.data.seq_len
        self.group = node.group_size
        self.accumulation = parallelism.global_batch // (parallelism.micro_batch * parallelism.dp)
        self.chunk = parallelism.micro_batch * node.group_size  # rows per no-grad forward pass
        self.sampling = Sampling(node.max_completion_tokens, node.temperature, node.top_p, list(node.stop))
        self.objective = ClippedObjective(
            beta=node.beta, epsilon_low=node.epsilon,
            epsilon_high=node.epsilon if node.epsilon_high is None else node.epsilon_high,
            loss_type=node.loss_type, max_completion_tokens=node.max_completion_tokens,
            kl_correction=node.kl_correction)
        self.sampler: Optional[Sampler] = None
        self.generation = -1
        self.times = {"generation_time_s": 0.0, "scoring_time_s": 0.0}
        self.last_logs: Dict[str, float] = {}
        self._step = -1
        self._step_sums: Dict[str, float] = {}

    def __call__(self, model, batch: Dict[str, Any]) -> LossOutput:
        if batch["generation"] != self.generation:
            self._prepare(model, batch["generation"])
        rows = torch.tensor([slot * self.group + member for slot in batch["slots"] for member in range(self.group)],
                            device=self.advantages.device)
        r = self.rollouts
        mask = r.completion_mask[rows]
        logprobs = completion_logprobs(model, r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows], mask,
                                       self.node.temperature)
        loss, logs = self.objective(
            logprobs, None if self.old is None else self.old[rows], None if self.ref is None else self.ref[rows],
            self.advantages[rows], mask, step_tokens=self.step_tokens, accumulation=self.accumulation)
        tokens = int(mask.sum() + r.prompt_mask[rows].sum())
        step_logs = self._step_means(batch["step"], logs, mask)
        return LossOutput(loss=loss, tokens=tokens, logs={**self.batch_logs, **step_logs})

    def _prepare(self, model, generation: int) -> None:
        """Sample, score and (for the repeats and the KL) take the log-probabilities of ``generation``'s batch."""
        if self.sampler is None:
            self.sampler = Sampler(self.policy, self.tokenizer, len(self.batches[0]) * self.group)
        prompts = self.batches[generation]
        prompt_ids = [self.tokenizer(p.text(self.tokenizer))["input_ids"][-self.seq_len:] for p in prompts]
        started = time.perf_counter()
        rollouts = self.sampler.sample(prompt_ids, self.group, self.sampling, self.run_seed, generation)
        rollouts = rollouts.to(next(self.policy.parameters()).device)
        scored = time.perf_counter()
        per_function, totals = self.rewards(
            [p.question for p in prompts for _ in range(self.group)], rollouts.completions,
            [p.answer for p in prompts for _ in range(self.group)])
        rewards = torch.tensor(totals, dtype=torch.float32)
        advantages, zero_std = group_advantages(rewards, self.group, self.node.scale_rewards)
        self.advantages = advantages.to(rollouts.completion_ids.device)
        self.rollouts, self.generation = rollouts, generation
        self.step_tokens = float(rollouts.completion_mask.sum())
        self.old = self._logprobs(model, rollouts) if self.node.num_iterations > 1 else None
        self.ref = self._logprobs(self.reference, rollouts) if self.reference is not None else None
        self.times["generation_time_s"] += scored - started
        self.times["scoring_time_s"] += time.perf_counter() - scored
        function_means = torch.tensor(per_function, dtype=torch.float32).mean(0).tolist()
        self.batch_logs = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "zero_advantage_groups": float(zero_std.float().mean()),
            "completion_length": float(rollouts.completion_mask.sum(1).float().mean()),
            **{reward_log_name(name): value for name, value in zip(self.rewards.names, function_means)},
        }

    def experience(self) -> Dict[str, Any]:
        """The generation batch in use: what a checkpoint keeps so that its repeats go on after a resume."""
        if self.generation < 0:
            return {}
        r = self.rollouts
        tensors = {"prompt_ids": r.prompt_ids, "prompt_mask": r.prompt_mask, "completion_ids": r.completion_ids,
                   "completion_mask": r.completion_mask, "advantages": self.advantages,
                   "old": self.old, "ref": self.ref}
        return {"generation": self.generation, "completions": list(r.completions), "step_tokens": self.step_tokens,
                "batch_logs": dict(self.batch_logs),
                **{key: value.cpu() for key, value in tensors.items() if value is not None}}

    def restore(self, state: Dict[str, Any]) -> None:
        if not state:
            return
        device = next(self.policy.parameters()).device
        kept = {key: value.to(device) for key, value in state.items() if torch.is_tensor(value)}
        self.rollouts = Rollouts(kept["prompt_ids"], kept["prompt_mask"], kept["completion_ids"],
                                 kept["completion_mask"], state["completions"])
        self.advantages, self.old, self.ref = kept["advantages"], kept.get("old"), kept.get("ref")
        self.generation, self.step_tokens = state["generation"], state["step_tokens"]
        self.batch_logs = state["batch_logs"]

    def _logprobs(self, model, rollouts) -> torch.Tensor:
        r = rollouts
        with torch.no_grad():
            return torch.cat([
                completion_logprobs(model, r.prompt_ids[i:i + self.chunk], r.prompt_mask[i:i + self.chunk],
                                    r.completion_ids[i:i + self.chunk], r.completion_mask[i:i + self.chunk],
                                    self.node.temperature)
                for i in range(0, len(r.completions), self.chunk)])

    def _step_means(self, step: int, logs: Dict[str, torch.Tensor], mask: torch.Tensor) -> Dict[str, float]:
        """``kl`` and ``clip_fraction`` over the step's micro-batches so far, token-weighted (the loop logs the last
        micro-batch's logs: so they cover the whole step)."""
        if step != self._step:
            self._step, self._step_sums = step, {}
        tokens = float(mask.sum())
        self._step_sums["tokens"] = self._step_sums.get("tokens", 0.0) + tokens
        for key, value in logs.items():
            self._step_sums[key] = self._step_sums.get(key, 0.0) + float(value) * tokens
        means = {key: self._step_sums[key] / max(self._step_sums["tokens"], 1.0) for key in logs}
        self.last_logs = {**self.batch_logs, **means}
        return means

    def figures(self, train_time_s: float) -> Dict[str, float]:
        """The last step's logs and the split of this attempt's time."""
        generation, scoring = (round(self.times[key], 3) for key in ("generation_time_s", "scoring_time_s"))
        return {**{key: round(value, 5) for key, value in self.last_logs.items()},
                "generation_time_s": generation, "scoring_time_s": scoring,
                "optimisation_time_s": round(max(train_time_s - generation - scoring, 0.0), 3)}

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()


def reward_log_name(name: str) -> str:
    """The log key of one reward's mean: ``reward_<name>``; a user's ``package.module:function`` by its function."""
    return f"reward_{name.rsplit(':', 1)[-1]}"


class KeptExperience(L.Callback):
    """Saves the loss's generation batch in the loop's checkpoints and gives it back on resume."""

    def __init__(self, loss: GroupPolicyLoss):
        self.loss = loss

    def state_dict(self) -> Dict[str, Any]:
        return self.loss.experience()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.loss.restore(state)


class ReferenceRefresh(L.Callback):
    """Every ``every`` optimiser steps the reference becomes alpha * policy + (1 - alpha) * reference (TRL's
    sync_ref_model; alpha 1: a copy). Its state, the reference's weights included, is saved in the loop's
    checkpoints, so a resumed run goes on from the reference the interrupted one had."""

    def __init__(self, policy, reference, every: int, alpha: float):
        self.policy, self.reference, self.every, self.alpha = policy, reference, every, alpha
        self.refreshed_at = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step and step % self.every == 0 and step != self.refreshed_at:
            with torch.no_grad():
                for ref, new in zip(self.reference.parameters(), self.policy.parameters()):
                    ref.mul_(1 - self.alpha).add_(new.detach().to(ref.dtype), alpha=self.alpha)
            self.refreshed_at = step

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"refreshed_at": self.refreshed_at}
        if self.refreshed_at:
            state["reference"] = {k: v.detach().clone() for k, v in self.reference.state_dict().items()}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.refreshed_at = state["refreshed_at"]
        if "reference" in state:
            self.reference.load_state_dict(state["reference"])
