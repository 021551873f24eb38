"""Atomic file replacement: readers see the old file or the new one, never a part of either.

The content goes to a temporary file beside the target (same filesystem), is flushed and
fsynced, then ``os.replace``-d over it, and the directory is fsynced so the rename survives
a crash. On any error the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import IO, Any, Callable


def replace_atomically(path: Path | str, write: Callable[[IO[Any]], None], binary: bool = False) -> Path:
    """Write ``path`` through ``write(handle)`` (text, UTF-8; or ``binary``) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 lets the umask decide the mode, as a plain open() would
    # (tempfile's 0600 would hide results from the rest of a team on a shared cluster).
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
