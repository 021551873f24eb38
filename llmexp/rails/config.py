"""A rails config directory, read and checked: NeMo Guardrails' layout, the flows ``llmexp.rails`` runs.

The directory holds ``config.yml`` (``rails.input.flows``, ``rails.output.flows``, ``rails.config``) and
optionally ``prompts.yml`` (``prompts: [{task, content, max_tokens}]``), as NeMo Guardrails' guides write
them, so a config written for one reads in the other where their flows agree. The flows known here and the
``rails.config`` key each reads:

- ``regex check input`` / ``regex check output``: ``regex_detection.<input|output>.patterns`` (a denylist;
  ``case_insensitive``), NeMo's regex rail.
- ``detect sensitive data on input|output`` (block) and ``mask sensitive data on input|output`` (replace with
  ``<ENTITY>``): ``sensitive_data_detection.<input|output>.entities``, Presidio's entity names.
- ``jailbreak detection patterns``: ``jailbreak_detection.patterns`` and ``symbol_ratio_threshold`` (the share of
  punctuation and symbols above which a message reads as an adversarial suffix).
- ``topic check input``: ``topic_detection.allowed_patterns`` (a message none of them matches is off topic).
- ``self check input`` / ``self check output``: ask the served model itself with the ``self_check_input`` /
  ``self_check_output`` prompt (Jinja2, ``{{ user_input }}``, ``{{ bot_response }}``); an answer starting with
  "yes" blocks.

Anything else (an unknown flow, key or entity, a pattern that does not compile, a self check without its
prompt) is refused when the directory is read, naming the file, the key and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml

from llmexp.errors import UserError
from llmexp.rails.sensitive_data import ENTITIES

DEFAULT_CONFIG = Path(__file__).parent / "default"  # the shipped rails: `--rails default`

INPUT_FLOWS = ("regex check input", "detect sensitive data on input", "mask sensitive data on input",
               "jailbreak detection patterns", "topic check input", "self check input")
OUTPUT_FLOWS = ("regex check output", "detect sensitive data on output", "mask sensitive data on output",
                "self check output")
CONFIG_KEYS = ("regex_detection", "sensitive_data_detection", "jailbreak_detection", "topic_detection")
SELF_CHECK_TASKS = {"self check input": "self_check_input", "self check output": "self_check_output"}


@dataclass(frozen=True)
class Prompt:
    """A self-check prompt: its Jinja2 template and the tokens the model may answer with."""

    content: str
    max_tokens: int = 3


@dataclass(frozen=True)
class RailsSpec:
    """What a rails config directory asks for, compiled."""

    directory: Path
    input_flows: Tuple[str, ...] = ()
    output_flows: Tuple[str, ...] = ()
    denylist: Dict[str, List[re.Pattern]] = field(default_factory=dict)  # "input"/"output" -> patterns
    entities: Dict[str, Tuple[str, ...]] = field(default_factory=dict)  # "input"/"output" -> entity names
    jailbreak_patterns: List[re.Pattern] = field(default_factory=list)
    symbol_ratio_threshold: Optional[float] = None
    allowed_topics: List[re.Pattern] = field(default_factory=list)
    prompts: Dict[str, Prompt] = field(default_factory=dict)  # task -> prompt

    @property
    def asks_model(self) -> bool:
        return any(flow in SELF_CHECK_TASKS for flow in (*self.input_flows, *self.output_flows))


def resolve_config_dir(value: Optional[str]) -> Path:
    """``None`` or ``default``: the shipped directory; anything else: a path."""
    return DEFAULT_CONFIG if value in (None, "default") else Path(value)


def load_rails_config(directory: Path) -> RailsSpec:
    """Read and check ``directory``'s ``config.yml`` (and ``prompts.yml``); ``UserError`` names what is wrong."""
    config_file = directory / "config.yml"
    if not config_file.is_file():
        raise UserError(f"rails config {directory}: no config.yml there. Give a rails config directory (NeMo "
                        f"Guardrails' layout, e.g. a copy of {DEFAULT_CONFIG}), or `default` for the shipped one.")
    config = _read_yaml(config_file)
    prompts = _prompts(directory, config)
    rails = _mapping(config.get("rails", {}), config_file, "rails")
    input_flows = _flows(rails, "input", INPUT_FLOWS, config_file)
    output_flows = _flows(rails, "output", OUTPUT_FLOWS, config_file)
    options = _mapping(rails.get("config", {}), config_file, "rails.config")
    unknown = sorted(set(options) - set(CONFIG_KEYS))
    if unknown:
        raise UserError(f"{config_file}: rails.config.{unknown[0]} is not a setting llmexp's rails read; the "
                        f"settings are {', '.join(CONFIG_KEYS)}. Remove it or fix its name.")
    jailbreak = _mapping(options.get("jailbreak_detection", {}), config_file, "rails.config.jailbreak_detection")
    topics = _mapping(options.get("topic_detection", {}), config_file, "rails.config.topic_detection")
    spec = RailsSpec(
        directory=directory, input_flows=input_flows, output_flows=output_flows,
        denylist={side: _patterns(options, ("regex_detection", side), config_file) for side in ("input", "output")},
        entities={side: _entities(options, side, config_file) for side in ("input", "output")},
        jailbreak_patterns=_patterns(options, ("jailbreak_detection",), config_file, case_insensitive=True),
        symbol_ratio_threshold=jailbreak.get("symbol_ratio_threshold"),
        allowed_topics=_patterns(options, ("topic_detection",), config_file, key="allowed_patterns",
                                 case_insensitive=True),
        prompts=prompts,
    )
    _check_flows_have_settings(spec, config_file, topics)
    return spec


def _check_flows_have_settings(spec: RailsSpec, config_file: Path, topics: Mapping[str, Any]) -> None:
    """A flow named without what it needs would pass everything silently: refuse it."""
    flows = (*spec.input_flows, *spec.output_flows)
    for flow in flows:
        side = "input" if flow.endswith("input") else "output"
        missing = None
        if flow.startswith("regex check") and not spec.denylist[side]:
            missing = f"rails.config.regex_detection.{side}.patterns"
        elif "sensitive data" in flow and not spec.entities[side]:
            missing = f"rails.config.sensitive_data_detection.{side}.entities"
        elif flow == "jailbreak detection patterns" and not spec.jailbreak_patterns \
                and spec.symbol_ratio_threshold is None:
            missing = "rails.config.jailbreak_detection.patterns (or symbol_ratio_threshold)"
        elif flow == "topic check input" and not topics.get("allowed_patterns"):
            missing = "rails.config.topic_detection.allowed_patterns"
        elif flow in SELF_CHECK_TASKS and SELF_CHECK_TASKS[flow] not in spec.prompts:
            raise UserError(f"{config_file}: the flow {flow!r} asks the model with the prompt of task "
                            f"{SELF_CHECK_TASKS[flow]!r}, which prompts.yml does not define. Add it "
                            f"(prompts: [{{task: {SELF_CHECK_TASKS[flow]}, content: ...}}]) or drop the flow.")
        if missing:
            raise UserError(f"{config_file}: the flow {flow!r} is listed but {missing} is empty, so it would pass "
                            "everything. Give it, or drop the flow.")
    threshold = spec.symbol_ratio_threshold
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise UserError(f"{config_file}: rails.config.jailbreak_detection.symbol_ratio_threshold={threshold!r}: "
                        "give a fraction above 0 and at most 1, e.g. 0.3.")


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({error}). Fix the file.") from None
    return _mapping(loaded if loaded is not None else {}, path, "the file")


def _mapping(value: Any, path: Path, key: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise UserError(f"{path}: {key} is a {type(value).__name__}; give a mapping of settings.")
    return value


def _flows(rails: Mapping[str, Any], side: str, known: Tuple[str, ...], path: Path) -> Tuple[str, ...]:
    flows = _mapping(rails.get(side, {}), path, f"rails.{side}").get("flows", [])
    if not isinstance(flows, list):
        raise UserError(f"{path}: rails.{side}.flows is not a list; give the flows' names, one per item.")
    for flow in flows:
        if flow not in known:
            raise UserError(f"{path}: rails.{side}.flows names {flow!r}, which llmexp's rails do not run on the "
                            f"{side}; the {side} flows are: {', '.join(known)}.")
    return tuple(flows)


def _patterns(options: Mapping[str, Any], keys: Tuple[str, ...], path: Path, key: str = "patterns",
              case_insensitive: bool = False) -> List[re.Pattern]:
    node: Any = options
    for part in keys:
        node = node.get(part, {}) if isinstance(node, dict) else {}
    where = "rails.config." + ".".join((*keys, key))
    node = _mapping(node, path, "rails.config." + ".".join(keys))
    patterns = node.get(key, [])
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise UserError(f"{path}: {where} must be a list of regular expressions (strings).")
    flags = re.IGNORECASE if node.get("case_insensitive", case_insensitive) else 0
    compiled = []
    for index, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern, flags))
        except re.error as error:
            raise UserError(f"{path}: {where}[{index}] = {pattern!r} is not a regular expression ({error}). "
                            "Fix it (Python's re syntax).") from None
    return compiled


def _entities(options: Mapping[str, Any], side: str, path: Path) -> Tuple[str, ...]:
    node = _mapping(options.get("sensitive_data_detection", {}), path, "rails.config.sensitive_data_detection")
    entities = _mapping(node.get(side, {}), path, f"rails.config.sensitive_data_detection.{side}").get("entities", [])
    for entity in entities if isinstance(entities, list) else [entities]:
        if entity not in ENTITIES:
            raise UserError(f"{path}: rails.config.sensitive_data_detection.{side}.entities names {entity!r}; "
                            f"the entities llmexp recognizes are {', '.join(ENTITIES)}.")
    return tuple(entities)


def _prompts(directory: Path, config: Mapping[str, Any]) -> Dict[str, Prompt]:
    """``prompts`` from config.yml and prompts.yml together (NeMo Guardrails reads both)."""
    entries = list(config.get("prompts", []) or [])
    prompts_file = directory / "prompts.yml"
    if prompts_file.is_file():
        entries += list(_read_yaml(prompts_file).get("prompts", []) or [])
    prompts: Dict[str, Prompt] = {}
    for entry in entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("task"), str)
                and isinstance(entry.get("content"), str)):
            raise UserError(f"{directory}: each item of prompts needs `task` and `content` (text); got {entry!r}.")
        max_tokens = entry.get("max_tokens", 3)
        if not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise UserError(f"{directory}: prompts' {entry['task']} max_tokens={max_tokens!r}: give a whole number "
                            "of at least 1.")
        prompts[entry["task"]] = Prompt(entry["content"], max_tokens)
    return prompts
