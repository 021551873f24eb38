"""The base a stage adapts: the model it starts from, else the embedded baseline, loaded from its cache or trained now.

The baseline is trained by running its ``model.baseline`` node (pretrain) as a stage of its
own, so it lives beside the runner rather than in ``llmexp.models.embedded_baseline``, which
says where it is cached and whether a run has one without running anything. It trains in
``<fingerprint>.partial/`` under a file lock (a second run waits, then reuses it; an
interrupted one resumes from its checkpoints) and is renamed into place when complete, so a
directory under its final name is always whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from filelock import FileLock
from omegaconf import OmegaConf

from llmexp.atomic import replace_atomically
from llmexp.configuration.pipeline import stage_node_path
from llmexp.display import console
from llmexp.errors import UserError
from llmexp.models import embedded_baseline
from llmexp.models.checkpoint import validate_checkpoint_dir
from llmexp.models.loading import load_model, starting_model
from llmexp.models.starting_weights import no_base_message
from llmexp.techniques import plugin_manager
from llmexp.techniques.contract import ModelArtifact, StageContext
from llmexp.training import distributed
from llmexp.training.loop import CHECKPOINT_DIR


def base_model(ctx) -> ModelArtifact:
    """What a stage that adapts a base starts from: ``starting_model``, else the embedded baseline where the
    model trains one. Without either the plan refuses the run (``llmexp.models.starting_weights.base_problems``);
    a stage run without a plan gets the same refusal here.
    """
    start = starting_model(ctx)
    if start is not None:
        return start
    if embedded_baseline.available(ctx.config):
        return load_or_train(ctx)
    raise UserError(no_base_message(ctx.config, stage_node_path(ctx), ctx.stage_config.name))


def load_or_train(ctx) -> ModelArtifact:
    """The baseline of ``ctx.config``: the cached one, else trained now and cached."""
    path = embedded_baseline.directory(ctx.config)
    lead = distributed.is_rank_zero()
    if lead:
        path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{path}.lock") if lead else contextlib.nullcontext()
    with lock:  # one run trains a baseline; another with the same settings waits here, then reuses it
        if distributed.decided_by_rank_zero(lambda: _usable(path)):
            _say(f"{ctx.stage_name}: starting from the embedded baseline cached at {path} (same model, data, "
                 "seed, precision and backend; delete that directory to train it again)")
            model, tokenizer = load_model(path / "model")
            return ModelArtifact(model, tokenizer, path / "model", produced_by=embedded_baseline.STAGE)
        _say(f"{ctx.stage_name}: no base model (model.path unset, no earlier stage made one), so the embedded "
             f"baseline is trained first ({embedded_baseline.recipe(ctx.config)}) and cached at {path} for later runs")
        return _train(ctx, path)


def _usable(path: Path) -> bool:
    """A finished baseline whose saved model is whole; a damaged one is removed (and trained again)."""
    if not embedded_baseline.is_finished(path):
        return False
    try:
        validate_checkpoint_dir(path / "model")
        return True
    except UserError as error:
        console.warn(f"the cached embedded baseline at {path} is unusable, so it is trained again ({error})")
        shutil.rmtree(path)
        return False


def _train(ctx, path: Path) -> ModelArtifact:
    config = embedded_baseline.baseline_config(ctx.config)
    partial = path.with_name(f"{path.name}.partial")
    stage = StageContext(config, config.technique, partial, None, ctx.tracker, embedded_baseline.STAGE)
    result = plugin_manager.technique(config.technique.name)().run(stage)
    if distributed.is_rank_zero():
        record = {"config": OmegaConf.to_container(config, resolve=True), "metrics": result.metrics,
                  "model_stats": result.model_stats, "trained_by": ctx.stage_name}
        replace_atomically(partial / embedded_baseline.RECORD,
                           lambda handle: json.dump(record, handle, indent=2, default=str))
        shutil.rmtree(partial / CHECKPOINT_DIR, ignore_errors=True)  # resumable training state, no longer needed
        os.replace(partial, path)
    _say(f"{ctx.stage_name}: embedded baseline trained and cached at {path}")
    return ModelArtifact(result.model.model, result.model.tokenizer, path / "model", produced_by=embedded_baseline.STAGE)


def _say(message: str) -> None:
    if distributed.is_rank_zero():
        console.note(message)
