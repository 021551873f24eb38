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
``DynamicCache``, batched as ``llmexp.serving.running_batch`` says. Greedy decoding through it
equals ``model.generate(do_sample=False)`` for each prompt alone (tests/test_serving_engine.py).

With a draft model (``ServedModels.draft``), each running row decodes by speculative rounds
(``llmexp.serving.speculative``): the draft proposes its ``num_speculative_tokens``, the target
checks them in one forward pass, and every accepted token is streamed as its own chunk, so EOS,
stop strings and ``max_tokens`` end a row exactly where they would without a draft (a round never
proposes past ``max_tokens`` or the context). Rows accept different numbers of tokens, so each keeps
caches of its own between rounds (``llmexp.serving.drafted_batch``); a round stacks them and runs
the draft's steps and the target's check as batched forwards over all rows
(``llmexp.serving.batched_speculation``). Greedy output equals the target's alone; sampled output follows the target's
distribution. ``speculation`` counts target forwards, proposed and accepted tokens.

On a CPU, load torch with ``OMP_WAIT_POLICY=PASSIVE`` (``llmexp serve`` sets it): OpenMP threads
that spin between the worker's steps starve the threads reading the streams, and decoding
slowed 8x on 2 cores without it.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time
import traceback
from collections import deque
from typing import Deque, Iterator, List, Optional, Union

import torch
from transformers import DynamicCache

from llmexp.serving.generation import (
    GenerationChunk, GenerationFailed, GenerationRequest, GenerationStream, QueueFull, RequestFailed, UnknownModel,
)
from llmexp.serving.limits import check_context, check_sampling, prompt_token_ids
from llmexp.serving.metrics import ServingMetrics
from llmexp.serving.batched_speculation import batched_round
from llmexp.serving.drafted_batch import DraftedBatch
from llmexp.serving.running_batch import Row, RunningBatch, cache_keyword, check_cache_layout
from llmexp.serving.sampling import draw, token_distribution
from llmexp.serving.served_models import ServedModels
from llmexp.serving.speculative import Sampling, SpeculationCounts, speculative_round
from llmexp.serving.streamed_text import StreamedText


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
        self.verify_steps = 0  # target forward passes of speculative rounds (one per round when batched)
        self.speculation = SpeculationCounts()  # what the draft's rounds did, per sequence (zero without a draft)
        check_cache_layout(served_models.model)
        draft = served_models.draft
        if draft is not None:
            check_cache_layout(draft.model)
        self._cache_keyword = cache_keyword(served_models.model)
        self._eos = frozenset(served_models.eos_token_ids)
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._hold = threading.Lock()  # held by the worker through each iteration, and by paused()
        self._waiting: Deque[Row] = deque()
        self._batch = RunningBatch() if draft is None else DraftedBatch(served_models.model, draft.model)
        self._admitted: List[Row] = []  # taken from the queue, not yet in the batch (during their prefill)
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
        vocabulary = self.served.model.get_input_embeddings().num_embeddings
        prompt_ids = prompt_token_ids(request.prompt, request.prompt_ids, self.served.tokenizer, vocabulary)
        check_context(len(prompt_ids), request.max_tokens, self.served.context_length)
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
            row = Row(request, stream, prompt_ids, adapter, request.max_tokens,
                       StreamedText(self.served.tokenizer, request.stop), generator, time.perf_counter())
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
            self._batch.keep_unfinished()
        self._admitted = self._admit()
        if self._admitted:
            self._prefill(self._admitted)
            self._admitted = []
        if self._batch.rows:
            if self.served.draft is None:
                self._decode()
            else:
                self._decode_drafted()
        self.metrics.running.set(len(self._batch.rows))

    def _admit(self) -> List[Row]:
        """Waiting rows that fit in the batch, oldest first; cancelled ones leave the queue here."""
        admitted: List[Row] = []
        with self._lock:
            for row in [row for row in self._waiting if row.stream.cancelled]:
                self._waiting.remove(row)
                self._end(row, "cancelled")
            while self._waiting and len(self._batch.rows) + len(admitted) < self.max_batch_size:
                admitted.append(self._waiting.popleft())
            self.metrics.queue_depth.set(len(self._waiting))
        return admitted

    def _forward(self, input_ids, mask, position_ids, cache, rows: List[Row], **kwargs):
        extra = {"adapter_names": [row.adapter for row in rows]} if self.served.has_adapters else {}
        with torch.inference_mode():
            out = self.served.model(
                input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                use_cache=True, **{self._cache_keyword: cache}, **extra, **kwargs,
            )
        return out.logits[:, -1, :].float()

    def _run_prompts(self, rows: List[Row], sequences: List[List[int]]):
        """(last-position logits, KV cache, attention mask) of ``sequences`` run left-padded together, fresh cache."""
        width = max(len(ids) for ids in sequences)
        pad = self.served.tokenizer.pad_token_id
        device = self.served.model.device
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in sequences], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in sequences], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.served.model.config)
        logits = self._forward(input_ids, mask, positions, cache, rows, logits_to_keep=1)
        return logits, cache, mask

    def _prefill(self, rows: List[Row]) -> None:
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
        self._batch.merge(rows, cache, mask)
        self._batch.keep_unfinished()

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
            batch.cut_cache(width)  # layers the failed step already extended
            failures = {id(row): self._fails_alone(row) for row in batch.rows}
            if not any(failures.values()):
                raise
            for row in batch.rows:
                if failures[id(row)] is not None:
                    self._fail(row, failures[id(row)])
            self._batch.keep_unfinished()
            return
        batch.mask = mask
        self.decode_steps += 1
        self.metrics.forward_steps.labels("decode").inc()
        self.metrics.batch_size.labels("decode").observe(len(batch.rows))
        self._take_tokens(batch.rows, logits)
        self._batch.keep_unfinished()

    def _decode_drafted(self) -> None:
        """One speculative round for every running row, batched (``batched_speculation``); each row's tokens
        streamed one chunk each.

        If the batched forwards raise, each row runs its round alone: the rows that fail by themselves end
        (``RequestFailed``), the others go on. A row whose own acceptance fails (NaN logits) ends alone.
        """
        batch = self._batch
        for row in batch.rows:
            if row.stream.cancelled:
                self._end(row, "cancelled")
        batch.keep_unfinished()
        if not batch.rows:
            return
        rows, sequences = batch.rows, batch.sequences
        # each round's tokens must fit max_tokens and the context: at most k + 1 of them
        ks = [min(self.served.draft.num_speculative_tokens,
                  min(row.max_tokens - row.generated, self.served.context_length - len(row.prompt_ids) - row.generated)
                  - 1) for row in rows]
        stops = [() if row.request.ignore_eos else self._eos for row in rows]
        extra = {"adapter_names": [row.adapter for row in rows]} if self.served.has_adapters else {}
        before = (self.speculation.proposed, self.speculation.accepted)
        try:
            results = batched_round(self.served.model, self.served.draft.model, sequences, ks,
                                    [_sampling(row) for row in rows], self.speculation, stops, extra)
            verify_passes, draft_passes = 1, max(ks)
        except Exception:
            results = [self._round_alone(row, sequence, k, stop) for row, sequence, k, stop
                       in zip(rows, sequences, ks, stops)]
            verify_passes, draft_passes = len(rows), self.speculation.proposed - before[0]
        now = time.perf_counter()
        for row, result in zip(rows, results):
            try:
                if isinstance(result, Exception):
                    raise result
                for token in result:
                    if row.finish_reason is None:
                        self._emit(row, token, now)
            except Exception as error:
                self._fail(row, _failed_alone(error))
        self.verify_steps += verify_passes
        self.metrics.forward_steps.labels("verify").inc(verify_passes)
        self.metrics.forward_steps.labels("draft").inc(draft_passes)
        self.metrics.batch_size.labels("verify").observe(len(rows))
        self.metrics.speculative_tokens.labels("proposed").inc(self.speculation.proposed - before[0])
        self.metrics.speculative_tokens.labels("accepted").inc(self.speculation.accepted - before[1])
        batch.keep_unfinished()

    def _round_alone(self, row: Row, sequence, k: int, stop) -> Union[List[int], Exception]:
        """The row's round by itself (``speculative_round``): its tokens, or what it raised."""
        extra = {"adapter_names": [row.adapter]} if self.served.has_adapters else {}
        try:
            return speculative_round(self.served.model, self.served.draft.model, sequence, k, _sampling(row),
                                     self.speculation, extra, stop)
        except Exception as error:
            return error

    def _fails_alone(self, row: Row) -> Optional[RequestFailed]:
        """The row's whole sequence so far (prompt and generated tokens) run by itself: the error, None if it runs."""
        try:
            self._run_prompts([row], [row.prompt_ids + row.text.ids])
        except Exception as error:
            return _failed_alone(error)
        return None

    # ------------------------------------------------------------------ sampling and output
    def _take_tokens(self, rows: List[Row], logits: torch.Tensor) -> None:
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
                token = greedy[i] if row.request.temperature == 0 else draw(
                    token_distribution(logits[i], row.request.temperature, row.request.top_p)[0], row.generator)
                self._emit(row, token, now)
            except Exception as error:
                self._fail(row, _failed_alone(error))

    def _emit(self, row: Row, token: int, now: float) -> None:
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
        row.stream.put(GenerationChunk(text, (token,), finish))
        if finish is not None:
            self._end(row, finish, now)

    def _end(self, row: Row, reason: str, now: Optional[float] = None) -> None:
        row.finish_reason = reason
        if reason == "cancelled":
            row.stream.put(GenerationChunk("", (), "cancelled"))
        else:
            self.metrics.e2e.labels(row.request.model).observe((now or time.perf_counter()) - row.submitted_at)
        self.metrics.generations.labels(row.request.model, reason).inc()
        row.stream.end()

    def _fail(self, row: Row, error: GenerationFailed) -> None:
        """End ``row`` with ``error`` (its reader raises it); the rows around it are not touched."""
        if row.finish_reason is not None:
            return
        if isinstance(error, RequestFailed):  # the model's own error, for whoever runs the server
            traceback.print_exception(error.__cause__, file=sys.stderr)
        row.finish_reason = "error"
        self.metrics.generations.labels(row.request.model, "error").inc()
        row.stream.put(error)
        row.stream.end()

    def _fail_running(self, error: GenerationFailed) -> None:
        """End the running batch and the rows being admitted with ``error``; the queue stays."""
        with self._lock:
            rows = [*self._batch.rows, *self._admitted]
            self._admitted = []
        self._batch.clear()
        self.metrics.running.set(0)
        for row in rows:
            self._fail(row, error)


def _sampling(row: Row) -> Sampling:
    return Sampling(row.request.temperature, row.request.top_p, row.generator)


def _failed_alone(error: Exception) -> RequestFailed:
    failure = RequestFailed(f"this request could not be generated ({type(error).__name__}: {error}); the requests "
                            "batched with it went on. Sent again unchanged, it fails again.")
    failure.__cause__ = error
    return failure
