"""Where a run's starting weights come from, decided before anything runs and told by the plan.

In order: ``model.path``, a local checkpoint; the preset's published weights
(``model.hub_repo`` at ``model.revision``, through the Hugging Face cache: ``llmexp.models.hub``);
for a stage that adapts a base (sft, lora, dpo, cpt) on the embedded data, the embedded
baseline (``model.baseline``: ``llmexp.models.embedded_baseline``); else none, so pretraining starts
from random weights and a stage that adapts a base is refused at plan time, naming
``model.path``. ``llmexp.models.loading.input_model`` and ``llmexp.running.base_model`` load them in that order.

Every stage sees the run's own weights through this module alone: plan checks ask
``has_weights`` and read files through ``local_directory`` (the cache only), a stage loads
from ``weights_directory`` (``tokenizer_directory`` when it needs the tokenizer alone), and
results.json names them with ``source``.

Pure Python, no network until a stage asks for the weights: the planner calls it for every plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from llmexp.configuration.pipeline import model_sources, node_path, stage_nodes
from llmexp.models import embedded_baseline, hub
from llmexp.techniques.plugin_manager import technique


def describe(config) -> str:
    """One line for the plan: the checkpoint, the repository and whether it is cached, or what happens without."""
    if config.model.path:
        return f"model.path={config.model.path}"
    weights = hub.published_weights(config.model)
    if weights is not None:
        if hub.repo_problem(weights):
            return f"{weights}, which is not a repository id"
        snapshot = hub.cached_snapshot(weights)
        if snapshot is not None:
            return f"{weights}, in the Hugging Face cache ({snapshot})"
        if hub.offline():
            return f"{weights}, not in the Hugging Face cache, and HF_HUB_OFFLINE=1"
        return f"{weights}, downloaded into the Hugging Face cache ({hub.cache_dir()}) when the run starts"
    if embedded_baseline.available(config):
        path = embedded_baseline.directory(config)
        state = "cached at" if embedded_baseline.is_finished(path) else "trained first, then cached at"
        return (f"random init; a stage that adapts a base starts from the embedded baseline ({state} {path}, "
                f"{embedded_baseline.recipe(config)})")
    return f"random init (model.path unset; model={config.model.name} names no published weights)"


def problems(config) -> List[str]:
    """What stops the run's starting weights: published weights that cannot be had (a bad repository id, or
    offline and not cached), and a stage that adapts a base with none to adapt (``base_problems``). Whether
    published weights exist on the Hub, and may be read, is known only when the run downloads them (``hub.fetch``)."""
    sources, found = model_sources(config), []
    for key, node in stage_nodes(config, strict=False):
        if sources[key] is None and technique(node.name).adapts_base:
            found += base_problems(config, node_path(key), node.name)
    return list(dict.fromkeys(found)) + _published_problems(config)


def _published_problems(config) -> List[str]:
    weights = hub.published_weights(config.model)
    if weights is None:
        return []
    problem = hub.repo_problem(weights)
    if problem:
        return [problem]
    if hub.offline() and hub.cached_snapshot(weights) is None:
        return [hub.not_cached_message(weights)]
    return []


def has_weights(config) -> bool:
    """Whether the run has weights of its own: a checkpoint at ``model.path``, or published ones (``problems``
    tells when those cannot be had)."""
    return bool(config.model.path or hub.published_weights(config.model))


def local_directory(config) -> Optional[Path]:
    """The directory of the run's own weights when this machine holds it already: ``model.path``, or the cached
    snapshot of the published weights. For plan checks that read its files (config.json, tokenizer.json): never
    downloads; None when there is nothing to read yet."""
    if config.model.path:
        return Path(config.model.path)
    weights = hub.published_weights(config.model)
    if weights is None or hub.repo_problem(weights):
        return None
    return hub.cached_snapshot(weights)


def weights_directory(config) -> Optional[Path]:
    """The directory the run's own weights load from: ``model.path``, else the published weights' snapshot
    (downloaded into the cache first when it lacks them: ``hub.fetch``); None when the run has none."""
    return _directory(config, hub.FILES)


def tokenizer_directory(config) -> Optional[Path]:
    """``weights_directory`` for a stage that needs the tokenizer alone: the published weights' tensors are not
    downloaded for it."""
    return _directory(config, hub.TOKENIZER_FILES)


def _directory(config, files: List[str]) -> Optional[Path]:
    if config.model.path:
        return Path(config.model.path)
    weights = hub.published_weights(config.model)
    return hub.fetch(weights, files) if weights is not None else None


def source(config, adapts_base: bool = False) -> Optional[str]:
    """The run's own weights as results.json names a stage's ``input_model`` when no earlier stage hands it one:
    ``model.path``, the published weights as ``<repo>@<revision>``, for a stage that ``adapts_base`` the embedded
    baseline's directory; None when there are none (random init)."""
    if config.model.path:
        return "model.path"
    weights = hub.published_weights(config.model)
    if weights is not None:
        return str(weights)
    if adapts_base and embedded_baseline.available(config):
        return str(embedded_baseline.directory(config) / "model")
    return None


def base_problems(config, key: str, technique: str) -> List[str]:
    """Problems of stage ``key`` (``technique``, which adapts a base) when no stage before it makes a model."""
    if has_weights(config):
        return []
    if embedded_baseline.available(config):
        return embedded_baseline.problems(config)
    return [no_base_message(config, key, technique)]


def no_base_message(config, key: str, technique: str) -> str:
    baseline = (f", and model.baseline (the embedded baseline) serves only the embedded world's data (data="
                f"{embedded_baseline.DATA}, or data={' / data='.join(embedded_baseline.WORLD_DATA)} without data.path)"
                if config.model.get("baseline") else "")
    return (f"{key}: technique={technique} adapts a base model and this run has none: model.path is unset, "
            f"model={config.model.name} names no published weights (model.hub_repo){baseline}. Set model.path=<a "
            "Hugging Face checkpoint directory> or model.hub_repo=<org/name>, or put a training stage before it in "
            "the pipeline (technique=pretrain, or pipeline=customize).")
