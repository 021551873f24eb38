"""Post-training quantization through NVIDIA ModelOpt: calibrate, quantize, save, export.

``mtq.quantize`` gives the model's linear layers (and, for KV-cache formats, its attention's
k/v matmuls) quantizers calibrated by running the model over the run's data. The result is
still a transformers model whose forward simulates the format (fake quantization), so the
next stage evaluates it in-process. It is saved through ModelOpt's Hugging Face checkpointing
(the weights plus ``modelopt_state.pth``), which ``llmexp.models.loading.load_model`` restores
exactly. ``<stage dir>/export`` is ModelOpt's unified HF checkpoint, the one TensorRT-LLM
and vLLM load; its size is the size reported, the model's deployed size.
"""

from __future__ import annotations

import contextlib
import copy
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from llmexp.sdk import model_numbers_from_hf_config
from llmexp.sdk import UserError
from llmexp.sdk import enable_modelopt_checkpointing, export_unified_checkpoint, model_stats, run_device, save_model, starting_model
from llmexp.sdk import stage_node_path
from llmexp.sdk import architecture
from llmexp.data.blocks import calibration_blocks
from llmexp.plugins.quantize import NO_MODEL, block_size, group_size_problems, runs_natively
from llmexp.plugins.quantize.formats import FORMATS, Format
from llmexp.sdk import Progress
from llmexp.sdk import ModelArtifact, StageContext, StageResult


def quantize(ctx: StageContext) -> StageResult:
    """Quantize a copy of the stage's input model to ``format``; save it to ``model/`` and export it to ``export/``."""
    node, cfg = ctx.stage_config, ctx.config
    field = stage_node_path(ctx)
    preset = FORMATS[node.format]  # the plan hook refuses unknown formats
    device = _device(cfg.hardware, node.format, preset)
    start = starting_model(ctx)  # a copy when an earlier stage made it: later stages may start from it too
    if start is None:
        raise UserError(NO_MODEL.format(field=field))
    # the plan checked the run's model; an earlier stage (a width prune) may have changed the widths
    numbers = architecture(model_numbers_from_hf_config(start.model.config.to_dict()))
    problems = group_size_problems(node, preset, numbers, field)
    if problems:
        raise UserError(" ".join(problems))
    blocks = calibration_blocks(cfg, start.tokenizer, node.calibration_size, f"{field}.calibration_size")
    group_size = block_size(node, preset)

    enable_modelopt_checkpointing()  # before saving: save_pretrained then writes modelopt_state.pth too
    with contextlib.redirect_stdout(sys.stderr):  # ModelOpt prints progress; stdout keeps the results
        clock = time.perf_counter()
        model = quantize_model(start.model.to(device), preset, group_size, blocks, cfg.parallelism.micro_batch or 16)
        seconds = time.perf_counter() - clock
        model_dir = Path(ctx.stage_dir) / "model"
        save_model(model, start.tokenizer, model_dir)
        with tempfile.TemporaryDirectory(dir=ctx.stage_dir) as scratch:  # export=false still measures the size
            export_dir = Path(ctx.stage_dir) / "export" if node.export else Path(scratch)
            clock = time.perf_counter()
            export_unified_checkpoint(model, start.tokenizer, export_dir)
            export_seconds = time.perf_counter() - clock
            stats = model_stats(model, export_dir, precision=node.format)

    stats.update(
        format=node.format,
        simulated=not runs_natively(preset, cfg.hardware),
        weight_bits=preset.weight_bits,
        activation_bits=preset.activation_bits,
        kv_cache_bits=preset.kv_cache_bits,
        export_path=str(export_dir) if node.export else None,
    )
    metrics: Dict[str, Any] = {
        "calibration_time_s": round(seconds, 3),
        "calibration_sequences": len(blocks),
        "calibration_tokens": blocks.numel(),
        "quantized_modules": quantized_modules(model),
        "export_time_s": round(export_seconds, 3),
    }
    if group_size is not None:
        metrics["group_size"] = group_size
    artifacts = {"model": str(model_dir), **({"export": str(export_dir)} if node.export else {})}
    return StageResult(
        metrics=metrics,
        model=ModelArtifact(model, start.tokenizer, model_dir, produced_by=ctx.stage_name),
        artifacts=artifacts,
        model_stats=stats,
    )


def quantize_model(model, preset: Format, group_size: Optional[int], blocks: torch.Tensor, batch_size: int):
    """``model`` quantized in place to ``preset`` (blocks of ``group_size``), calibrated on ``blocks``, in eval mode."""
    import modelopt.torch.quantization as mtq

    model.eval()
    return mtq.quantize(model, modelopt_config(preset, group_size), _calibration_loop(blocks, batch_size))


def modelopt_config(preset: Format, group_size: Optional[int]) -> Dict[str, Any]:
    """The preset's ModelOpt config with its changes: the block size, the unlisted quantizers turned off."""
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(getattr(mtq, preset.modelopt_config))
    entries = config["quant_cfg"]
    if preset.only_listed_quantizers:
        entries.insert(0, {"quantizer_name": "*", "enable": False})  # later entries override earlier ones
    for entry in entries:
        attributes = entry.get("cfg") or []
        for quantizer in attributes if isinstance(attributes, list) else [attributes]:  # a list: W4A8's two steps
            if group_size is not None and "block_sizes" in quantizer:
                quantizer["block_sizes"][-1] = group_size
    if preset.algorithm is not None:
        config["algorithm"] = {"method": preset.algorithm}
    return config


def quantized_modules(model) -> int:
    """Modules with at least one enabled quantizer: linear layers, and attentions whose KV cache is quantized."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    owners = {
        re.sub(r"\.\w+_quantizer(\.\d+)?$", "", name)  # W4A8's weight quantizer is a sequence: ...weight_quantizer.0
        for name, module in model.named_modules()
        if isinstance(module, TensorQuantizer) and module.is_enabled
    }
    return len(owners)


def _calibration_loop(blocks: torch.Tensor, batch_size: int) -> Callable:
    """ModelOpt's ``forward_loop``: the model over every calibration batch without grad, showing a
    progress bar per pass (AWQ makes two: statistics, then the search)."""

    def forward_loop(model) -> None:
        device = next(model.parameters()).device
        batches = blocks.split(batch_size)
        with Progress("calibrate", unit="batch", transient=True) as progress, torch.no_grad():
            for batch in progress.track(batches, total=len(batches), description=""):
                model(input_ids=batch.to(device), use_cache=False)

    return forward_loop


def _device(hardware, name: str, preset: Format) -> torch.device:
    """The CPU on hardware=cpu (the plan refuses CUDA-only formats there), else the GPU, which must exist."""
    simulated = ", ".join(other for other, p in FORMATS.items() if not p.cuda_only)
    why = f" (format={name} runs only on CUDA: ModelOpt's kernels for it)" if preset.cuda_only else ""
    return run_device(hardware, f"{why}; hardware=cpu simulates {simulated}")
