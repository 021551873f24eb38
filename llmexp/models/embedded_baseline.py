"""The embedded default's trained baseline: what a stage that adapts a base starts from when nothing else is given.

``llmexp technique=lora`` on the embedded default (model=tiny_llama, data=embedded, no
model.path) adapts the model its ``model.baseline`` node trains (pretrain with its defaults),
not random weights. The baseline is trained once per fingerprint of everything that decides
its weights (``baseline_config``: the model and its baseline node, the data, seed, precision,
backend, parallelism, hardware and llmexp's version) and kept in
``${LLMEXP_CACHE_DIR:-~/.cache/llmexp}/baselines/<fingerprint>/``. It trains in
``<fingerprint>.partial/`` under a file lock (a second run waits, then reuses it; an
interrupted one resumes from its checkpoints) and is renamed into place when complete, so a
directory under its final name is always whole. It is loaded like every checkpoint
(``llmexp.models.loading.load_model``: weights only).

The fingerprint and paths are pure Python: the planner tells where the baseline is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import List

from omegaconf import OmegaConf

CACHE_ENV = "LLMEXP_CACHE_DIR"
STAGE = "embedded_baseline"  # the baseline's training's name in progress lines and its tracker curve
RECORD = "baseline.json"  # written last: the settings and figures of a finished baseline
DATA = "embedded"  # the data the baseline node trains on, and that the stages adapting it read


def available(config) -> bool:
    """Whether the model trains its own baseline for this run's data (``model.baseline`` on data=embedded)."""
    return bool(config.model.get("baseline")) and config.data.name == DATA


def baseline_config(config):
    """The settings that decide the baseline's weights: the config its training runs with, and what is fingerprinted."""
    from llmexp import __version__
    return OmegaConf.create({
        "model": config.model, "technique": config.model.baseline, "data": config.data, "seed": config.seed,
        "precision": config.precision, "backend": config.backend, "parallelism": config.parallelism,
        "hardware": config.hardware, "llmexp_version": __version__,
    })


def directory(config) -> Path:
    """Where the baseline of ``config`` is cached: ``<cache>/baselines/<fingerprint>``."""
    from llmexp.training.loop import config_fingerprint

    fingerprint = hashlib.sha256(config_fingerprint(baseline_config(config)).encode()).hexdigest()[:16]
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llmexp").expanduser()
    return root / "baselines" / fingerprint


def is_finished(path: Path) -> bool:
    return (path / RECORD).is_file()


def recipe(config) -> str:
    """The baseline's technique and length, for messages."""
    node = config.model.baseline
    return f"model.baseline: technique={node.name}, {node.max_steps} steps"


def problems(config) -> List[str]:
    """Settings of ``model.baseline`` that cannot make a cached baseline (checked when a stage will use it)."""
    from llmexp.training.loop import training_problems

    node = config.model.baseline
    found = training_problems(node, "model.baseline")
    if not node.save_model:
        found.append("model.baseline.save_model=false: the embedded baseline is cached as a saved model; leave "
                     "model.baseline.save_model=true.")
    return found


def load_or_train(ctx):
    """The baseline of ``ctx.config`` as a ``ModelArtifact``: the cached one, else trained now and cached."""
    import contextlib

    from filelock import FileLock

    from llmexp.training import distributed
    from llmexp.models.loading import load_model
    from llmexp.techniques.contract import ModelArtifact

    path = directory(ctx.config)
    lead = distributed.is_rank_zero()
    if lead:
        path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{path}.lock") if lead else contextlib.nullcontext()
    with lock:  # one run trains a baseline; another with the same settings waits here, then reuses it
        if distributed.decided_by_rank_zero(lambda: _usable(path)):
            _say(f"{ctx.stage_name}: starting from the embedded baseline cached at {path} (same model, data, "
                 "seed, precision and backend; delete that directory to train it again)")
            model, tokenizer = load_model(path / "model")
            return ModelArtifact(model, tokenizer, path / "model", produced_by=STAGE)
        _say(f"{ctx.stage_name}: no base model (model.path unset, no earlier stage made one), so the embedded "
             f"baseline is trained first ({recipe(ctx.config)}) and cached at {path} for later runs")
        return _train(ctx, path)


def _usable(path: Path) -> bool:
    """A finished baseline whose saved model is whole; a damaged one is removed (and trained again)."""
    from llmexp.display import console
    from llmexp.models.checkpoint import validate_checkpoint_dir
    from llmexp.errors import UserError

    if not is_finished(path):
        return False
    try:
        validate_checkpoint_dir(path / "model")
        return True
    except UserError as error:
        console.warn(f"the cached embedded baseline at {path} is unusable, so it is trained again ({error})")
        shutil.rmtree(path)
        return False


def _train(ctx, path: Path):
    from llmexp.training import distributed
    from llmexp.techniques import plugin_manager
    from llmexp.atomic import replace_atomically
    from llmexp.techniques.contract import ModelArtifact, StageContext
    from llmexp.training.loop import CHECKPOINT_DIR

    config = baseline_config(ctx.config)
    partial = path.with_name(f"{path.name}.partial")
    stage = StageContext(config, config.technique, partial, None, ctx.tracker, STAGE)
    result = plugin_manager.technique(config.technique.name)().run(stage)
    if distributed.is_rank_zero():
        record = {"config": OmegaConf.to_container(config, resolve=True), "metrics": result.metrics,
                  "model_stats": result.model_stats, "trained_by": ctx.stage_name}
        replace_atomically(partial / RECORD, lambda handle: json.dump(record, handle, indent=2, default=str))
        shutil.rmtree(partial / CHECKPOINT_DIR, ignore_errors=True)  # resumable training state, no longer needed
        os.replace(partial, path)
    _say(f"{ctx.stage_name}: embedded baseline trained and cached at {path}")
    return ModelArtifact(result.model.model, result.model.tokenizer, path / "model", produced_by=STAGE)


def _say(message: str) -> None:
    from llmexp.display import console
    from llmexp.training import distributed
    if distributed.is_rank_zero():
        console.note(message)
