"""Megatron-Bridge's training recipes as a technique: ``technique=bridge_recipe technique.recipe=<name>``.

NeMo's LLM training lives in Megatron-Bridge now (nemo-toolkit 3.x carries speech only). Its
recipes (``megatron.bridge.recipes``: Llama 3.x, Qwen, DeepSeek, Nemotron … pretrain, SFT and
PEFT configs tuned per model) are run as they are, not re-implemented: ``recipe.py`` calls the
recipe function, lays our ``parallelism``, ``precision``, batch sizes, steps and seed over the
``ConfigContainer`` it returns (then ``technique.overrides``, by dotted path), trains through
Bridge's ``pretrain``/``finetune`` and exports the result as a Hugging Face checkpoint, so the
stages after it (evaluate, quantize, export) see an ordinary model.

Needs megatron-bridge with Transformer Engine and CUDA GPUs (NVIDIA's NeMo container has
them). This module imports neither: the planner loads every plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from llmexp.sdk import Technique, TechniqueConfig, count_parameters, hookimpl, node_path

MODES = ("pretrain", "finetune")  # Bridge's two entry points; PEFT is finetune with a peft recipe
# our precision -> Bridge's mixed-precision recipe (megatron.bridge.training.mixed_precision)
MIXED_PRECISION = {
    "bf16": "bf16_mixed",
    "fp16": "fp16_mixed",
    "fp8": "bf16_with_fp8_delayed_scaling_mixed",
    "fp4": "bf16_with_nvfp4_mixed",
}


@dataclass
class BridgeRecipeConfig(TechniqueConfig):
    """Which recipe, how to call it, and what to change in the ``ConfigContainer`` it returns."""

    name: str = "bridge_recipe"
    # a function of megatron.bridge.recipes ("llama.llama32_1b_sft_config") or any "module:function"
    recipe: str = ""
    recipe_kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to the recipe function
    mode: str = "finetune"  # pretrain | finetune (SFT and PEFT recipes)
    max_steps: Optional[int] = None  # train.train_iters; None keeps the recipe's
    lr: Optional[float] = None  # optimizer.lr and scheduler.max_lr; None keeps the recipe's
    # dotted paths into the ConfigContainer, applied last: {"dataset.seq_length": 4096, "train.eval_iters": 0}
    overrides: Dict[str, Any] = field(default_factory=dict)
    export_hf: bool = True  # write the trained weights as a Hugging Face checkpoint (<stage dir>/model)


class BridgeRecipe(Technique):
    name = "bridge_recipe"
    schema = BridgeRecipeConfig
    memory = "full"  # planned as full training of the run's model, whatever the recipe's own
    produces_model = True
    requires = ("torch", "megatron.core", "megatron.bridge")  # megatron-bridge: NVIDIA's NeMo container or its wheel

    entry = "llmexp.plugins.megatron_bridge.recipe:run"

    @classmethod
    def memory_per_device(cls, config, key: str, node, model: Dict[str, Any], precision: str,
                          layout) -> Dict[str, float]:
        return layout.training_memory(model, precision)

    @classmethod
    def trainable_parameters(cls, config, node, model: Dict[str, Any]) -> int:
        return count_parameters(model)

    @classmethod
    def plan_problems(cls, config, key: str, node, plan) -> List[str]:
        """A recipe named, a known mode, a GPU, a precision Bridge has a recipe for."""
        where = node_path(key)
        problems: List[str] = []
        if not node.recipe:
            problems.append(
                f"{where}.recipe is empty; name a Megatron-Bridge recipe function, e.g. {where}.recipe="
                "llama.llama32_1b_sft_config (a function of megatron.bridge.recipes) or my_pkg.recipes:my_config.")
        if node.mode not in MODES:
            problems.append(f"{where}.mode={node.mode} is not known; choose {' or '.join(MODES)}.")
        if config.hardware.accelerator != "gpu":
            problems.append(
                f"{where}: Megatron-Bridge trains on CUDA GPUs and hardware={config.hardware.name}; choose a GPU "
                "preset (hardware=h100, ...) and run it where megatron-bridge is installed (NVIDIA's NeMo container).")
        precision = getattr(config.precision, "value", config.precision)
        if precision not in MIXED_PRECISION and precision != "fp32":
            problems.append(f"precision={precision} has no Megatron-Bridge mixed-precision recipe; use one of "
                            f"fp32, {', '.join(MIXED_PRECISION)}.")
        if node.max_steps is not None and node.max_steps < 1:
            problems.append(f"{where}.max_steps={node.max_steps} must be 1 or more (or null for the recipe's).")
        return problems

    @classmethod
    def machine_problems(cls, config, node, field: str) -> List[str]:
        """Bridge, megatron-core and Transformer Engine installed, and an NVIDIA GPU."""
        from llmexp.sdk import gpu_driver_present, importable

        problems = []
        missing = [m for m in ("megatron.core", "megatron.bridge", "transformer_engine") if not importable(m)]
        if missing:
            problems.append(
                f"{field}: technique=bridge_recipe needs megatron-bridge with Transformer Engine ({', '.join(missing)} "
                "missing here): pip install 'llmexp[megatron]' megatron-bridge on a CUDA machine, or run in NVIDIA's "
                "NeMo container (nvcr.io/nvidia/nemo), which has all three.")
        if not gpu_driver_present():
            problems.append(f"{field}: technique=bridge_recipe trains on CUDA GPUs and this machine has no NVIDIA "
                            "driver; run it on a GPU node (hydra/launcher=slurm cluster=...).")
        return problems


@hookimpl
def llmexp_techniques():
    return [BridgeRecipe]
