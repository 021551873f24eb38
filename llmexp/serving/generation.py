"""What a client of the serving engine submits and reads back: a request, its stream of chunks, how it can fail.

Pure Python (no torch): the HTTP layer and the benchmark clients build requests and read
streams; ``llmexp.serving.engine`` generates them. A stream is read blocking (``for chunk in
stream``, a thread per request) or on an event loop (``async for``); the engine's worker thread
posts onto whichever the reader chose.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, List, Optional, Sequence, Tuple


class QueueFull(Exception):
    """``max_queue`` requests are already waiting for a batch slot: retry later (HTTP 429)."""


class UnknownModel(LookupError):
    """The request names no served model or adapter (HTTP 404)."""


class GenerationFailed(RuntimeError):
    """The worker could not finish this request (the model raised, or the engine closed)."""


class RequestFailed(GenerationFailed):
    """This request alone could not be generated: the model fails on it by itself, while the rows batched with
    it went on. Sent again unchanged, it fails again (HTTP 422)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One completion to generate. Give ``prompt`` (text, tokenized with the tokenizer's special tokens, as
    ``tokenizer(prompt)`` does) or ``prompt_ids``. ``temperature`` 0 is greedy; ``stop`` strings end the
    text before them; ``ignore_eos`` keeps generating past EOS (for benchmarks: a fixed number of tokens)."""

    model: str
    prompt: Optional[str] = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: Optional[int] = None
    prompt_ids: Optional[Sequence[int]] = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationChunk:
    """What one decoding step added to a request: its text (may be empty while a possible stop string is held
    back), the token ids sampled, and on the last chunk ``finish_reason``: "stop" (EOS or a stop string),
    "length" (``max_tokens`` or the context), or "cancelled" (the stream was cancelled)."""

    text: str
    token_ids: Tuple[int, ...]
    finish_reason: Optional[str] = None


_END = object()  # after the last chunk (or an error) on a stream's channel


class GenerationStream:
    """The chunks of one request, as they are generated: ``for chunk in stream`` (blocking) or ``async for``.

    ``cancel()`` (a client went away) frees the request's batch slot at the next step.
    """

    def __init__(self, request_id: str, prompt_tokens: int, on_cancel) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.cancelled = False
        self._on_cancel = on_cancel
        self._lock = threading.Lock()
        self._sync: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._async: Optional["asyncio.Queue[Any]"] = None

    # called by the worker thread: a chunk or the request's error, then ``end()``
    def put(self, item: Any) -> None:
        with self._lock:
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._async.put_nowait, item)
                except RuntimeError:  # the reader's event loop has closed: nobody will read, stop generating
                    self.cancelled = True
            else:
                self._sync.put(item)

    def end(self) -> None:
        """After the last chunk or the error: readers stop."""
        self.put(_END)

    def cancel(self) -> None:
        """Stop generating for this request; its slot is freed at the next step. Idempotent."""
        if not self.cancelled:
            self.cancelled = True
            self._on_cancel()

    def __iter__(self) -> Iterator[GenerationChunk]:
        while True:
            item = self._sync.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        with self._lock:  # from now on the worker posts onto this event loop; move what it posted before
            self._loop = asyncio.get_running_loop()
            self._async = asyncio.Queue()
            while not self._sync.empty():
                self._async.put_nowait(self._sync.get())
        while True:
            item = await self._async.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def read_all(self) -> GenerationChunk:
        """Block until the request ends; its whole text, token ids and finish reason as one chunk."""
        return _joined(list(self))

    async def aread_all(self) -> GenerationChunk:
        """``read_all`` for an event loop."""
        return _joined([chunk async for chunk in self])


def _joined(chunks: List[GenerationChunk]) -> GenerationChunk:
    return GenerationChunk(
        "".join(c.text for c in chunks),
        tuple(t for c in chunks for t in c.token_ids),
        chunks[-1].finish_reason if chunks else None,
    )

