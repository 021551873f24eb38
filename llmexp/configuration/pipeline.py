"""Which technique node each pipeline stage runs, and which model it starts from.

A stage key is ``technique`` or ``evaluation`` (the top-level nodes every run has) or a
key of ``pipeline.nodes``, where a pipeline preset keeps nodes of its own (the
``customize`` pipeline's ``base``, ``lora``, ``sft`` ...). A stage starts from the model
the stage before it produced, unless ``pipeline.inputs`` names another stage (``sft:
base`` fine-tunes the base model, not the LoRA model trained just before it; ``none`` starts it
as a first stage would, from ``model.path`` or from scratch); that stage must make a model (``llmexp.planning.data_flow``). Likewise a stage reads the run's ``data``
unless ``pipeline.data_inputs`` names a stage that made a corpus (a curation), which it then
reads as ``data=text`` (``stage_config``), and with the fields ``pipeline.data_fields`` sets for it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from llmexp.configuration.schema import DataConfig, TextDataConfig
from llmexp.errors import UserError
from llmexp.techniques.plugin_manager import technique

TOP_LEVEL_NODES = ("technique", "evaluation")


def stage_nodes(config, strict: bool = True) -> List[Tuple[str, Any]]:
    """``(key, node)`` of every stage in order; an unknown key is a ``UserError``.

    What each stage reads of the others (``pipeline.inputs``, a teacher, a baseline) is checked by
    ``llmexp.planning.data_flow``.

    ``strict=False`` (plugins' plan checks) leaves unknown keys out instead: the planner
    itself reports them, once.
    """
    nodes = OmegaConf.select(config, "pipeline.nodes", default=None) or {}
    stages = list(OmegaConf.select(config, "pipeline.stages", default=None) or [])
    resolved = []
    for key in stages:
        if key in nodes:
            resolved.append((key, nodes[key]))
        elif key in TOP_LEVEL_NODES:
            resolved.append((key, config[key]))
        elif strict:
            known = list(TOP_LEVEL_NODES) + list(nodes)
            raise UserError(
                f"pipeline.stages names {key!r}, which is not a stage node; use one of {', '.join(known)} "
                "(pipeline.nodes holds a pipeline's own nodes)."
            )
    return resolved


def stage_name(key: str, node) -> str:
    """What the run calls stage ``key`` (its directory, its results.json entry, what a teacher or a baseline names):
    its key in ``pipeline.nodes``, its technique's name for a top-level node."""
    return key if key not in TOP_LEVEL_NODES else node.name


def node_path(key: str) -> str:
    """Where the node of stage ``key`` sits in the config, for messages naming a field."""
    return key if key in TOP_LEVEL_NODES else f"pipeline.nodes.{key}"


def stage_node_path(ctx) -> str:
    """Where the running stage's node sits: ``pipeline.nodes.<stage>``, else the top-level ``technique``.

    For messages of a model-making stage (a top-level one is always the ``technique`` node).
    """
    nodes = OmegaConf.select(ctx.config, "pipeline.nodes", default=None) or {}
    return node_path(ctx.stage_name if ctx.stage_name in nodes else "technique")


def model_sources(config) -> Dict[str, Optional[str]]:
    """The stage whose model each stage starts from, by key, as the runner picks it: ``pipeline.inputs``' choice,
    else the latest earlier stage that makes a model; None where none has (``model.path``, or nothing)."""
    sources: Dict[str, Optional[str]] = {}
    latest = None
    for key, node in stage_nodes(config, strict=False):
        sources[key] = model_source(config, key, latest)
        if technique(node.name).produces_model:
            latest = key
    return sources


def data_input_stage(config, key: str) -> str | None:
    """The stage whose corpus ``key`` reads instead of the run's data, when ``pipeline.data_inputs`` names one."""
    inputs = OmegaConf.select(config, "pipeline.data_inputs", default=None) or {}
    return inputs.get(key)


def with_corpus(config, corpus: str):
    """``config`` with its data replaced by the corpus directory ``corpus`` as ``data=text`` (the same text field
    when the run's data has one): what a stage named in ``pipeline.data_inputs`` reads. The embedded world's
    settings stay, so evaluation tasks and a from-scratch tokenizer are the run's own."""
    data = config.data
    world = {name: data[name] for name in DataConfig.__dataclass_fields__ if name != "name" and name in data}
    text_field = OmegaConf.select(data, "text_field", default=None) or "text"
    staged = config.copy()
    with open_dict(staged):
        staged.data = OmegaConf.structured(TextDataConfig(**world, paths=[corpus], text_field=text_field))
    return staged


def with_data_fields(config, key: str):
    """``config`` as stage ``key`` reads it: with the fields ``pipeline.data_fields.<key>`` sets on the run's data (one
    data option serving stages that read different parts of it: the knowledge study's reader and its fine-tuning on
    the new facts); merged into the data's schema, so a field the option lacks is refused with its name."""
    fields = OmegaConf.select(config, f"pipeline.data_fields.{key}", default=None)
    if not fields:
        return config
    staged = config.copy()
    try:
        with open_dict(staged):
            staged.data = OmegaConf.merge(config.data, fields)
    except OmegaConfBaseException as error:  # its message names the key and the value
        raise UserError(f"pipeline.data_fields.{key}: {error}. Set only fields data={config.data.name} has "
                        "(llmexp --cfg job --package data lists them).") from None
    return staged


NO_MODEL = "none"  # pipeline.inputs.<stage>=none: it starts as a first stage would (model.path, else from scratch)


def model_source(config, key: str, latest: Optional[str]) -> Optional[str]:
    """The stage whose model ``key`` starts from: ``pipeline.inputs``' choice (None for ``none``), else ``latest``."""
    named = input_stage(config, key)
    return None if named == NO_MODEL else named or latest


def input_stage(config, key: str) -> str | None:
    """The stage whose model ``key`` starts from, when ``pipeline.inputs`` names one."""
    inputs = OmegaConf.select(config, "pipeline.inputs", default=None) or {}
    return inputs.get(key)
