"""Continuous batching: one worker thread runs the model, requests join and leave between decoding steps.

``Engine.submit`` validates a ``GenerationRequest``, queues it (``QueueFull`` past
``max_queue`` waiting, never an unbounded backlog) and returns a ``GenerationStream`` of
``GenerationChunk``s. Each iteration of the worker (1) drops rows whose client went away,
(2) prefills the waiting requests that fit in ``max_batch_size`` as one left-padded batch and
merges their KV cache into the running batch, and (3) runs one decoding step for every row;
a row that ends (EOS, a stop string, ``max_tokens``) leaves the batch at once. So a request
arriving while others decode joins at the next step, not the next batch.

One request never fails another. Its fields are checked against ``llmexp.serving.limits`` before
it queues; sampling is computed so that every value inside those limits stays finite. A failure
that still happens in the worker is pinned on the rows that cause it: a row whose logits are not
numbers, or whose sampling or text raises, ends alone with ``RequestFailed``; a batched forward
pass that raises is retried row by row (each prompt alone; each running sequence alone), the rows
that fail by themselves end with ``RequestFailed`` and the others go on. Only a failure no single
row reproduces fails the running batch (``GenerationFailed``); the queue waits for the next one.

Why not transformers' own ``ContinuousBatchingManager`` (``generate_batch``): in 5.24 it runs
on the CPU and gives the same greedy tokens, but it packs every request into one ragged row,
so PEFT's per-row ``adapter_names`` cannot pick each request's LoRA adapter in a mixed
batch; it has one sampler seed for all requests (no per-request ``seed``) and only the
sampling processors fixed when the manager starts. Hence this loop over transformers'
``DynamicCache``: rows left-padded to a common length, a per-row attention mask and position
ids (so each row sees exactly the positions it would alone), new rows prefilled on their own
and their cache left-padded and concatenated onto the batch's, finished rows selected away
and all-padding leading columns trimmed. Greedy decoding through it equals
``model.generate(do_sample=False)`` for each prompt alone (tests/test_serving_engine.py).

On a CPU, load torch with ``OMP_WAIT_POLICY=PASSIVE`` (``llmexp serve`` sets it): OpenMP threads
that spin between the worker's steps starve the threads reading the streams, and decoding
slowed 8x on 2 cores without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Deque, Iterator, List, Optional, Sequence, Tuple

import torch

from llmexp.serving.limits import InvalidRequest, check_sampling, check_text
from llmexp.serving.metrics import ServingMetrics
from llmexp.serving.served_models import ServedModels


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

    # called by the worker thread
    def _put(self, item: Any) -> None:
        with self._lock:
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._async.put_nowait, item)
                except RuntimeError:  # the reader's event loop has closed: nobody will read, stop generating
                    self.cancelled = True
            else:
                self._sync.put(item)

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


class _TextTracker:
    """Turns a row's token ids into text deltas, and finds its stop strings.

    Decodes all ids so far each step (tokenizers merge pieces across tokens: a word-level
    one joins words with spaces, byte-level BPE completes characters), sends what is new,
    and holds back an incomplete character and any tail that could begin a stop string, so
    streamed text never shows what a stop string later removes.
    """

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: List[int] = []
        self.sent = 0  # characters of the text already sent

    def push(self, token_id: int) -> Tuple[str, bool]:
        """Add a token; return (text to send now, whether a stop string was reached)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return "", False
        stops = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if stops:
            return self._advance(text, min(stops)), True
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._advance(text, len(text) - hold), False

    def flush(self) -> str:
        """The held-back text, sent when the row ends for another reason than a stop string."""
        return self._advance(self.tokenizer.decode(self.ids, skip_special_tokens=True), None)

    def _advance(self, text: str, end: Optional[int]) -> str:
        end = len(text) if end is None else end
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta


@dataclass
class _Row:
    """A request in the engine: waiting, then one row of the running batch."""

    request: GenerationRequest
    stream: GenerationStream
    prompt_ids: List[int]
    adapter: str
    max_tokens: int
    text: _TextTracker
    generator: Optional[torch.Generator]
    submitted_at: float
    first_token_at: Optional[float] = None
    generated: int = 0
    next_token: int = -1  # sampled, not yet fed to the model
    finish_reason: Optional[str] = None


@dataclass
class _Batch:
    """The running batch: its rows, their KV cache and left-padded attention mask [rows, positions]."""

    rows: List[_Row] = field(default_factory=list)
    cache: Any = None
    mask: Optional[torch.Tensor] = None


class Engine:
    """Continuous batching over one model (see the module docstring); starts its worker thread at once."""

    def __init__(
        self,
        served_models: ServedModels,
        max_batch_size: int = 16,
        max_queue: int = 64,
        metrics: Optional[ServingMetrics] = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_queue >= 0, not {max_batch_size} and {max_queue}")
        self.served = served_models
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics or ServingMetrics()
        self.prefill_steps = 0  # forward passes that prefilled new rows
        self.decode_steps = 0  # forward passes that decoded one token for every running row
        self.generated_tokens = 0
        self._check_cache_layout()
        self._cache_keyword = _cache_keyword(served_models.model)
        self._eos = frozenset(served_models.eos_token_ids)
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._hold = threading.Lock()  # held by the worker through each iteration, and by paused()
        self._waiting: Deque[_Row] = deque()
        self._batch = _Batch()
        self._admitted: List[_Row] = []  # taken from the queue, not yet in the batch (during their prefill)
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="llmexp-serve-engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ public API
    def submit(self, request: GenerationRequest) -> GenerationStream:
        """Queue ``request``; raises ``UnknownModel``, ``InvalidRequest`` or ``QueueFull`` at once."""
        adapter = self.served.adapter_for(request.model)
        if adapter is None:
            raise UnknownModel(
                f"model {request.model!r} is not served here; served models: {', '.join(self.served.names)}."
            )
        check_sampling(request.max_tokens, request.temperature, request.top_p, request.seed, request.stop)
        prompt_ids = self._prompt_ids(request)
        self._check_context(prompt_ids, request.max_tokens)
        generator = None
        if request.temperature > 0:
            generator = torch.Generator()
            if request.seed is None:
                generator.seed()
            else:
                generator.manual_seed(request.seed)
        with self._lock:
            if self._closed:
                raise GenerationFailed("the engine is closed")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} requests are already waiting (max_queue={self.max_queue}); retry shortly."
                )
            request_id = f"cmpl-{next(self._ids)}"
            stream = GenerationStream(request_id, len(prompt_ids), lambda: self._wake())
            row = _Row(request, stream, prompt_ids, adapter, request.max_tokens,
                       _TextTracker(self.served.tokenizer, request.stop), generator, time.perf_counter())
            self._waiting.append(row)
            self.metrics.queue_depth.set(len(self._waiting))
            self._lock.notify()
        return stream

    @property
    def waiting_count(self) -> int:
        """Requests queued for a batch slot."""
        return len(self._waiting)

    @property
    def running_count(self) -> int:
        """Requests in the running batch."""
        return len(self._batch.rows)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the worker between two steps for the block: requests still queue (and overflow) meanwhile.

        For moments the model must not run (inspecting or changing it), and for tests that need a
        queue to fill deterministically.
        """
        with self._hold:
            yield
        self._wake()

    def close(self) -> None:
        """Stop the worker; requests not finished end with ``GenerationFailed``. Idempotent."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if threading.current_thread() is not self._worker:
            self._worker.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------ validation
    def _prompt_ids(self, request: GenerationRequest) -> List[int]:
        if (request.prompt is None) == (request.prompt_ids is None):
            raise InvalidRequest("give exactly one of prompt (text) and prompt_ids (token ids).", param="prompt")
        if request.prompt_ids is not None:
            if any(isinstance(i, bool) or not isinstance(i, int) for i in request.prompt_ids):
                raise InvalidRequest("prompt token ids must be whole numbers.", param="prompt")
            ids = list(request.prompt_ids)
            vocab = self.served.model.get_input_embeddings().num_embeddings
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise InvalidRequest(f"prompt token ids {bad[:5]} are outside this model's vocabulary [0, {vocab}).",
                                     param="prompt")
        else:
            check_text(request.prompt, "prompt")
            ids = self.served.tokenizer(request.prompt)["input_ids"]
        if not ids:
            raise InvalidRequest("the prompt is empty (no tokens); give some text.", param="prompt")
        return ids

    def _check_context(self, prompt_ids: List[int], max_tokens: int) -> None:
        context = self.served.context_length
        if len(prompt_ids) >= context:
            raise InvalidRequest(
                f"the prompt is {len(prompt_ids)} tokens; this model's context is {context} tokens, prompt and "
                "completion together. Shorten the prompt.", param="prompt"
            )
        if len(prompt_ids) + max_tokens > context:
            raise InvalidRequest(
                f"max_tokens={max_tokens} with a {len(prompt_ids)}-token prompt exceeds the {context}-token "
                f"context; ask for max_tokens <= {context - len(prompt_ids)}.", param="max_tokens"
            )

    def _check_cache_layout(self) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=self.served.model.config).layers
        odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
        if odd:
            raise ValueError(
                f"this engine batches full-attention KV caches only; the model's cache has {', '.join(sorted(odd))} layers"
            )

    # ------------------------------------------------------------------ the worker
    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not self._batch.rows:
                    self._lock.wait()
                if self._closed:
                    break
            with self._hold:
                try:
                    self._iteration()
                except Exception as error:  # no single row reproduces it: the batch in flight fails, the queue waits
                    traceback.print_exc(file=sys.stderr)
                    self._fail_running(GenerationFailed(f"generation failed: {type(error).__name__}: {error}"))
        closed = GenerationFailed("the engine closed before this request finished")
        self._fail_running(closed)
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
            self.metrics.queue_depth.set(0)
        for row in waiting:
            self._fail(row, closed)

    def _iteration(self) -> None:
        batch = self._batch
        cancelled = [i for i, row in enumerate(batch.rows) if row.stream.cancelled]
        for i in cancelled:
            self._end(batch.rows[i], "cancelled")
        if cancelled:
            self._keep_unfinished()
        self._admitted = self._admit()
        if self._admitted:
            self._prefill(self._admitted)
            self._admitted = []
        if self._batch.rows:
            self._decode()
        self.metrics.running.set(len(self._batch.rows))

    def _admit(self) -> List[_Row]:
        """Waiting rows that fit in the batch, oldest first; cancelled ones leave the queue here."""
        admitted: List[_Row] = []
        with self._lock:
            for row in [row for row in self._waiting if row.stream.cancelled]:
                self._waiting.remove(row)
                self._end(row, "cancelled")
            while self._waiting and len(self._batch.rows) + len(admitted) < self.max_batch_size:
                admitted.append(self._waiting.popleft())
            self.metrics.queue_depth.set(len(self._waiting))
        return admitted

    def _forward(self, input_ids, mask, position_ids, cache, rows: List[_Row], **kwargs):
        extra = {"adapter_names": [row.adapter for row in rows]} if self.served.has_adapters else {}
        with torch.inference_mode():
            out = self.served.model(
                input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                use_cache=True, **{self._cache_keyword: cache}, **extra, **kwargs,
            )
        return out.logits[:, -1, :].float()

    def _run_prompts(self, rows: List[_Row], sequences: List[List[int]]):
        """(last-position logits, KV cache, attention mask) of ``sequences`` run left-padded together, fresh cache."""
        from transformers import DynamicCache

        width = max(len(ids) for ids in sequences)
        pad = self.served.tokenizer.pad_token_id
        device = self.served.model.device
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in sequences], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in sequences], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.served.model.config)
        logits = self._forward(input_ids, mask, positions, cache, rows, logits_to_keep=1)
        return logits, cache, mask

    def _prefill(self, rows: List[_Row]) -> None:
        """Run the new rows' prompts together, sample their first tokens, merge them into the batch.

        If that raises, each row is prefilled alone: only the rows that fail by themselves end.
        """
        try:
            logits, cache, mask = self._run_prompts(rows, [row.prompt_ids for row in rows])
        except Exception as error:
            if len(rows) == 1:
                self._fail(rows[0], _failed_alone(error))
            else:
                for row in rows:
                    self._prefill([row])
            return
        self.prefill_steps += 1
        self.metrics.forward_steps.labels("prefill").inc()
        self.metrics.batch_size.labels("prefill").observe(len(rows))
        for row in rows:
            self.metrics.prompt_tokens.labels(row.request.model).inc(len(row.prompt_ids))
        self._take_tokens(rows, logits)
        self._merge(rows, cache, mask)
        self._keep_unfinished()

    def _decode(self) -> None:
        """One token for every running row.

        If the batched step raises, the cache goes back to before it and each running sequence
        is run alone: the rows that fail by themselves end, the others decode at the next step.
        """
        batch = self._batch
        width = batch.mask.shape[1]
        input_ids = torch.tensor([[row.next_token] for row in batch.rows], device=batch.mask.device)
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        positions = mask.sum(-1, keepdim=True) - 1
        try:
            logits = self._forward(input_ids, mask, positions, batch.cache, batch.rows)
        except Exception:
            for layer in batch.cache.layers:  # layers the failed step already extended
                layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]
            failures = {id(row): self._fails_alone(row) for row in batch.rows}
            if not any(failures.values()):
                raise
            for row in batch.rows:
                if failures[id(row)] is not None:
                    self._fail(row, failures[id(row)])
            self._keep_unfinished()
            return
        batch.mask = mask
        self.decode_steps += 1
        self.metrics.forward_steps.labels("decode").inc()
        self.metrics.batch_size.labels("decode").observe(len(batch.rows))
        self._take_tokens(batch.rows, logits)
        self._keep_unfinished()

    def _fails_alone(self, row: _Row) -> Optional[RequestFailed]:
        """The row's whole sequence so far (prompt and generated tokens) run by itself: the error, None if it runs."""
        try:
            self._run_prompts([row], [row.prompt_ids + row.text.ids])
        except Exception as error:
            return _failed_alone(error)
        return None

    def _merge(self, rows: List[_Row], cache, mask: torch.Tensor) -> None:
        """Append prefilled rows to the batch: both caches left-padded to the longer, then concatenated."""
        batch = self._batch
        if not batch.rows:
            batch.rows, batch.cache, batch.mask = list(rows), cache, mask
            return
        width = max(batch.mask.shape[1], mask.shape[1])
        for old, new in zip(batch.cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, width, -2), _left_pad(new.keys, width, -2)])
            old.values = torch.cat([_left_pad(old.values, width, -2), _left_pad(new.values, width, -2)])
        batch.mask = torch.cat([_left_pad(batch.mask, width, -1), _left_pad(mask, width, -1)])
        batch.rows.extend(rows)

    def _keep_unfinished(self) -> None:
        """Drop finished rows from the batch, and the leading positions that are padding in every row left."""
        batch = self._batch
        keep = [i for i, row in enumerate(batch.rows) if row.finish_reason is None]
        if len(keep) == len(batch.rows):
            return
        if not keep:
            self._batch = _Batch()
            return
        index = torch.tensor(keep, device=batch.mask.device)
        mask = batch.mask[index]
        start = int((mask.sum(0) > 0).nonzero()[0])  # first position some row still uses
        batch.mask = mask[:, start:]
        for layer in batch.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        batch.rows = [batch.rows[i] for i in keep]

    # ------------------------------------------------------------------ sampling and output
    def _take_tokens(self, rows: List[_Row], logits: torch.Tensor) -> None:
        """Each row's next token; a row whose logits are not numbers, or whose token cannot be taken, ends alone."""
        greedy = logits.argmax(-1).tolist()
        not_numbers = (logits.isnan() | logits.isposinf()).any(-1).tolist()
        now = time.perf_counter()
        for i, row in enumerate(rows):
            if row.stream.cancelled:
                self._end(row, "cancelled")
                continue
            try:
                if not_numbers[i]:
                    raise FloatingPointError("the model's output (logits) for this request holds NaN or +inf")
                token = greedy[i] if row.request.temperature == 0 else self._sample(row, logits[i])
                self._emit(row, token, now)
            except Exception as error:
                self._fail(row, _failed_alone(error))

    @staticmethod
    def _sample(row: _Row, logits: torch.Tensor) -> int:
        """Temperature, then top-p (transformers' warper), then a draw from the row's seeded generator.

        In float64, with the largest logit shifted to 0 before dividing, every positive temperature
        the limits allow stays finite: a tiny one sends the other tokens to -inf, a greedy draw (in
        float32, a temperature of 1e-300 was a zero divisor and the softmax all NaN).
        """
        from transformers import TopPLogitsWarper

        scores = logits.double()
        scores = ((scores - scores.max()) / row.request.temperature)[None]
        if row.request.top_p < 1:
            scores = TopPLogitsWarper(row.request.top_p)(None, scores)
        # drawn on the CPU, where the row's generator lives: the same seed gives the same text on any device
        return int(torch.multinomial(scores.softmax(-1)[0].cpu(), 1, generator=row.generator))

    def _emit(self, row: _Row, token: int, now: float) -> None:
        model = row.request.model
        if row.first_token_at is None:
            row.first_token_at = now
            self.metrics.ttft.labels(model).observe(now - row.submitted_at)
        row.generated += 1
        row.next_token = token
        row.stream.completion_tokens = row.generated
        self.generated_tokens += 1
        self.metrics.generated_tokens.labels(model).inc()
        finish = None
        if token in self._eos and not row.request.ignore_eos:
            text, finish = row.text.flush(), "stop"
        else:
            text, stopped = row.text.push(token)
            if stopped:
                finish = "stop"
            elif row.generated >= row.max_tokens or len(row.prompt_ids) + row.generated >= self.served.context_length:
                text, finish = text + row.text.flush(), "length"
        row.stream._put(GenerationChunk(text, (token,), finish))
        if finish is not None:
            self._end(row, finish, now)

    def _end(self, row: _Row, reason: str, now: Optional[float] = None) -> None:
        row.finish_reason = reason
        if reason == "cancelled":
            row.stream._put(GenerationChunk("", (), "cancelled"))
        else:
            self.metrics.e2e.labels(row.request.model).observe((now or time.perf_counter()) - row.submitted_at)
        self.metrics.generations.labels(row.request.model, reason).inc()
        row.stream._put(_END)

    def _fail(self, row: _Row, error: GenerationFailed) -> None:
        """End ``row`` with ``error`` (its reader raises it); the rows around it are not touched."""
        if row.finish_reason is not None:
            return
        if isinstance(error, RequestFailed):  # the model's own error, for whoever runs the server
            traceback.print_exception(error.__cause__, file=sys.stderr)
        row.finish_reason = "error"
        self.metrics.generations.labels(row.request.model, "error").inc()
        row.stream._put(error)
        row.stream._put(_END)

    def _fail_running(self, error: GenerationFailed) -> None:
        """End the running batch and the rows being admitted with ``error``; the queue stays."""
        with self._lock:
            rows = [*self._batch.rows, *self._admitted]
            self._admitted = []
        self._batch = _Batch()
        self.metrics.running.set(0)
        for row in rows:
            self._fail(row, error)


def _failed_alone(error: Exception) -> RequestFailed:
    failure = RequestFailed(f"this request could not be generated ({type(error).__name__}: {error}); the requests "
                            "batched with it went on. Sent again unchanged, it fails again.")
    failure.__cause__ = error
    return failure


def _cache_keyword(model) -> str:
    """The forward argument taking the KV cache: ``cache`` since transformers 5.24, ``past_key_values`` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``tensor`` with zeros prepended along ``dim`` up to ``width`` (masked positions: their values are unseen)."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
