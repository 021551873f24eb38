"""Whole directories written atomically, and files placed by hard link where the filesystem allows.

A checkpoint, an engine or a model repository is only usable whole: a server started on a
half-written one fails in confusing ways. So each is built in a temporary sibling directory
and renamed into place (``llmexp.atomic`` does the same for single files). Weights and engines
already on disk are hard-linked rather than copied: a 140 GB checkpoint costs no space or time
twice. Small files (configs, tokenizers) are copied, so that editing one never edits its source.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

LINKED_SUFFIXES = (".safetensors", ".engine", ".bin")  # written once, never edited in place


def write_directory(target: Path, fill: Callable[[Path], T]) -> T:
    """Run ``fill(temporary)`` on a fresh sibling of ``target``, then rename it to ``target``; returns fill's value.

    An existing ``target`` (a run done again) is moved aside first and removed after; between the two
    renames the path is briefly absent, never partly written. On any error the temporary one is removed
    and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}.{secrets.token_hex(4)}"
    temporary = target.with_name(f".{target.name}.{stamp}.tmp")
    temporary.mkdir()
    try:
        result = fill(temporary)
        if target.exists():
            old = target.with_name(f".{target.name}.{stamp}.old")
            os.replace(target, old)
            os.replace(temporary, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return result


def place_file(source: Path, destination: Path) -> None:
    """``source`` at ``destination``: weights and engines hard-linked (copied across filesystems), the rest copied.

    A symbolic link is followed: the Hugging Face cache's snapshot files are relative links to its blobs, and
    ``os.link`` on Linux links the link itself, which would dangle at ``destination``.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    if Path(source).suffix in LINKED_SUFFIXES:
        try:
            os.link(os.path.realpath(source), destination)
            return
        except OSError:
            pass
    shutil.copy2(source, destination)


def place_tree(source: Path, destination: Path) -> None:
    """Every file under ``source`` placed at the same relative path under ``destination``."""
    for path in sorted(Path(source).rglob("*")):
        if path.is_file():
            place_file(path, destination / path.relative_to(source))


def directory_bytes(directory: Path) -> int:
    """Bytes of every file under ``directory``."""
    return sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file())
