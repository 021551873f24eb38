"""The embedded default's trained baseline: what a stage that adapts a base starts from when nothing else is given.

``llmexp technique=lora`` on the embedded default (model=tiny_llama, data=embedded, no
model.path) adapts the model its ``model.baseline`` node trains (pretrain with its defaults),
not random weights. The baseline is trained once per fingerprint of everything that decides
its weights (``baseline_config``: the model and its baseline node, the data, seed, precision,
backend, parallelism, hardware and llmexp's version) and kept in
``${LLMEXP_CACHE_DIR:-~/.cache/llmexp}/baselines/<fingerprint>/``; ``llmexp.running.base_model``
loads it from there (weights only, like every checkpoint) or trains it.

This module is the pure part, fingerprint and paths: the planner tells where the baseline is.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import List

from omegaconf import OmegaConf

from llmexp import __version__
from llmexp.configuration.schema import EmbeddedDataConfig
from llmexp.configuration.training_settings import training_problems
from llmexp.data.embedded import build_world

CACHE_ENV = "LLMEXP_CACHE_DIR"
STAGE = "embedded_baseline"  # the baseline's training's name in progress lines and its tracker curve
RECORD = "baseline.json"  # written last: the settings and figures of a finished baseline
DATA = "embedded"  # the data the baseline node trains on
# Other data options the package makes from the same world when they have no data.path (word problems, preference
# pairs, the knowledge study's second world): a stage adapting a base on them starts from the baseline of that
# world's data=embedded stream.
WORLD_DATA = ("word_problems", "preference", "knowledge")
WORLD_SETTINGS = ("seed", "num_people", "heldout_documents", "validation_split")  # the block length is the stream's own


def available(config) -> bool:
    """Whether the model trains its own baseline for this run's data (``model.baseline`` on the embedded world's data)."""
    if not config.model.get("baseline"):
        return False
    data = config.data
    return data.name == DATA or (data.name in WORLD_DATA and not data.get("path"))


def baseline_data(data):
    """The data the baseline trains on: ``data=embedded`` of the same world as the run's data (the same fingerprint
    whichever of the world's options the run reads, so they share one cached baseline)."""
    if data.name == DATA:
        return data
    return OmegaConf.merge(OmegaConf.structured(EmbeddedDataConfig), {key: data[key] for key in WORLD_SETTINGS})


def baseline_config(config):
    """The settings that decide the baseline's weights: the config its training runs with, and what is fingerprinted."""
    return OmegaConf.create({
        "model": config.model, "technique": config.model.baseline, "data": baseline_data(config.data), "seed": config.seed,
        "precision": config.precision, "backend": config.backend, "parallelism": config.parallelism,
        "hardware": config.hardware, "llmexp_version": __version__,
    })


def directory(config) -> Path:
    """Where the baseline of ``config`` is cached: ``<cache>/baselines/<fingerprint>``."""
    # the settings as canonical JSON (they hold no secret: no tracker, no endpoint), with the tokenizer's words: it is
    # saved beside the weights, so a baseline cached before the vocabulary grew is not reused
    settings = OmegaConf.to_container(baseline_config(config), resolve=True)
    settings["vocabulary"] = build_world(config.data.seed, config.data.num_people).vocabulary()
    settings = json.dumps(settings, sort_keys=True, default=str)
    fingerprint = hashlib.sha256(settings.encode()).hexdigest()[:16]
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
    node = config.model.baseline
    found = training_problems(node, "model.baseline")
    if not node.save_model:
        found.append("model.baseline.save_model=false: the embedded baseline is cached as a saved model; leave "
                     "model.baseline.save_model=true.")
    return found
