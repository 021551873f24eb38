"""``llmexp cp [--force] technique=<name>|pipeline=<name> [overrides] FILE.yaml``: settings to edit and run from.

A technique's settings live in its schema (a dataclass), not in a YAML file one could copy
as with torchtune's ``tune cp``; this writes the composed node instead, every key at its
value with the overrides applied, commented from the schema's source. The file is a primary
config built on llmexp's own, like the files of sweeps/ (``defaults: [config, override
technique: lora, _self_]``), so Hydra merges it onto the schema and refuses a misspelled key
or a wrong type when it composes, and ``llmexp --config-dir DIR --config-name NAME`` runs it.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import re
import shlex
import textwrap
import tokenize
from dataclasses import is_dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf

from llmexp.atomic import replace_atomically
from llmexp.configuration.compose import CONFIG_NAME, compose_config
from llmexp.errors import UserError

GROUPS = ("technique", "pipeline")
# What the copy's defaults choose besides its own option: a technique runs with its evaluation.
ALSO_CHOSEN = {"technique": ["override pipeline: technique_then_evaluation"], "pipeline": []}


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llmexp cp",
        description="Write a technique's or pipeline's settings, every key at its value, to a YAML file to edit "
        "and run with `llmexp --config-dir DIR --config-name NAME`.",
        epilog="example: llmexp cp technique=lora technique.rank=8 my_lora.yaml && "
        "llmexp --config-dir . --config-name my_lora",
    )
    parser.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    parser.add_argument("source", help="technique=<name> or pipeline=<name>")
    parser.add_argument("overrides", nargs="*", help="overrides of that node's keys, as for `llmexp`")
    parser.add_argument("file", type=Path, help="the YAML file to write; its name is the config's name")
    args = parser.parse_args(argv)

    group, option = _source(args.source)
    destination = _destination(args.file, args.force)
    for override in args.overrides:
        if _top_key(override) != group:
            raise UserError(
                f"{override}: `llmexp cp {args.source}` writes the {group} node only, so this override would be "
                f"left out of {args.file}; give keys of {group} here ({group}.<key>=<value>), and other choices "
                f"when you run the file.")
    node = compose_config([args.source, *args.overrides])[group]
    command = shlex.join(["llmexp", "cp", *argv])
    run = shlex.join(["llmexp", "--config-dir", str(args.file.parent), "--config-name", args.file.stem])
    replace_atomically(destination, lambda handle: handle.write(copied_config(group, option, node, command, run)))
    print(f"wrote {args.file}: {group}={option}, every setting at its value. Edit it, then run it:\n  {run}")
    return 0


def _source(source: str) -> Tuple[str, str]:
    match = re.fullmatch(rf"({'|'.join(GROUPS)})=(\w+)", source)
    if match is None:
        raise UserError(
            f"{source}: `llmexp cp` copies a technique or a pipeline; give technique=<name> or pipeline=<name> first, "
            "e.g. `llmexp cp technique=lora my_lora.yaml` (`llmexp --help` lists the options).")
    return match.group(1), match.group(2)


def _destination(file: Path, force: bool) -> Path:
    """``file``, checked: a YAML file that is not llmexp's own config name, and not overwritten unless ``force``."""
    if file.suffix not in (".yaml", ".yml"):
        raise UserError(f"{file}: the copy is a YAML file whose name is its config's name; give one ending in "
                        f".yaml, e.g. {file.with_suffix('.yaml').name}.")
    if file.stem == CONFIG_NAME:
        raise UserError(f"{file}: {CONFIG_NAME} is the name of llmexp's own config, which the copy builds on; "
                        f"give the file another name, e.g. my_{CONFIG_NAME}.yaml.")
    if file.is_dir():
        raise UserError(f"{file} is a directory; give the YAML file to write, e.g. {file / 'my_config.yaml'}.")
    if file.exists() and not force:
        raise UserError(f"{file} exists; give --force to overwrite it, or another file name.")
    return file


def _top_key(override: str) -> str:
    """The top-level node an override sets: ``pipeline`` for ``technique@pipeline.nodes.x=sft``."""
    key = override.lstrip("+~").split("=", 1)[0]
    return key.split("@", 1)[-1].split(".", 1)[0]


def copied_config(group: str, option: str, node: DictConfig, command: str, run: str) -> str:
    """The file's text: a header saying how to run it, the defaults that give it its schema, then every setting."""
    chosen = [f"override {group}: {option}", *ALSO_CHOSEN[group]]
    lines = [
        f"# {group}={option} with every setting at its value, from `{command}`.",
        f"# Edit the values; Hydra checks every key and type against {group}={option}'s schema when it composes this.",
        f"# Run it:      {run} [overrides]",
        f"# See it all:  {run.replace('llmexp ', 'llmexp --cfg job ', 1)}",
        "defaults:",
        f"  - {CONFIG_NAME}  # llmexp's own config: every other group as usual",
        *(f"  - {entry}" for entry in chosen),
        "  - _self_",
        "",
    ]
    if group == "pipeline":
        lines += ["# A stage of your own: add it to pipeline.stages and its technique to the defaults above,",
                  "# e.g. `- technique@pipeline.nodes.my_stage: quantize`."]
    lines += [f"{group}:{_inline(_summary(OmegaConf.get_type(node)))}", *_setting_lines(node, "  ")]
    return "\n".join(lines) + "\n"


def _setting_lines(node: DictConfig, indent: str) -> List[str]:
    """Every key of ``node`` as YAML, with its schema's comments; interpolations stay as written."""
    values = OmegaConf.to_container(node, resolve=False, enum_to_str=True)
    comments = field_comments(OmegaConf.get_type(node))
    lines = []
    for key, value in values.items():
        above, inline = comments.get(key, ([], None))
        lines += [f"{indent}# {line}" for line in above]
        if isinstance(value, dict) and value and not OmegaConf.is_interpolation(node, key):
            child = node[key]
            lines.append(f"{indent}{key}:{_inline(inline or _summary(OmegaConf.get_type(child)))}")
            lines += _setting_lines(child, indent + "  ")
            continue
        lines.append(f"{indent}{key}: {_flow(value)}{_inline(inline)}")
    return lines


def _flow(value) -> str:
    """``value`` as one line of YAML (flow style: [a, b], {k: v}), quoted where YAML would read it otherwise."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("\n...\n").strip()


def _inline(comment: Optional[str]) -> str:
    return f"  # {comment}" if comment else ""


def _summary(schema) -> Optional[str]:
    """The first line of a schema's own docstring (not the signature dataclasses write when it has none)."""
    doc = schema.__dict__.get("__doc__") if is_dataclass(schema) else None
    if not doc or doc.startswith(f"{schema.__name__}("):
        return None
    return inspect.cleandoc(doc).splitlines()[0]


def field_comments(schema) -> Dict[str, Tuple[List[str], Optional[str]]]:
    """field -> (the comment lines just above it, the comment ending its line), from the schema's source.

    The schemas document their fields in comments, which Python keeps nowhere at run time;
    a subclass that redefines a field without a comment keeps its base class's.
    """
    comments: Dict[str, Tuple[List[str], Optional[str]]] = {}
    for cls in reversed(getattr(schema, "__mro__", ())):
        if not is_dataclass(cls):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(cls))
        except (OSError, TypeError):  # defined where no source can be read
            continue
        lines = source.splitlines()
        ending = {token.end[0]: token.string.lstrip("#").strip()
                  for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
        for statement in ast.parse(source).body[0].body:
            if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
                continue
            above = _comment_block_above(lines, statement.lineno)
            inline = ending.get(statement.end_lineno)
            if above or inline:
                comments[statement.target.id] = (above, inline)
    return comments


def _comment_block_above(lines: Sequence[str], lineno: int) -> List[str]:
    """The comment lines directly above line ``lineno`` (1-based), top first."""
    block: List[str] = []
    for line in reversed(lines[:lineno - 1]):
        if not line.strip().startswith("#"):
            break
        block.insert(0, line.strip().lstrip("#").strip())
    return block
