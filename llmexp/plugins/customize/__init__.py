"""Customization techniques: ``sft`` (full fine-tuning), ``lora`` (PEFT adapters) and ``dpo``.

They share one training loop (``llmexp.training.loop.train``); each supplies its loss and what
is trainable. On ``data=embedded`` they train on the package's Text2SQL instruction set
(``sft``, ``lora``) or its preference pairs (``dpo``), so each runs with no argument but its
name; ``data=jsonl`` / ``data=preference`` read the user's files.

This module imports without torch: the planner loads every plugin. The loops live in
``stages.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from llmexp.plugins.customize.checks import stage_problems
from llmexp.sdk import (
    LINEAR_SHAPES, TrainingConfig, TrainingTechnique, count_parameters, hookimpl, lora_parameters, lora_targets,
    node_path,
)


@dataclass
class SFTConfig(TrainingConfig):
    """Full fine-tuning on prompt/response pairs; the loss counts response tokens only."""

    name: str = "sft"
    max_steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 20
    val_every: int = 50


@dataclass
class LoRAConfig(SFTConfig):
    """LoRA through PEFT: rank-``rank`` adapters on ``target_modules``, the base frozen.

    ``merge=true`` also writes the merged model as a plain HF checkpoint (``merged/``).
    """

    name: str = "lora"
    lr: float = 1e-2
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # every linear layer of the decoder (PEFT's all-linear): on the embedded Text2SQL task
    # attention-only adapters reach 0% exact match where all-linear ones reach 80%
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    merge: bool = False


@dataclass
class DPOConfig(TrainingConfig):
    """Direct Preference Optimization (Rafailov et al. 2023) against a frozen reference model.

    The reference is the starting model; ``beta`` scales the implicit reward.
    """

    name: str = "dpo"
    max_steps: int = 200
    lr: float = 1e-3
    warmup_steps: int = 20
    val_every: int = 50
    beta: float = 0.1


def _package_text2sql(cls, config) -> Tuple[str, ...]:
    """The package's own data (data=embedded, or data=preference without a path for DPO) is its Text2SQL set
    (``llmexp.data.instructions.instruction_data``, ``llmexp.data.preference.preference_data``)."""
    data = config.data
    return ("text2sql",) if data.name == "embedded" or (data.name == "preference" and not data.path) else ()


class Customization(TrainingTechnique):
    """What the three share: a base to adapt, the Text2SQL task that measures them on the package's data, and
    the checks of their settings and data (``checks.py``)."""

    measured_by = classmethod(_package_text2sql)
    adapts_base = True

    @classmethod
    def plan_problems(cls, config, key: str, node, plan) -> List[str]:
        return super().plan_problems(config, key, node, plan) + stage_problems(config, node, node_path(key))


class SFT(Customization):
    name = "sft"
    schema = SFTConfig
    backends = ("torch", "megatron")
    pipelines = True

    entry = "llmexp.plugins.customize.stages:run_sft"


class LoRA(Customization):
    """Frozen weights in the run's precision; the adapter, its grads and Adam states in fp32 (PEFT keeps adapter
    weights in fp32). Activations are those of full training: backward still runs through every frozen layer."""

    name = "lora"
    schema = LoRAConfig
    memory = "adapter"
    pipelines = True
    requires = (*TrainingTechnique.requires, "peft")

    entry = "llmexp.plugins.customize.stages:run_lora"

    @classmethod
    def memory_per_device(cls, config, key: str, node, model: Dict[str, Any], precision: str,
                          layout) -> Dict[str, float]:
        adapter = cls.trainable_parameters(config, node, model)
        return {
            "weights": layout.weights(count_parameters(model), precision),
            "adapter": layout.fp32_values(adapter),
            "gradients": layout.fp32_values(adapter),
            "optimizer": layout.adam_moments(adapter),
            "activations": layout.activations(model, precision),
        }

    @classmethod
    def trainable_parameters(cls, config, node, model: Dict[str, Any]) -> int:
        """rank*(in + out) per adapted linear layer (in -> out), for each of ``target_modules`` in every layer."""
        return lora_parameters(model, node.rank, node.target_modules)

    @classmethod
    def plan_problems(cls, config, key: str, node, plan) -> List[str]:
        """Target modules a Llama-style layer has; no tensor parallelism (PEFT's adapter layers are not the linear
        layers tp splits)."""
        field = node_path(key)
        problems = super().plan_problems(config, key, node, plan)
        unknown = [name for name in lora_targets(node.target_modules) if name not in LINEAR_SHAPES]
        if unknown:
            model = config.model.name if config.model.path is None else f"{config.model.name} from {config.model.path}"
            problems.append(
                f"{field}.target_modules names {', '.join(unknown)}, which a {model} layer does not have; choose "
                f"from {', '.join(LINEAR_SHAPES)} or [all-linear]."
            )
        tp = config.parallelism.tp
        if tp > 1 and config.backend.name == "torch":
            problems.append(
                f"parallelism.tp={tp} with technique={cls.name}: tensor parallelism splits a model's linear layers, "
                f"and {cls.name}'s adapters wrap them; train it with parallelism.tp=1 (parallelism.dp for data "
                "parallel, with parallelism.sharding=fsdp to split the frozen weights too)."
            )
        return problems



class DPO(Customization):
    """Full training of the policy plus a frozen reference model. Each micro-batch holds a chosen and a rejected
    sequence per pair, so activations are those of twice the micro-batch; the reference runs without grad and
    keeps none."""

    name = "dpo"
    schema = DPOConfig
    memory = "preference"

    entry = "llmexp.plugins.customize.stages:run_dpo"

    @classmethod
    def memory_per_device(cls, config, key: str, node, model: Dict[str, Any], precision: str,
                          layout) -> Dict[str, float]:
        return {**layout.training_memory(model, precision),
                "activations": layout.activations(model, precision, sequences_per_example=2),
                "reference": layout.weights(count_parameters(model), precision)}


TECHNIQUES = (SFT, LoRA, DPO)


@hookimpl
def llmexp_techniques():
    return list(TECHNIQUES)
