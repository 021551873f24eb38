"""Registers the schemas with Hydra's ConfigStore and composes configs outside ``@hydra.main``.

Every technique's schema is stored as the option ``technique/<name>``, so a plugin's
technique is selectable (``technique=<name>``) without shipping any YAML.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import List, Optional, Sequence

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from llmexp.errors import UserError
from llmexp.plugin_manager import techniques
from llmexp.schema import RunConfig

CONFIG_MODULE = "llmexp.conf"
CONFIG_NAME = "config"


@functools.lru_cache(maxsize=None)
def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="llmexp_schema", node=RunConfig)
    for name, entry in techniques().items():
        cs.store(group="technique", name=name, node=entry.technique.schema)


# Overrides of these top-level keys say "run this technique": they imply pipeline=default.
SINGLE_TECHNIQUE_KEYS = ("technique", "evaluation")


def with_implied_pipeline(overrides: Sequence[str]) -> List[str]:
    """``overrides`` plus ``pipeline=default`` when they choose or tune a technique but name no pipeline.

    ``llmexp`` alone runs the whole workflow (the compress pipeline, conf/config.yaml);
    ``llmexp technique=lora`` or ``llmexp technique.max_steps=300`` means that technique and
    its evaluation, as a user of any single-recipe tool expects. Naming a pipeline wins.
    """
    keys = [override.lstrip("+~").split("=", 1)[0] for override in overrides]
    tops = {key.split(".", 1)[0] for key in keys}
    if "pipeline" in tops or not tops.intersection(SINGLE_TECHNIQUE_KEYS):
        return list(overrides)
    return [*overrides, "pipeline=default"]


def compose_config(overrides: Sequence[str], config_name: str = CONFIG_NAME, config_dir: Optional[str] = None,
                   hydra_node: bool = False) -> DictConfig:
    """Compose like ``llmexp [--config-dir D] [--config-name N] <overrides>`` would; bad input becomes a ``UserError``.

    ``config_dir`` holds the primary config (a sweep file of sweeps/), which builds on
    llmexp's own configs; ``hydra_node`` keeps the ``hydra`` node (a sweep file's axes).
    """
    register_configs()
    GlobalHydra.instance().clear()
    search = []
    if config_dir is None:
        initialize = initialize_config_module(CONFIG_MODULE, version_base="1.3")
    else:
        initialize = initialize_config_dir(str(Path(config_dir).resolve()), version_base="1.3")
        search = [f"hydra.searchpath=[pkg://{CONFIG_MODULE}]"]
    try:
        with initialize:
            chosen = [*with_implied_pipeline(overrides), *search]
            return compose(config_name=config_name, overrides=chosen, return_hydra_config=hydra_node)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise UserError(composition_message(error, overrides)) from None
    finally:
        GlobalHydra.instance().clear()


def composition_message(error: Exception, overrides: Sequence[str]) -> str:
    """One paragraph from Hydra's or OmegaConf's error, with the fix a user needs."""
    text = " ".join(str(error).split())
    hint = (
        "Check the spelling against `llmexp --help` (groups and their options) and "
        "`llmexp --cfg job` (every key with its current value and type)."
    )
    shown = " ".join(overrides) or "(no overrides)"
    return f"The configuration could not be composed from `{shown}`: {text} {hint}"


def sweep_points(overrides: List[str], config_name: str = CONFIG_NAME, config_dir: Optional[str] = None) -> List[List[str]]:
    """Expand a multirun into one override list per job, as Hydra's basic sweeper does.

    The axes are the command line's sweeps plus the config's ``hydra.sweeper.params`` (a
    sweep file's); an axis on the command line replaces the file's.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides=overrides)
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        params = compose_config(fixed, config_name, config_dir, hydra_node=True).hydra.sweeper.params or {}
        given = {o.get_key_element() for o in parsed}
        parsed += parser.parse_overrides([f"{key}={value}" for key, value in params.items() if key not in given])
    except HydraException as error:
        raise UserError(composition_message(error, overrides)) from None
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(point) for batch in batches for point in batch]
