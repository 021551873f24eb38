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
from typing import List, Tuple

from llmexp.sdk import hookimpl
from llmexp.sdk import TrainingConfig, TrainingTechnique


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


class SFT(TrainingTechnique):
    name = "sft"
    schema = SFTConfig
    backends = ("torch", "megatron")

    measured_by = classmethod(_package_text2sql)
    adapts_base = True
    entry = "llmexp.plugins.customize.stages:run_sft"


class LoRA(TrainingTechnique):
    name = "lora"
    schema = LoRAConfig
    memory = "adapter"
    requires = (*TrainingTechnique.requires, "peft")

    measured_by = classmethod(_package_text2sql)
    adapts_base = True
    entry = "llmexp.plugins.customize.stages:run_lora"


class DPO(TrainingTechnique):
    name = "dpo"
    schema = DPOConfig
    memory = "preference"

    measured_by = classmethod(_package_text2sql)
    adapts_base = True
    entry = "llmexp.plugins.customize.stages:run_dpo"


TECHNIQUES = (SFT, LoRA, DPO)


@hookimpl
def llmexp_techniques():
    return list(TECHNIQUES)


@hookimpl
def llmexp_plan_problems(config, plan):
    """Checks every customization stage of the pipeline, its data files included, before the run starts."""
    from llmexp.sdk import node_path, stage_nodes
    from llmexp.plugins.customize.checks import stage_problems

    names = {cls.name for cls in TECHNIQUES}
    return [
        problem
        for key, node in stage_nodes(config, strict=False)
        if node.get("name") in names
        for problem in stage_problems(config, node, node_path(key))
    ]
