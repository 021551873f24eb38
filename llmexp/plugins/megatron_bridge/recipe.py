"""Runs a Megatron-Bridge recipe with this run's settings laid over it (see the package docstring).

``run_settings`` and ``apply_settings`` are plain Python over dotted paths, so what our config
changes in a recipe is tested without Bridge; ``run`` needs megatron-bridge and CUDA GPUs.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any, Callable, Dict

from llmexp.sdk import distributed
from llmexp.sdk import UserError
from llmexp.sdk import input_model, load_model, model_stats
from llmexp.sdk import stage_node_path
from llmexp.plugins.megatron_bridge import MIXED_PRECISION
from llmexp.sdk import MegatronBackendConfig
from llmexp.sdk import ModelArtifact, StageContext, StageResult

RECIPES_PACKAGE = "megatron.bridge.recipes"


def resolve_recipe(name: str, field: str = "technique.recipe") -> Callable[..., Any]:
    """``module:function``, or ``family.function`` under ``megatron.bridge.recipes``."""
    module_name, _, function = name.rpartition(":") if ":" in name else name.rpartition(".")
    if ":" not in name:
        module_name = f"{RECIPES_PACKAGE}.{module_name}" if module_name else RECIPES_PACKAGE
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise UserError(f"{field}={name}: module {module_name} cannot be imported ({error}); name a recipe as "
                        "family.function_config (e.g. llama.llama32_1b_sft_config) or module:function.") from None
    recipe = getattr(module, function, None)
    if not callable(recipe):
        known = sorted(n for n in dir(module) if n.endswith("_config") and callable(getattr(module, n)))
        raise UserError(f"{field}={name}: {module_name} has no recipe {function!r}; it has "
                        f"{', '.join(known[:12]) or 'none'}{' …' if len(known) > 12 else ''}.")
    return recipe


def run_settings(cfg, node, stage_dir: Path) -> Dict[str, Any]:
    """Dotted ``ConfigContainer`` paths -> values: our layout, precision, batch, steps and seed, then ``overrides``.

    A recipe runs on megatron whatever ``backend`` says: its settings are ``backend=megatron``'s, or
    that option's defaults when the run keeps the default ``backend=torch``, which has none.
    """
    p = cfg.parallelism
    backend = cfg.backend if cfg.backend.name == "megatron" else MegatronBackendConfig()
    precision = getattr(cfg.precision, "value", cfg.precision)
    settings: Dict[str, Any] = {
        "model.tensor_model_parallel_size": p.tp,
        "model.pipeline_model_parallel_size": p.pp,
        "model.virtual_pipeline_model_parallel_size": backend.virtual_pipeline_stages,
        "model.sequence_parallel": backend.sequence_parallel,
        "train.global_batch_size": p.global_batch,
        "train.micro_batch_size": p.micro_batch,
        "ddp.use_distributed_optimizer": backend.distributed_optimizer,
        "rng.seed": cfg.seed,
        "checkpoint.save": str(stage_dir / "megatron"),
    }
    if precision in MIXED_PRECISION:
        settings["mixed_precision"] = MIXED_PRECISION[precision]
    if node.max_steps is not None:
        settings["train.train_iters"] = node.max_steps
    if node.lr is not None:
        settings["optimizer.lr"] = node.lr
        settings["scheduler.max_lr"] = node.lr
    settings.update(dict(node.overrides))
    return settings


def apply_settings(container: Any, settings: Dict[str, Any], field: str = "technique.overrides") -> None:
    """Set each dotted path on ``container``; a path that names no existing attribute is refused, not created."""
    for path, value in settings.items():
        *parents, leaf = path.split(".")
        target = container
        for depth, part in enumerate(parents):
            if not hasattr(target, part):
                raise UserError(f"{field}: {'.'.join(parents[:depth + 1])} is not a field of the recipe's "
                                f"ConfigContainer (in {path}); check the name against the recipe.")
            target = getattr(target, part)
        if not hasattr(target, leaf):
            raise UserError(f"{field}: {path} is not a field of the recipe's ConfigContainer; check the name "
                            "against the recipe (a misspelled key would otherwise be ignored).")
        setattr(target, leaf, value)


def run(ctx: StageContext) -> StageResult:
    cfg, node = ctx.config, ctx.stage_config
    field = stage_node_path(ctx)
    start = input_model(ctx)
    source = Path(start.path) if start is not None and start.path is not None else None
    if node.export_hf and source is None:
        raise UserError(
            f"{field}.export_hf=true needs a Hugging Face checkpoint to describe the trained model: set model.path "
            f"(or put a stage that saves a model before this one), or set {field}.export_hf=false to keep only "
            "Megatron checkpoints.")
    from megatron.bridge import AutoBridge
    from megatron.bridge.training.gpt_step import forward_step

    container = resolve_recipe(node.recipe, f"{field}.recipe")(**dict(node.recipe_kwargs))
    settings = run_settings(cfg, node, ctx.stage_dir)
    if source is not None:  # start from the model so far: Bridge reads Megatron checkpoints
        imported = ctx.stage_dir / "imported"
        if distributed.is_rank_zero() and not imported.exists():
            AutoBridge.import_ckpt(str(source), str(imported))
        _barrier()
        settings = {"checkpoint.pretrained_checkpoint": str(imported), **settings}
    apply_settings(container, settings, f"{field}.overrides")
    entry = _entry_point(node.mode)
    started = time.perf_counter()
    entry(container, forward_step)
    metrics = {"steps": container.train.train_iters, "train_time_s": round(time.perf_counter() - started, 3)}
    if not node.export_hf:
        return StageResult(metrics=metrics, artifacts={"megatron": str(ctx.stage_dir / "megatron")})
    model_dir = ctx.stage_dir / "model"
    if distributed.is_rank_zero():
        AutoBridge.from_hf_pretrained(str(source)).export_ckpt(str(ctx.stage_dir / "megatron"), str(model_dir))
        if start.tokenizer is not None:
            start.tokenizer.save_pretrained(str(model_dir))
    _barrier()
    model, tokenizer = load_model(model_dir)
    return StageResult(
        metrics=metrics,
        model=ModelArtifact(model, tokenizer, model_dir, produced_by=ctx.stage_name),
        artifacts={"model": str(model_dir), "megatron": str(ctx.stage_dir / "megatron")},
        model_stats=model_stats(model, model_dir),
    )


def _entry_point(mode: str) -> Callable[..., None]:
    from megatron.bridge.training.finetune import finetune
    from megatron.bridge.training.pretrain import pretrain

    return {"pretrain": pretrain, "finetune": finetune}[mode]


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
