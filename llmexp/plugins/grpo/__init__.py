"""``technique=grpo``: Group Relative Policy Optimization with verifiable rewards, a reward model or the user's own.

For each prompt the policy samples a group of completions through the serving engine, the rewards
score them, each completion's advantage is its reward against its group's (DeepSeekMath), and the
policy follows the clipped objective with a KL penalty to a frozen reference, as TRL's
GRPOTrainer computes it (``tests/test_grpo_loss.py`` holds the two equal). It starts from the
previous stage's model, else the run's weights, else the embedded baseline, like sft.

This module imports without torch (the planner loads every plugin): the schema, the plan's checks
and the memory estimate. The stage is ``stage.py``; the arithmetic ``loss.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from llmexp.plugins.grpo.prompts import training_prompts
from llmexp.plugins.grpo.rewards import reward_problems, reward_stage
from llmexp.sdk import (
    Consumed, Metric, MetricKind, Reads, TrainingConfig, TrainingTechnique, UserError, architecture, context_length,
    count_parameters, hookimpl, model_numbers_from_hf_config, node_path, read_hf_config, training_problems,
)

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")  # how per-token losses are aggregated (llmexp.plugins.grpo.loss)


@dataclass
class GRPOConfig(TrainingConfig):
    """GRPO's settings; a step is ``parallelism.global_batch`` prompts x ``group_size`` completions.

    The defaults suit the embedded word problems on a CPU: groups of 8 (DeepSeekMath used 64,
    TRL defaults to 8) give most prompts a spread of rewards at the baseline's accuracy;
    40 completion tokens hold a worked solution ("6 + 9 = 15 . 15 - 5 = 10 . #### 10" is 14) and
    generation stops at the next "Question:", as the evaluation's does.
    """

    name: str = "grpo"
    max_steps: int = 100
    # 20 steps from the embedded baseline, mean training reward of steps 1-10 -> 11-20: 0.23 -> 0.15 at 3e-3 (sft's;
    # KL 0.34 at the end), 0.30 -> 0.26 at 1e-3 (KL 0.13), 0.33 -> 0.30 at 2e-4 (KL 0.01)
    lr: float = 2e-4
    warmup_steps: int = 5
    log_every: int = 1  # every step's rewards, KL and clipping
    checkpoint_every: int = 50
    group_size: int = 8  # completions per prompt (G)
    max_completion_tokens: int = 40  # sampled tokens per completion at most
    temperature: float = 1.0  # sampling; the log-probabilities are of the same tempered distribution
    top_p: float = 1.0
    stop: List[str] = field(default_factory=lambda: ["Question:"])  # strings that end a completion
    beta: float = 0.04  # KL penalty to the reference (DeepSeekMath's 0.04; 0: no reference model at all)
    epsilon: float = 0.2  # clipping: the ratio kept within [1 - epsilon, 1 + epsilon_high]
    epsilon_high: Optional[float] = None  # None: epsilon (DAPO's clip-higher uses 0.28)
    num_iterations: int = 1  # optimiser steps per generation batch (mu); > 1 reuses its completions
    # dapo: every completion token of the step weighs the same (TRL 1.16's default, so a run compares with TRL's
    # as is; grpo's per-completion mean favours short right answers and long wrong ones, as Dr. GRPO shows)
    loss_type: str = "dapo"
    scale_rewards: bool = True  # divide advantages by the group's reward std (Dr. GRPO: false)
    kl_correction: bool = True  # KL term times the ratio: TRL 1.16's use_bias_correction_kl (its default)
    ref_refresh_steps: int = 0  # 0: the reference stays the starting model; N: refreshed every N steps
    ref_mixup_alpha: float = 1.0  # a refresh sets reference = alpha * policy + (1 - alpha) * reference
    # summed with reward_weights: exact_match, format, reward_model, or your 'package.module:function'
    rewards: List[str] = field(default_factory=lambda: ["exact_match"])
    reward_weights: List[float] = field(default_factory=list)  # one per reward; [] = all 1
    reward_model: Optional[str] = None  # an earlier reward_model stage's name, or a classifier's directory


class GRPO(TrainingTechnique):
    """Full training of the policy, a frozen reference (beta > 0) and a reward model (when rewarded by one)."""

    name = "grpo"
    schema = GRPOConfig
    memory = "grpo"
    adapts_base = True

    entry = "llmexp.plugins.grpo.stage:run_grpo"

    @classmethod
    def metrics(cls, config, node) -> Tuple[Metric, ...]:
        kl = (Metric("kl", False, "KL to the reference (last step)", MetricKind.INFO),) if node.beta else ()
        return (
            Metric("reward_mean", True, "mean reward (last step)", MetricKind.INFO),
            *kl,
            *super().metrics(config, node),
            Metric("generation_time_s", False, "generation_time_s", MetricKind.COST),
            Metric("scoring_time_s", False, "scoring_time_s", MetricKind.COST),
            Metric("optimisation_time_s", False, "optimisation_time_s", MetricKind.COST),
        )

    @classmethod
    def measured_by(cls, config) -> Tuple[str, ...]:
        """The embedded word problems' held-out test when it trains on the embedded ones; text2sql on the
        embedded preference pairs' prompts."""
        data = config.data
        if data.name == "embedded" or (data.name == "word_problems" and not data.path):
            return ("word_problems",)
        return ("text2sql",) if data.name == "preference" and not data.path else ()

    @classmethod
    def memory_per_device(cls, config, key: str, node, model: Dict[str, Any], precision: str,
                          layout) -> Dict[str, float]:
        """The policy's full training with the activations of micro_batch x group_size sequences of prompt and
        completion tokens; the reference's weights; the reward model's; the KV cache of the whole generation batch
        (global_batch x group_size sequences) as the engine decodes it."""
        sequence = layout.seq_len + node.max_completion_tokens
        per_example = node.group_size * sequence / layout.seq_len  # in sequences of seq_len tokens
        parts = {**layout.training_memory(model, precision),
                 "activations": layout.activations(model, precision, sequences_per_example=per_example),
                 "kv_cache": layout.kv_cache(model, precision) * per_example * layout.global_batch / layout.micro_batch}
        if node.beta:
            parts["reference"] = layout.weights(count_parameters(model), precision)
        if "reward_model" in node.rewards:
            parts["reward_model"] = layout.weights(count_parameters(_reward_model_numbers(config, key, node, model)),
                                                   "fp32")
        return parts

    @classmethod
    def plan_problems(cls, config, key: str, node, plan) -> List[str]:
        path = node_path(key)
        problems = super().plan_problems(config, key, node, plan) + training_problems(node, path)
        problems += _settings_problems(node, path) + _layout_problems(config, path)
        problems += _context_problems(config, node, path)
        try:
            prompts, _ = training_prompts(config.data)
        except UserError as error:
            return problems + [str(error)]
        if not prompts:
            problems.append(f"{path}: the data holds no prompts to train on; check data.path and data.problems.")
        has_answers = bool(prompts) and all(p.answer is not None for p in prompts)
        return problems + reward_problems(config, key, node, path, has_answers)

    @classmethod
    def consumes(cls, config, key: str, node) -> Tuple[Consumed, ...]:
        """The reward_model stage whose saved classifier rewards, when ``reward_model`` names one."""
        stage = reward_stage(config, key, node)
        if stage is None:
            return ()
        path = node_path(key)
        return (Consumed(f"{path}.reward_model", stage, Reads.RESULTS, technique="reward_model",
                         fix=f", or give a saved classifier's directory with {path}.reward_model"),)


def _settings_problems(node, path: str) -> List[str]:
    """Values of GRPO's own settings that must keep in range."""
    checks = [
        (node.group_size >= 2, f"{path}.group_size={node.group_size}: a group needs at least 2 completions for its "
                               "rewards to differ (advantages are rewards against their group's mean); 8 is usual."),
        (node.max_completion_tokens >= 1, f"{path}.max_completion_tokens={node.max_completion_tokens} must be at "
                                          "least 1 (40 holds a worked word-problem solution)."),
        (node.temperature > 0, f"{path}.temperature={node.temperature}: GRPO samples its groups, and at 0 every "
                               "completion of a group is the same greedy one; use a temperature such as 1.0."),
        (0 < node.top_p <= 1, f"{path}.top_p={node.top_p} must be in (0, 1] (1: no nucleus cut)."),
        (node.beta >= 0, f"{path}.beta={node.beta} must be 0 (no KL penalty) or positive (0.04 is usual)."),
        (node.epsilon > 0, f"{path}.epsilon={node.epsilon}: the clipping range must be positive (0.2 is usual)."),
        (node.epsilon_high is None or node.epsilon_high > 0,
         f"{path}.epsilon_high={node.epsilon_high} must be positive (DAPO uses 0.28), or null for epsilon."),
        (node.num_iterations >= 1, f"{path}.num_iterations={node.num_iterations} must be at least 1 (optimiser "
                                   "steps per generation batch)."),
        (node.loss_type in LOSS_TYPES, f"{path}.loss_type={node.loss_type} is not one of {', '.join(LOSS_TYPES)}."),
        (node.ref_refresh_steps >= 0, f"{path}.ref_refresh_steps={node.ref_refresh_steps} must be 0 (never) or a "
                                      "number of steps."),
        (not node.ref_refresh_steps or node.beta > 0,
         f"{path}.ref_refresh_steps={node.ref_refresh_steps} with {path}.beta=0: without the KL penalty there is "
         "no reference to refresh; set beta > 0 or ref_refresh_steps=0."),
        (0 < node.ref_mixup_alpha <= 1, f"{path}.ref_mixup_alpha={node.ref_mixup_alpha} must be in (0, 1] (1: the "
                                        "reference becomes a copy of the policy)."),
        (not node.val_every, f"{path}.val_every={node.val_every}: grpo validates no loss while it trains; set "
                             "val_every=0 and measure the trained model with an evaluation stage (the word_problems "
                             "task scores the held-out word problems)."),
    ]
    return [message for ok, message in checks if not ok]


def _context_problems(config, node, path: str) -> List[str]:
    """A prompt (cut to its last data.seq_len tokens) and its completion must fit the model's context."""
    context = context_length(config)
    needed = config.data.seq_len + node.max_completion_tokens
    if context is None or needed <= context:
        return []
    return [f"{path}.max_completion_tokens={node.max_completion_tokens} with data.seq_len={config.data.seq_len} "
            f"(the most prompt tokens kept) needs {needed} positions, and the model's context is {context}; lower "
            "one of them."]


def _layout_problems(config, path: str) -> List[str]:
    """One process: the engine samples in the training process, on its one device."""
    p = config.parallelism
    if p.tp * p.pp * p.dp == 1:
        return []
    return [f"parallelism={p.name} ({p.tp * p.pp * p.dp} ranks) with {path}=grpo: grpo samples its completions "
            "with the serving engine inside the one training process; train it with parallelism=single (set "
            "parallelism.global_batch and parallelism.micro_batch there)."]


def _reward_model_numbers(config, key: str, node, model: Dict[str, Any]) -> Dict[str, Any]:
    """The reward model's architecture numbers: its directory's config.json, else (an earlier stage's, trained from
    the same base) the policy's."""
    if node.reward_model and reward_stage(config, key, node) is None:
        try:
            return architecture(model_numbers_from_hf_config(read_hf_config(node.reward_model)))
        except UserError:
            pass  # plan_problems reports a bad reward_model directory
    return model


@hookimpl
def llmexp_techniques():
    return [GRPO]
