"""Bad config input as one paragraph: the field, the value given, what the schema expects, the fix.

Hydra's and OmegaConf's own texts name the symptom ("Error merging override", "Could not
override 'x'") and give advice that is wrong for a schema-checked config ("To append to
your config use +x=...", which adds a key the run then ignores), followed by Hydra's config
search path. These messages say instead what the field expects (its type in the schema),
the value given and its current value, and suggest the nearest valid key or option.
"""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import fields, is_dataclass
from enum import Enum
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

CFG_HINT = "`llmexp --cfg job` lists every key with its current value and type."
NEAREST = 0.7  # difflib similarity a suggestion needs: lr for lrr, fsdp for fdsp; not gpu for tpu

# What a field of each type expects: the noun for one value, for the items of a list, and the fix.
TYPE_WORDS = {
    int: ("an integer", "integers", "give a whole number"),
    float: ("a number", "numbers", "give a number such as 0.001 or 3e-4"),
    bool: ("true or false", "true/false values", "give true or false"),
    str: ("a string", "strings", "quote it"),
}

# The values a field of each type takes as they are (a string takes a number as its text).
ACCEPTED = {int: (int,), float: (int, float), bool: (bool,), str: (str, int, float)}


def composition_message(error: BaseException, overrides: Sequence[str]) -> str:
    """One paragraph from Hydra's or OmegaConf's composition error, naming the field, the value and the fix."""
    if isinstance(error, RecursionError):
        return (
            f"The configuration could not be composed from `{_shown(overrides)}`: a value is nested too deeply to "
            "parse (lists or mappings inside each other beyond Python's recursion limit); give it flatter, or in a "
            "config file of your own (--config-dir)."
        )
    if isinstance(error, OverrideParseException):
        return (
            f"{error.override}: this override cannot be parsed{_parse_position(error)}. "
            "Quote a value that holds characters other than letters, digits and . / - _ : (key='a value', with the "
            "whole override in double quotes for the shell), and replace a placeholder such as <run> by its value."
        )
    if isinstance(error, MissingConfigException) and (missing := _missing_option_message(error, overrides)):
        return missing
    cause = _omegaconf_cause(error)
    if cause is not None:
        key = re.sub(r"\[\d+\]$", "", str(cause.full_key))
        override = _override_of(key, overrides)
        specific = (_unknown_key_message(cause, override) or _choice_message(cause)
                    or _type_message(cause, override))
        if specific:
            return f"{override or _origin(error, overrides)}: {specific}"
    hint = ("Check the spelling against `llmexp --help` (groups and their options) and `llmexp --cfg job` "
            "(every key with its current value and type).")
    return f"{_composed_from(overrides)}: {_hydra_text(error, cause)} {hint}"


def _parse_position(error: OverrideParseException) -> str:
    """Where Hydra's grammar stopped, from the caret line of its message when it has one."""
    lines = error.message.splitlines()
    if len(lines) > 1 and "^" in lines[1] and lines[1].index("^") < len(lines[0]):
        column = lines[1].index("^") - lines[0].index(error.override)
        return f" at `{error.override[column]}` (character {column + 1})"
    return ""


def added_key_problems(cfg: DictConfig, overrides: Sequence[str]) -> List[str]:
    """``+technique.lrr=1``: Hydra adds a key the schema lacks, and the run would ignore it; refuse it instead.

    Only keys added to a schema's node count: ``+`` stays right for a mapping field
    (``+technique.extra_body.seed=1``) and for a config group (``+sweep=...``).
    """
    problems = []
    for override in overrides:
        key = _key(override)
        if not override.startswith("+") or "/" in key or "@" in key:
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if is_dataclass(schema) and leaf not in _keys(schema) and leaf in node:
            problems.append(f"{override}: {_unknown_key(key, _where(key, schema), _keys(schema), override)} "
                            "(`+` adds a key the run would ignore.)")
    return problems


def option_override(node: str, group: str, option: str) -> str:
    """The override that gives the config node at ``node`` the ``option`` of ``group``."""
    return f"{group}={option}" if node == group else f"{group}@{node}={option}"


def _shown(overrides: Sequence[str], limit: int = 200) -> str:
    """The overrides as typed, each cut to ``limit`` characters so that one huge value cannot flood the message."""
    shortened = (o if len(o) <= limit else f"{o[:limit]}... ({len(o)} characters)" for o in overrides)
    return " ".join(shortened) or "(no overrides)"


def _composed_from(overrides: Sequence[str]) -> str:
    return f"The configuration could not be composed from `{_shown(overrides)}`"


def _origin(error: BaseException, overrides: Sequence[str]) -> str:
    """Where a failure no override explains comes from: the config file Hydra names (``In 'my_lora'``)."""
    named = re.match(r"In '([^']+)': ", str(error))
    return f"In the config {named.group(1)}" if named else _composed_from(overrides)


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _value_text(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


def _override_of(full_key: str, overrides: Sequence[str]) -> Optional[str]:
    """The override that set ``full_key``, a node above it (``model={...}``) or below it (a typo ``techniqe.lr``)."""
    for override in reversed(overrides):
        key = _key(override)
        if key == full_key or full_key.startswith(f"{key}.") or key.startswith(f"{full_key}."):
            return override
    return None


def _nearest(word: str, candidates: Sequence[str]) -> Optional[str]:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=NEAREST)
    return close[0] if close else None


def _hydra_text(error: BaseException, cause: Optional[OmegaConfBaseException]) -> str:
    """Hydra's message without its search path and its advice to append with ``+``; OmegaConf's first line if vaguer."""
    text = str(error)
    if cause is not None and text.startswith("Error merging"):
        text = str(cause).split("\n    full_key:", 1)[0]
    text = re.split(r"\nConfig search path:|\nTo append to your config use", text, maxsplit=1)[0]
    return " ".join(text.split())


def _missing_option_message(error: MissingConfigException, overrides: Sequence[str]) -> Optional[str]:
    """``model=llama3_1_8bb``: the nearest option, and all of them."""
    group, _, option = str(error.missing_cfg_file or "").rpartition("/")
    if not group or not error.options:
        return None
    typed = next((o for o in reversed(overrides) if _key(o).split("@", 1)[0] == group and _value_text(o) == option),
                 f"{group}={option}")
    near = _nearest(option, error.options)
    advice = f"; did you mean {_key(typed)}={near}?" if near else "."
    return f"{typed}: {group} has no option {option}{advice} Its options are {', '.join(error.options)}."


def _omegaconf_cause(error: BaseException) -> Optional[OmegaConfBaseException]:
    """The OmegaConf error behind Hydra's, when it says which key of which schema failed."""
    while error is not None:
        if isinstance(error, OmegaConfBaseException) and getattr(error, "full_key", None):
            return error
        error = error.__cause__ or error.__context__
    return None


def _unknown_key_message(error: OmegaConfBaseException, override: Optional[str]) -> Optional[str]:
    """A key the node lacks: the option that has it (backend.transformer_impl: backend=megatron), else the nearest."""
    if not isinstance(error, (ConfigAttributeError, ConfigKeyError)):
        return None
    schema, full_key = error.object_type, str(error.full_key)
    node = full_key.rpartition(".")[0]
    if is_dataclass(schema):
        parent = error.parent_node
        named = parent.get("name") if isinstance(parent, DictConfig) and "name" in parent else None
        if owned := _owned_elsewhere(error.key, node, schema, named):
            return owned
        return _unknown_key(full_key, _where(full_key, schema, named), _keys(schema), override)
    if isinstance(error.parent_node, DictConfig):  # a mapping such as pipeline.nodes: its keys are the valid ones
        return _unknown_key(full_key, node, [str(key) for key in error.parent_node], override)
    return None


def _owned_elsewhere(key: str, node: str, schema: type, named: Optional[str] = None) -> Optional[str]:
    """``key`` belongs to another option of the group whose option ``schema`` is: name it and how to choose it."""
    from llmexp.configuration.compose import option_schemas  # composes with this module's messages, so it imports it first

    for group, options in option_schemas().items():
        chosen = _option_of(options, schema, named)
        owners = [name for name, option in options.items() if key in _keys(option)]
        if chosen is not None and owners:
            named = [f"{group}={name}" for name in owners]
            listed = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
            which = f"this run has {group}={chosen}" if node == group else f"{node} is {group}={chosen}"
            return (f"{node}.{key} is a key of {listed}; {which}, which has no such key: "
                    f"choose {option_override(node, group, owners[0])} or drop the override.")
    return None


def _where(full_key: str, schema: type, named: Optional[str] = None) -> str:
    """How a message names the node holding ``full_key``: its option (technique=pretrain), its path, or the config."""
    from llmexp.configuration.compose import option_schemas

    node = full_key.rpartition(".")[0]
    for group, options in option_schemas().items():
        chosen = _option_of(options, schema, named)
        if chosen is not None:
            return f"{group}={chosen}" if node == group else f"{node} ({group}={chosen})"
    return node or "the config"


def _option_of(options: Dict[str, type], schema: type, named: Optional[str] = None) -> Optional[str]:
    """The option whose schema is ``schema``: the only one, or where several share it (Slurm cluster profiles) the
    one ``named`` (the node's own ``name``); else None."""
    chosen = [name for name, option in options.items() if option is schema]
    return chosen[0] if len(chosen) == 1 else named if named in chosen else None


def _unknown_key(full_key: str, where: str, keys: Sequence[str], override: Optional[str]) -> str:
    """``full_key`` is not among ``keys``: the nearest one as a corrected override, else all of them."""
    node, _, key = full_key.rpartition(".")
    near = _nearest(key, keys)
    if near is None:
        return f"{full_key} is not a key of {where}, whose keys are {', '.join(keys)}. {CFG_HINT}"
    fixed = f"{node}.{near}" if node else near
    if override:  # the override as typed, with the key corrected (the rest of a longer path kept)
        fixed = f"{fixed}{_key(override)[len(full_key):]}={_value_text(override)}"
    return f"{full_key} is not a key of {where}; did you mean {fixed}?"


def _choice_message(error: OmegaConfBaseException) -> Optional[str]:
    """A value outside a closed choice (an Enum field of the schema): the allowed values and the nearest."""
    if not isinstance(error, ValidationError):
        return None
    hint, is_item = _declared_type(error)
    choice = _unwrapped(typing.get_args(_unwrapped(hint))[0] if is_item else hint)
    if not (isinstance(choice, type) and issubclass(choice, Enum)):
        return None
    allowed = [str(member.value) for member in choice]
    key, near = _field_key(error), _nearest(str(error.value), allowed)
    if is_item:
        advice = f"did you mean {near}?" if near else "give each item as one of them."
        return f"{key} expects {_noun(hint)}, got {_given(error.value)} as {error.full_key}; {advice}"
    advice = f"did you mean {key}={near}?" if near else f"give one of them{_example(key, _current(error))}."
    return f"{key} expects {_noun(hint)}{_now(error)}, got {_given(error.value)}; {advice}"


def _type_message(error: OmegaConfBaseException, override: Optional[str]) -> Optional[str]:
    """A value of the wrong type: what the field's type in the schema expects, and a value of that type."""
    if not isinstance(error, ValidationError):
        return None
    hint, is_item = _declared_type(error)
    if hint is None:
        return None
    key, inner = _field_key(error), _unwrapped(hint)
    if is_item:
        fix = TYPE_WORDS.get(_unwrapped(typing.get_args(inner)[0]), ("", "", "give a value of that type"))[2]
        return f"{key} expects {_noun(hint)}, got {_given(error.value)} as {error.full_key}; {fix} for each item."
    example = _example_value(inner, error.value, override)
    if example is _UNSET and _current(error) is not None:
        example = _current(error)
    if typing.get_origin(inner) is list:
        fix = "give a list in brackets"
    elif typing.get_origin(inner) is dict or is_dataclass(inner):
        fix = "give a mapping in braces"
    else:
        fix = TYPE_WORDS.get(inner, ("", "", "give a value of that type"))[2]
        if hint is not inner:
            fix += " (null for none)"
    return f"{key} expects {_noun(hint)}{_now(error)}, got {_given(error.value)}; {fix}{_example(key, example)}."


def _declared_type(error: OmegaConfBaseException) -> Tuple[Any, bool]:
    """The schema's type of the field that failed, and whether the failure is one item of that (list) field."""
    if is_dataclass(error.object_type):
        return typing.get_type_hints(error.object_type).get(error.key), False
    if typing.get_origin(error.ref_type) is list:  # an item: its list's type
        return error.ref_type, True
    return None, False


def _field_key(error: OmegaConfBaseException) -> str:
    return re.sub(r"\[\d+\]$", "", str(error.full_key))


def _unwrapped(hint):
    """``X`` for ``Optional[X]``."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _noun(hint) -> str:
    """What a field of type ``hint`` expects, in words: ``an integer``, ``a list of integers or null``."""
    inner = _unwrapped(hint)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if isinstance(inner, type) and issubclass(inner, Enum):
        noun = f"one of {', '.join(str(member.value) for member in inner)}"
    elif origin is list:
        item = _unwrapped(args[0]) if args else Any
        plural = (f"values from {', '.join(str(m.value) for m in item)}" if isinstance(item, type)
                  and issubclass(item, Enum) else TYPE_WORDS.get(item, ("", "values", ""))[1])
        noun = f"a list of {plural}"
    elif origin is dict:
        noun = "a mapping of keys to values"
    elif is_dataclass(inner):
        noun = f"a mapping with the keys {', '.join(_keys(inner))}"
    else:
        noun = TYPE_WORDS.get(inner, (getattr(inner, "__name__", str(inner)),))[0]
    return noun if inner is hint else f"{noun} or null"


_UNSET = object()


def _current(error: OmegaConfBaseException) -> Any:
    """The field's value before this override (interpolations as written), or ``_UNSET``."""
    parent = error.parent_node
    if isinstance(parent, ListConfig) or not isinstance(parent, DictConfig) or error.key not in parent:
        return _UNSET
    if OmegaConf.is_missing(parent, error.key):
        return _UNSET
    return OmegaConf.to_container(parent, resolve=False, enum_to_str=True)[error.key]


def _now(error: OmegaConfBaseException) -> str:
    current = _current(error)
    return "" if current is _UNSET else f" (now {_override_text(current)})"


def _given(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else _override_text(value)


def _example(key: str, value: Any) -> str:
    return "" if value is _UNSET else f", e.g. {key}={_override_text(value)}"


def _example_value(hint, given: Any, override: Optional[str]) -> Any:
    """A value of type ``hint`` close to what was given: 1000 for 1e3, [4] for 4, '[a]' for a list given as text."""
    if hint is int and isinstance(given, float) and given.is_integer():
        return int(given)
    if typing.get_origin(hint) is list and _fits(typing.get_args(hint)[0], given):
        return [given]
    if hint is str and override:
        return _Quoted(_value_text(override))
    return _UNSET


def _fits(hint, value: Any) -> bool:
    """Whether ``value`` as given is already of type ``hint`` (for an example built from it)."""
    hint = _unwrapped(hint)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return value in {member.value for member in hint}
    accepted = ACCEPTED.get(hint, ())
    return isinstance(value, accepted) and (bool in accepted or not isinstance(value, bool))


class _Quoted(str):
    """Text shown in Hydra's quotes, so that brackets and commas stay text."""


def _override_text(value: Any) -> str:
    """``value`` as it is written in an override: null, true, [1,4], {a:1}."""
    if isinstance(value, _Quoted):
        return f"'{value}'"
    if isinstance(value, Enum):
        return str(value.value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return f"[{','.join(_override_text(item) for item in value)}]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{_override_text(item)}" for key, item in value.items()) + "}"
    return str(value)


def _keys(schema: type) -> List[str]:
    return [f.name for f in fields(schema)]
