"""A bound on the size of a request body, so that no client makes the server hold (and tokenize) more than it
could ever use.

FastAPI 0.110, the oldest this package takes, has no such bound; Starlette's newer one answers
in plain text, not in OpenAI's error body. So this small ASGI middleware guards the ``receive``
channel instead and raises ``BodyTooLarge``, an HTTP 413 that the app answers like any other
error (counted, OpenAI's body; FastAPI re-raises HTTP errors met while reading a body):

* at the app's first read when ``Content-Length`` declares more than the limit, before a byte
  of the body is read (a client waiting on ``Expect: 100-continue`` never sends it);
* at the chunk that passes the limit when the body comes without a length (chunked).

The rest of an unread body is read and dropped by the HTTP server, so the connection stays usable.
"""

from __future__ import annotations

from typing import Optional

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

FLAG = "--max-body-bytes"


class BodyTooLarge(HTTPException):
    """HTTP 413: the body is (or would be) larger than the server takes; the detail names the limit and the flag."""

    def __init__(self, max_bytes: int, declared: Optional[int]) -> None:
        size = f"declares {declared} bytes" if declared is not None else f"passed {max_bytes} bytes"
        super().__init__(413, f"the request body {size}, above this server's limit of {max_bytes} bytes; send a "
                              f"shorter request, or start llmexp serve with a larger {FLAG}.")


class LimitBodySize:
    """ASGI middleware: a request that sends (or declares) more than ``max_bytes`` of body gets ``BodyTooLarge``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > self.max_bytes:
                raise BodyTooLarge(self.max_bytes, declared)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes, None)
            return message

        await self.app(scope, limited_receive, send)


def _declared_length(scope: Scope) -> Optional[int]:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None  # the HTTP server refuses a malformed one itself
    return None
