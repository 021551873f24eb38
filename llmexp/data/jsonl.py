"""JSON Lines: one JSON object per line, the format of most instruction and test sets.

Reading reports a bad line by ``file:line`` so a user can open it in an editor; writing is
atomic (a temporary file beside the target, then ``os.replace``), so a reader never sees
half a file and an interrupted run leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Tuple, Union

from llmexp.atomic import replace_atomically
from llmexp.errors import UserError

PathLike = Union[str, "os.PathLike[str]"]

_FIX = "Each line of a JSONL file must hold one JSON object ({...}); fix or delete that line."


def read_jsonl_numbered(path: PathLike) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of ``path``; line numbers are 1-based.

    A missing file, a line that is not UTF-8 or not JSON (nesting too deep to parse included),
    or a JSON value that is not an object raises ``UserError`` naming ``file:line``.
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise UserError(
            f"{path} does not exist (relative paths are resolved against {Path.cwd()}). "
            "Give the path of an existing JSONL file."
        ) from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a JSONL file. Give the path of a .jsonl file in it.") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise UserError(
                    f"{path}:{number}: not UTF-8 text (byte {error.start + 1} of the line). "
                    "Save the file as UTF-8."
                ) from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                message = f"not valid JSON ({error.msg}, column {error.colno})"
                raise UserError(f"{path}:{number}: {message}. {_FIX}") from None
            except RecursionError:  # Python's parser recurses once per nesting level
                limit = sys.getrecursionlimit()
                raise UserError(
                    f"{path}:{number}: JSON nested deeper than Python's parser follows (about {limit} levels "
                    f"of [ and {{). {_FIX}"
                ) from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: a JSON {_json_kind(record)}, not an object. {_FIX}")
            yield number, record


def read_jsonl(path: PathLike) -> Iterator[Dict[str, Any]]:
    """Every object in ``path``, in file order; blank lines are skipped (see ``read_jsonl_numbered``)."""
    for _, record in read_jsonl_numbered(path):
        yield record


def write_jsonl(path: PathLike, records: Iterable[Dict[str, Any]]) -> Path:
    """Write ``records`` one per line to ``path`` atomically and return the path."""

    def write(handle) -> None:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    return replace_atomically(path, write)


def require_text(path: PathLike, line: int, record: Dict[str, Any], keys: Iterable[str], fix: str) -> None:
    """Raise ``UserError`` at ``file:line`` unless every key of ``keys`` holds text in ``record``; ``fix`` ends the message."""
    for key in keys:
        if not isinstance(record.get(key), str):
            state = "missing" if key not in record else f"{_json_kind(record[key])}, not text"
            present = ", ".join(sorted(record)) or "none"
            raise UserError(f"{path}:{line}: the {key!r} field is {state} (keys on that line: {present}). {fix}")


def _json_kind(value: Any) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)
