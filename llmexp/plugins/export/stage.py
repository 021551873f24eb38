"""The export stage: checkpoint, then engine, then Triton repository, as far as ``format`` asks.

``<stage dir>/hf`` (every format but a triton export of a prebuilt engine), ``<stage dir>/engine``
(trtllm, and triton when it builds), ``<stage dir>/triton`` (triton). Each is written whole or
not at all (``directories.write_directory``); their paths are the stage's artifacts, and
``<stage dir>/export.json`` records how each was made (the checkpoint's source, the engine's
build settings, the engine served). With ``draft_model``, ``<stage dir>/trtllm_llm_api_options.yaml``
holds TensorRT-LLM's draft-target speculative decoding options for serving the checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict

from llmexp.sdk import replace_atomically
from llmexp.sdk import UserError
from llmexp.sdk import stage_node_path
from llmexp.plugins.export import builds_engine
from llmexp.plugins.export.checkpoint import write_hf_checkpoint
from llmexp.plugins.export.directories import directory_bytes, write_directory
from llmexp.plugins.export.engine_settings import read_engine
from llmexp.sdk import tokenizer_directory
from llmexp.sdk import StageContext, StageResult


def export(ctx: StageContext) -> StageResult:
    """Write what ``format`` asks for into the stage's directory; sizes and times as metrics, paths as artifacts."""
    node, cfg = ctx.stage_config, ctx.config
    field = stage_node_path(ctx)
    stage_dir = Path(ctx.stage_dir)
    metrics: Dict[str, Any] = {}
    artifacts: Dict[str, str] = {}
    manifest: Dict[str, Any] = {"format": node.format}
    checkpoint = None
    if node.format != "triton" or not node.engine_dir:
        clock = time.perf_counter()
        checkpoint, how = write_hf_checkpoint(ctx, stage_dir / "hf", field)
        metrics.update(checkpoint_bytes=directory_bytes(checkpoint),
                       checkpoint_time_s=round(time.perf_counter() - clock, 3))
        artifacts["hf"] = str(checkpoint)
        manifest.update(hf=str(checkpoint), hf_from=how)
    if node.draft_model:
        options = _write_draft_target_options(stage_dir, node, field)
        artifacts["llm_api_options"] = str(options)
        manifest.update(llm_api_options=str(options))
    if builds_engine(node):
        engine_dir, settings, seconds = _build(ctx, checkpoint, stage_dir / "engine", field)
        from llmexp.plugins.export.engine import engine_bytes

        metrics.update(engine_bytes=engine_bytes(engine_dir), engine_build_time_s=round(seconds, 3))
        artifacts["engine"] = str(engine_dir)
        manifest.update(engine=str(engine_dir), engine_settings=settings)
    else:
        engine_dir = Path(node.engine_dir) if node.engine_dir else None
    if node.format == "triton":
        from llmexp.plugins.export.triton import write_repository

        engine = read_engine(engine_dir, field)
        repository = stage_dir / "triton"
        metrics.update(write_repository(repository, engine, _tokenizer(ctx, checkpoint, field), node,
                                        cfg.parallelism, field))
        artifacts["repository"] = str(repository.resolve())
        manifest.update(repository=artifacts["repository"], engine_served=str(engine.directory),
                        repository_root=node.repository_root or artifacts["repository"])
    path = replace_atomically(stage_dir / "export.json", lambda handle: json.dump(manifest, handle, indent=2))
    artifacts["manifest"] = str(path)
    return StageResult(metrics=metrics, artifacts=artifacts)


def _write_draft_target_options(stage_dir: Path, node, field: str) -> Path:
    import yaml

    from llmexp.plugins.export.draft_target import OPTIONS_FILE, draft_checkpoint, draft_target_options

    options = draft_target_options(draft_checkpoint(node.draft_model, field), node.num_speculative_tokens)
    return replace_atomically(stage_dir / OPTIONS_FILE, lambda handle: yaml.safe_dump(options, handle, sort_keys=False))


def _build(ctx: StageContext, checkpoint: Path, engine_dir: Path, field: str):
    """``(engine_dir, settings, seconds)``: the engine built from ``checkpoint`` on this machine's GPUs."""
    from llmexp.plugins.export.engine import build_engine, require_cuda, tensorrt_llm_problem
    from llmexp.plugins.export.engine_settings import engine_build_settings

    node, cfg = ctx.stage_config, ctx.config
    problem = tensorrt_llm_problem(field, node.format)
    if problem:
        raise UserError(problem)
    require_cuda(cfg.hardware, field, node.format)
    settings = engine_build_settings(cfg, node, checkpoint, field)
    clock = time.perf_counter()
    write_directory(engine_dir, lambda temporary: build_engine(settings, checkpoint, temporary))
    return engine_dir, settings, time.perf_counter() - clock


def _tokenizer(ctx: StageContext, checkpoint, field: str):
    """The tokenizer the repository's python models use: the checkpoint's, else the input model's."""
    from transformers import AutoTokenizer

    if ctx.model is not None and checkpoint is None:
        return ctx.model.tokenizer
    source = checkpoint or tokenizer_directory(ctx.config)
    if not source:
        raise UserError(f"{field}: the Triton repository needs the model's tokenizer, and no stage before it produced "
                        "a model and model.path is unset; set model.path=<the checkpoint the engine was built from>.")
    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise UserError(f"{field}: no tokenizer could be loaded from {source} ({' '.join(str(error).split())}); the "
                        "repository's preprocessing and postprocessing need it: save it beside the weights "
                        "(tokenizer.save_pretrained).") from None
