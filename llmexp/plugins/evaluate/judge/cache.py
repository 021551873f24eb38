"""A disk cache of LLM-judge verdicts, so that re-running an evaluation sends no request already answered.

The key is a SHA-256 of everything that decides the verdict: the template file's text
(prompt and parsing rules), the item's question, reference and answer, the judge model's
name, the endpoint URL and the request settings (temperature, reply token budget). The
URL is in the key on purpose: two servers may answer to the same model name with
different weights, and a wrong hit would silently mix two judges' scores, while a miss
only costs requests. The API key is not in the key nor in any cached file.

Only final verdicts are cached (scored, or unparsable after the retries: with temperature
0 a re-ask repeats the reply); transport and HTTP errors are not, so a re-run retries them.
One JSON file per key, ``<dir>/<key[:2]>/<key>.json``, written atomically: concurrent runs
sharing a cache never see a half-written entry. An unreadable entry counts as a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from llmexp.sdk import replace_atomically

_KEY_VERSION = 1


def default_cache_dir() -> Path:
    """``$LLMEXP_CACHE/judge`` when ``LLMEXP_CACHE`` is set, else ``~/.cache/llmexp/judge``."""
    root = os.environ.get("LLMEXP_CACHE")
    return Path(root) / "judge" if root else Path.home() / ".cache" / "llmexp" / "judge"


def cache_key(template_text: str, item: Mapping[str, str], model: str, url: str, request: Mapping[str, Any]) -> str:
    """The hex SHA-256 naming one verdict (see the module docstring for what goes in)."""
    content = {
        "version": _KEY_VERSION,
        "template": template_text,
        "item": {name: item.get(name) for name in ("question", "reference", "answer")},
        "model": model,
        "url": url.rstrip("/"),
        "request": dict(request),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class JudgeCache:
    """Verdict records by key under ``directory``."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        try:
            record = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("key") == key else None

    def put(self, key: str, record: Mapping[str, Any]) -> None:
        content = {**record, "key": key}
        replace_atomically(self._path(key), lambda handle: json.dump(content, handle, ensure_ascii=False))

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"
