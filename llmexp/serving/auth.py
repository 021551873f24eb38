"""API keys for ``llmexp serve``, in OpenAI's convention: ``Authorization: Bearer <key>``.

Keys come from the environment (``LLMEXP_API_KEY``: one key, or several separated by commas) and
from a file (``--api-key-file``: one key per line, ``#`` comments), never from the command line,
where shell history and process lists keep them. Several keys let clients move to a new key
before the old one is dropped. With keys set, every path but ``/health`` (a liveness probe that
says nothing but "ok") needs one of them: ``/v1/*`` and ``/metrics`` answer 401 without.

Keys are compared as SHA-256 digests with ``hmac.compare_digest`` against every key, so the time
taken says neither how much of a key was right nor which key matched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Mapping, Optional, Sequence

from llmexp.errors import UserError

if TYPE_CHECKING:  # the command line reads keys before starlette is needed
    from starlette.responses import Response
    from starlette.types import ASGIApp, Receive, Scope, Send

ENV_VAR = "LLMEXP_API_KEY"
OPEN_PATHS = frozenset({"/health"})
KEY_CHARS_MIN = 16
KEY_PATTERN = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: what a header carries unchanged
NEW_KEY_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def read_api_keys(environ: Mapping[str, str], key_file: Optional[Path]) -> List[str]:
    """The keys in ``LLMEXP_API_KEY`` (comma-separated) and in ``key_file`` (one per line); a bad key is a
    ``UserError`` that says where it is, never what it is."""
    keys: List[str] = []
    if environ.get(ENV_VAR, "").strip():
        keys += _checked([key.strip() for key in environ[ENV_VAR].split(",")], ENV_VAR)
    if key_file is not None:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"--api-key-file {key_file}: cannot read it ({getattr(error, 'strerror', None) or error}). "
                            "Give a readable text file holding one key per line.") from None
        found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise UserError(f"--api-key-file {key_file} holds no key. Put one key per line ({NEW_KEY_HINT} makes one).")
        keys += _checked(found, f"--api-key-file {key_file}")
    return keys


def _checked(keys: List[str], where: str) -> List[str]:
    for number, key in enumerate(keys, 1):
        if not KEY_PATTERN.fullmatch(key) or "," in key:
            raise UserError(f"{where}: key {number} is empty or holds spaces, commas or characters outside printable "
                            f"ASCII. Give keys of letters, digits and punctuation ({NEW_KEY_HINT} makes one).")
        if len(key) < KEY_CHARS_MIN:
            raise UserError(f"{where}: key {number} has {len(key)} characters; give keys of at least "
                            f"{KEY_CHARS_MIN}, e.g. from {NEW_KEY_HINT}.")
    return keys


class RequireApiKey:
    """ASGI middleware: a request to any path but ``OPEN_PATHS`` without one of ``keys`` gets ``reject(message)``.

    Runs before routing and body parsing, so a client without a key learns nothing about the API.
    """

    def __init__(self, app: ASGIApp, keys: Sequence[str], reject: Callable[[str], Response]) -> None:
        self.app = app
        self.digests = [hashlib.sha256(key.encode()).digest() for key in keys]
        self.reject = reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        token = _bearer_token(scope)
        if token is None:
            message = ("this server needs an API key: send the header `Authorization: Bearer <key>` "
                       "(OpenAI clients: api_key=...).")
        elif not self._known(token):
            message = "the API key sent is not one of this server's keys; check it (keys may have been rotated)."
        else:
            await self.app(scope, receive, send)
            return
        await self.reject(message)(scope, receive, send)

    def _known(self, token: bytes) -> bool:
        digest = hashlib.sha256(token).digest()
        found = False
        for known in self.digests:  # no early exit: every key is compared
            found |= hmac.compare_digest(digest, known)
        return found


def _bearer_token(scope: Scope) -> Optional[bytes]:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None
