"""``reward_model``: a scalar reward learned from preference pairs (Bradley–Terry), as RLHF's reward model.

A sequence-classification head (one output) on the starting causal LM: the previous stage's
model, else the run's weights, else the embedded baseline. It trains the whole classifier, or
LoRA adapters with the head (``lora_rank > 0``), on ``data=preference`` pairs (the package's
Text2SQL pairs on ``data=embedded`` or without a path), through the shared training loop. It
hands no model on: its product is ``<stage dir>/reward_model``, a directory that
``AutoModelForSequenceClassification.from_pretrained`` loads as is, scored on the held-out pairs
(accuracy, margin, length bias).

This module imports without torch: the planner loads every plugin. The stage is ``stage.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from llmexp.data.preference import preference_data
from llmexp.sdk import (
    LINEAR_SHAPES, Metric, MetricKind, TrainingConfig, TrainingTechnique, UserError, count_parameters, hookimpl,
    lora_parameters, lora_targets, node_path, training_problems,
)


@dataclass
class RewardModelConfig(TrainingConfig):
    """Bradley–Terry training of a reward model: loss = -log σ(r(chosen) - r(rejected) - margin).

    ``margin`` applies to every pair without a numeric ``margin`` field of its own (TRL's
    RewardTrainer reads the same field); ``center_rewards_coefficient`` adds that times the mean
    of (r(chosen) + r(rejected))² so rewards stay centred on 0 (Eisenstein et al. 2023, as in
    TRL). ``lora_rank`` 0 trains every weight; above 0 only LoRA adapters on ``target_modules``
    and the score head.
    """

    name: str = "reward_model"
    # the embedded Text2SQL pairs (135 to train on): of lr 1e-4, 3e-4, 1e-3, 3e-3 and 80, 150, 300 steps, 3e-4 for
    # 150 steps had the lowest held-out loss; more steps or a higher rate fit the training pairs, not the held-out
    max_steps: int = 150
    lr: float = 3e-4
    warmup_steps: int = 20
    val_every: int = 50
    margin: float = 0.0
    center_rewards_coefficient: float = 0.0
    lora_rank: int = 0
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])


def classifier_parameters(model: Dict[str, Any]) -> int:
    """Parameters of the classifier on a causal LM with architecture numbers ``model``: its backbone (embeddings
    once, layers, final norm) and a hidden_size x 1 score head in place of the LM head."""
    return count_parameters({**model, "tie_word_embeddings": True}) + model["hidden_size"]



class RewardModel(TrainingTechnique):
    """Training of the classifier on a chosen and a rejected sequence per pair: activations of twice the
    micro-batch, one output per token from the head instead of the vocabulary's logits."""

    name = "reward_model"
    schema = RewardModelConfig
    produces_model = False  # its classifier scores text; it is not a model the next stage continues
    adapts_base = True
    requires = (*TrainingTechnique.requires, "peft")
    entry = "llmexp.plugins.reward.stage:run_reward_model"

    @classmethod
    def memory_per_device(cls, config, key: str, node, model: Dict[str, Any], precision: str,
                          layout) -> Dict[str, float]:
        # the head's output is one number per token, not the vocabulary's logits: a "vocabulary" of 1
        activations = layout.activations({**model, "vocab_size": 1}, precision, sequences_per_example=2)
        if node.lora_rank <= 0:
            trained = classifier_parameters(model)
            return {"weights": layout.weights(trained, precision), "gradients": layout.weights(trained, precision),
                    "optimizer": layout.optimizer(trained, precision), "activations": activations}
        adapter = cls.trainable_parameters(config, node, model)
        return {"weights": layout.weights(classifier_parameters(model), precision),
                "adapter": layout.fp32_values(adapter), "gradients": layout.fp32_values(adapter),
                "optimizer": layout.adam_moments(adapter), "activations": activations}

    @classmethod
    def trainable_parameters(cls, config, node, model: Dict[str, Any]) -> int:
        """Full training: the starting model's count, as the plan compares techniques on the model they start from
        (the classifier swaps the LM head for a hidden x 1 head; ``memory_per_device`` counts its own weights). With
        LoRA: rank*(in + out) per adapted linear layer in every layer, and the head."""
        if node.lora_rank <= 0:
            return count_parameters(model)
        return lora_parameters(model, node.lora_rank, node.target_modules) + model["hidden_size"]

    @classmethod
    def metrics(cls, config, node) -> Tuple[Metric, ...]:
        """Held-out pairs (``diagnostics.py``): how often the chosen side scores higher, by how much, and whether
        the reward follows length rather than quality; then what training cost."""
        return (
            Metric("pairwise_accuracy", True, "held-out pairwise accuracy", MetricKind.QUALITY),
            Metric("reward_margin", True, "mean reward margin", MetricKind.INFO),
            Metric("reward_length_correlation", False, "reward-length correlation", MetricKind.INFO),
            Metric("longer_preferred", False, "longer preferred", MetricKind.INFO),
            Metric("chosen_longer", False, "chosen longer (data)", MetricKind.INFO),
        ) + super().metrics(config, node)

    @classmethod
    def plan_problems(cls, config, key: str, node, plan) -> List[str]:
        """Its settings, the pairs it reads (their held-out share scores it), and LoRA's targets and layout."""
        field = node_path(key)
        problems = super().plan_problems(config, key, node, plan) + training_problems(node, field)
        problems += settings_problems(node, field)
        if node.lora_rank > 0:
            problems += lora_problems(config, node, field)
        try:
            train, held_out = preference_data(config.data)
        except UserError as error:
            return problems + [str(error)]
        if not train:
            problems.append(f"{field}: the preference data holds no training pairs; check data.path and "
                            "data.validation_split.")
        if not held_out:
            or_file = " or give data.validation_path=<pairs.jsonl>" if "validation_path" in config.data else ""
            problems.append(
                f"{field} (technique=reward_model) scores its reward model on held-out pairs, and the data holds none "
                f"(data.validation_split={config.data.validation_split}); set data.validation_split=0.1{or_file}.")
        return problems


def settings_problems(node, field: str) -> List[str]:
    """Values of the reward model's own settings that cannot work."""
    problems = []
    if not math.isfinite(node.margin):
        problems.append(f"{field}.margin={node.margin} is not a number; give the reward gap a chosen response must "
                        "clear, e.g. 0 (plain Bradley–Terry) or 1.")
    if not (math.isfinite(node.center_rewards_coefficient) and node.center_rewards_coefficient >= 0):
        problems.append(f"{field}.center_rewards_coefficient={node.center_rewards_coefficient} must be 0 (off) or "
                        "positive; 0.01 is usual.")
    if node.lora_rank < 0:
        problems.append(f"{field}.lora_rank={node.lora_rank} is negative; set it to 0 (train every weight) or a "
                        "LoRA rank such as 16.")
    if node.lora_rank > 0 and node.lora_alpha < 1:
        problems.append(f"{field}.lora_alpha={node.lora_alpha} must be at least 1 (twice lora_rank is usual).")
    if not 0 <= node.lora_dropout < 1:
        problems.append(f"{field}.lora_dropout={node.lora_dropout} must be in [0, 1).")
    return problems


def lora_problems(config, node, field: str) -> List[str]:
    """Targets a Llama-style layer has; no tensor parallelism (PEFT's adapter layers are not the layers tp splits)."""
    problems = []
    unknown = [name for name in lora_targets(node.target_modules) if name not in LINEAR_SHAPES]
    if unknown:
        problems.append(f"{field}.target_modules names {', '.join(unknown)}, which a {config.model.name} layer does "
                        f"not have; choose from {', '.join(LINEAR_SHAPES)} or [all-linear].")
    if config.parallelism.tp > 1:
        problems.append(
            f"parallelism.tp={config.parallelism.tp} with {field}.lora_rank={node.lora_rank}: tensor parallelism "
            "splits the linear layers LoRA's adapters wrap; train with parallelism.tp=1, or with "
            f"{field}.lora_rank=0.")
    return problems


@hookimpl
def llmexp_techniques():
    return [RewardModel]
