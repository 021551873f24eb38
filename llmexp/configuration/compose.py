"""Registers the schemas with Hydra's ConfigStore and composes configs outside ``@hydra.main``.

Every technique's schema is stored as the option ``technique/<name>``, so a plugin's
technique is selectable (``technique=<name>``) without shipping any YAML. Each ``backend``,
``data`` and ``tracker`` option, and each kind of ``cluster`` profile, has a schema of its own
(``<group>_<name>_schema``, named in its YAML's defaults), so a key of one option is refused in
another at compose time, with the option that has it.
"""

from __future__ import annotations

import fnmatch
import functools
import os
from importlib.resources import files
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from llmexp.configuration.errors import added_key_problems, composition_message, option_override
from llmexp.errors import UserError
from llmexp.techniques.plugin_manager import techniques
from llmexp.configuration.schema import (
    BACKEND_OPTIONS, CLUSTER_KINDS, DATA_OPTIONS, RAILS_OPTIONS, RETRIEVER_OPTIONS, TRACKER_OPTIONS, ClusterConfig,
    RunConfig,
)

CONFIG_MODULE = "llmexp.conf"
CONFIG_NAME = "config"


@functools.lru_cache(maxsize=None)
def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="llmexp_schema", node=RunConfig)
    for group, options in {**OPTION_SCHEMAS, "cluster": CLUSTER_KINDS}.items():
        for name, schema in options.items():
            cs.store(name=f"{group}_{name}_schema", node=schema)
    for name, entry in techniques().items():
        cs.store(group="technique", name=name, node=entry.technique.schema)


# Groups whose YAML options each name a schema of their own (``<group>_<option>_schema`` in their defaults).
OPTION_SCHEMAS = {"backend": BACKEND_OPTIONS, "data": DATA_OPTIONS, "tracker": TRACKER_OPTIONS,
                  "retriever": RETRIEVER_OPTIONS, "rails": RAILS_OPTIONS}


def option_schemas() -> Dict[str, Dict[str, type]]:
    """group -> option -> schema, for the groups whose options each have a schema of their own."""
    return {**{group: dict(options) for group, options in OPTION_SCHEMAS.items()},
            "technique": {name: entry.technique.schema for name, entry in techniques().items()},
            "cluster": cluster_profiles()}


@functools.lru_cache(maxsize=None)
def cluster_profiles() -> Dict[str, type]:
    """cluster=<profile> -> its schema: the kind its defaults name (``/cluster_<kind>_schema@_here_``).

    A profile's name is a label of the user's (a copy of example.yaml), not one of a closed set, so
    the cluster group is read from its files and left out of ``option_name_problems``.
    """
    profiles = {}
    for entry in files(CONFIG_MODULE).joinpath("cluster").iterdir():
        if entry.name.endswith(".yaml"):
            defaults = yaml.safe_load(entry.read_text(encoding="utf-8")).get("defaults") or []
            profiles[entry.name.removesuffix(".yaml")] = next(
                (schema for kind, schema in CLUSTER_KINDS.items() if f"/cluster_{kind}_schema@_here_" in defaults),
                ClusterConfig)
    return dict(sorted(profiles.items()))


# The pipeline a command line that chooses what runs implies (llmexp/conf/pipeline/).
IMPLIED_PIPELINE = "technique_then_evaluation"

# Overrides whose keys match these choose what runs, so they imply IMPLIED_PIPELINE: a technique or its
# evaluation (chosen or tuned), or a model of one's own (a preset, a checkpoint).
SINGLE_TECHNIQUE_KEYS = ("technique", "technique.*", "evaluation", "evaluation.*", "model", "model.path")


def implied_pipeline(argv: Sequence[str], config_name: Optional[str] = None) -> Optional[str]:
    """The override of ``argv`` (a command line, or its overrides alone) that implies ``IMPLIED_PIPELINE``, or None.

    ``llmexp`` alone runs the whole workflow on the embedded default (llmexp/conf/config.yaml's pipeline);
    ``llmexp technique=lora``, ``llmexp technique.max_steps=300`` or ``llmexp model=llama3_1_8b`` means
    that technique (pretrain unless named) and its evaluation, as a user of any single-recipe tool
    expects: the workflow is built for the embedded model. The rule reads keys, never values, so the
    whole command line and each job of a sweep mean the same pipeline. Naming a pipeline wins, and a
    primary config of one's own (``--config-name``, such as a file of sweeps/) chooses its pipeline itself.
    """
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(list(argv))
    if (config_name or args.config_name or CONFIG_NAME) != CONFIG_NAME:
        return None
    keys = {override: _override_node(override) for override in args.overrides}
    if any(key.split(".", 1)[0] == "pipeline" for key in keys.values()):
        return None
    return next((override for pattern in SINGLE_TECHNIQUE_KEYS for override, key in keys.items()
                 if fnmatch.fnmatchcase(key, pattern)), None)  # the technique first, where one is named


def with_implied_pipeline(argv: Sequence[str], config_name: Optional[str] = None) -> List[str]:
    """``argv`` plus ``pipeline=IMPLIED_PIPELINE`` where ``implied_pipeline`` finds an override that implies it."""
    return [*argv, f"pipeline={IMPLIED_PIPELINE}"] if implied_pipeline(argv, config_name) else list(argv)


def _override_node(override: str) -> str:
    """The config node an override sets: ``technique.lr`` of ``+technique.lr=1``, ``evaluation`` of
    ``technique@evaluation=benchmark``."""
    key = override.lstrip("+~").split("=", 1)[0]
    return key.split("@", 1)[1] if "@" in key else key


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
            chosen = [*with_implied_pipeline(overrides, config_name), *search]
            cfg = compose(config_name=config_name, overrides=chosen, return_hydra_config=True)
            set_hydra_runtime(cfg)
    except (HydraException, OmegaConfBaseException, ValueError, RecursionError) as error:
        raise UserError(composition_message(error, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    if not hydra_node:
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
    problems = [*option_name_problems(cfg), *added_key_problems(cfg, overrides)]
    if problems:
        raise UserError(" ".join(problems))
    return cfg


def job_environment() -> Dict[str, str]:
    """The environment variables the job runs with: this process's, plus ``hydra.job.env_set``.

    Hydra applies ``env_set`` only when the job starts, so a plan made before (``llmexp plan``,
    the checks before a run) asks here whether a variable a stage needs will be set.
    """
    environment = dict(os.environ)
    if HydraConfig.initialized():
        environment.update({str(key): str(value) for key, value in (HydraConfig.get().job.env_set or {}).items()})
    return environment


def set_hydra_runtime(cfg: DictConfig) -> None:
    """Let ``${hydra:...}`` resolve in a config composed outside ``@hydra.main``, so a plan sees its values.

    Hydra sets this singleton when it runs a job, with ``runtime.output_dir`` made from
    ``hydra.run.dir``; composing for a plan does the same (the directory is not created).
    """
    with read_write(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = os.path.abspath(str(OmegaConf.select(cfg, "hydra.run.dir")))
    HydraConfig.instance().set_config(cfg)


def option_name_problems(cfg) -> List[str]:
    """A ``name`` that is not the option whose schema the node has (``backend.name=megatron`` on backend=torch).

    The option decides the keys a node has; renaming it would run one option with another's settings.
    """
    from llmexp.configuration.pipeline import TOP_LEVEL_NODES

    nodes = {group: (group, OmegaConf.select(cfg, group)) for group in OPTION_SCHEMAS}
    nodes.update({key: ("technique", OmegaConf.select(cfg, key)) for key in TOP_LEVEL_NODES})
    own = OmegaConf.select(cfg, "pipeline.nodes", default=None) or {}
    nodes.update({f"pipeline.nodes.{key}": ("technique", node) for key, node in own.items()})
    schemas = option_schemas()
    problems = []
    for where, (group, node) in nodes.items():
        if not isinstance(node, DictConfig) or OmegaConf.is_missing(node, "name"):
            continue
        options, schema = schemas[group], OmegaConf.get_type(node)
        chosen = [name for name, option in options.items() if option is schema]  # a schema may serve several
        if chosen and node.name not in chosen:
            problems.append(
                f"{where}.name={node.name}: {where} is {group}={chosen[0]} and has its keys, so renaming it would run "
                f"{node.name} with {chosen[0]}'s settings; choose the option instead "
                f"({option_override(where, group, node.name)}) and drop {where}.name.")
    return problems


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
    except (HydraException, RecursionError) as error:
        raise UserError(composition_message(error, overrides)) from None
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(point) for batch in batches for point in batch]
