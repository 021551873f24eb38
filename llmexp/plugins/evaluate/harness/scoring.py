"""How numbers are read off a causal LM: log-likelihoods, generations, document and sliding-window NLL.

Scoring follows lm-evaluation-harness so results agree with it on the same prompts:

* a (context, continuation) pair is scored by tokenizing ``context + continuation`` whole
  (special tokens as the tokenizer adds them, so a Llama-style tokenizer's BOS comes
  first), dropping as many tokens as ``context`` alone encodes to, and summing the
  log-probabilities of the rest; whitespace at the end of the context moves onto the
  continuation first. Too long inputs are truncated on the left.
* generation is greedy, prompts left-padded in a batch, cut at EOS and at stop strings.
  Sampled generation (``Sampling``: temperature, top-p, seed) draws from a random state
  seeded per batch from the seed and the batch's position, so the same seed, prompts and
  batch size give the same texts, and the caller's global random state is left untouched.
* sliding-window NLL follows the Hugging Face perplexity guide
  (https://huggingface.co/docs/transformers/perplexity): windows of ``max_length`` tokens
  start every ``stride`` tokens and each scores only the tokens the previous window did
  not, so every token is scored once, with up to ``max_length - stride`` tokens of context
  carried over.

Everything runs with the model in eval mode under ``torch.no_grad``, in fixed batches, so
two runs give the same numbers. ``Scorer`` bundles a model with its settings and a progress
bar; the tasks (``tasks/``) only talk to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from llmexp.sdk import FreeCores, warn
from llmexp.sdk import evaluating

from llmexp.plugins.evaluate.harness.decoding import Report, Sampling, greedy_generate, sampled_generate
from llmexp.plugins.evaluate.harness.tokens import Row, device_of, max_length, pad_id, padded_batches


@dataclass(frozen=True)
class LogLikelihood:
    """A continuation's summed log-probability, whether greedy decoding yields it, its token count."""

    logprob: float
    is_greedy: bool
    tokens: int


def encode_pair(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """Context and continuation token ids as lm-eval splits them (see the module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation).input_ids
    context_ids = tokenizer(context).input_ids
    if not context_ids:  # no BOS and an empty context: condition on EOS as lm-eval does
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], whole
    return whole[: len(context_ids)], whole[len(context_ids) :]


def loglikelihood(
    model,
    tokenizer,
    requests: Sequence[Tuple[str, str]],
    batch_size: int = 32,
    report: Optional[Report] = None,
) -> List[LogLikelihood]:
    """``LogLikelihood`` of each ``(context, continuation)``, in order; batches are right-padded."""
    limit = max_length(model, tokenizer)
    rows: List[Row] = []
    for context, continuation in requests:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        whole = (context_ids + continuation_ids)[-(limit + 1) :]
        # a continuation longer than the model's context keeps only the tokens that fit
        rows.append((whole[:-1], continuation_ids[-(len(whole) - 1) :]))
    scores = score_token_rows(model, tokenizer, rows, batch_size, report)
    return [LogLikelihood(logprob, greedy, len(targets)) for (logprob, greedy), (_, targets) in zip(scores, rows)]


def document_nll(
    model,
    tokenizer,
    documents: Sequence[str],
    batch_size: int = 32,
    report: Optional[Report] = None,
) -> List[Tuple[float, int]]:
    """Summed negative log-likelihood and predicted-token count of each document.

    A document is scored as it is trained on: the tokenizer's encoding (BOS first where it
    adds one) with EOS appended; every token after the first is predicted. Documents longer
    than the model's context are cut into disjoint windows.
    """
    rows, owners = document_rows(tokenizer, documents, max_length(model, tokenizer))
    totals = [[0.0, 0] for _ in documents]
    for (logprob, _), (_, targets), owner in zip(score_token_rows(model, tokenizer, rows, batch_size, report), rows, owners):
        totals[owner][0] -= logprob
        totals[owner][1] += len(targets)
    return [(nll, count) for nll, count in totals]


def document_rows(tokenizer, documents: Sequence[str], limit: int) -> Tuple[List[Row], List[int]]:
    """Rows scoring every document (EOS appended, windows of ``limit``) and the document each belongs to."""
    rows: List[Row] = []
    owners: List[int] = []
    for index, document in enumerate(documents):
        ids = list(tokenizer(document).input_ids)
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        for start in range(0, len(ids) - 1, limit):
            targets = ids[start + 1 : start + limit + 1]
            rows.append((ids[start : start + len(targets)], targets))
            owners.append(index)
    return rows, owners


@dataclass(frozen=True)
class Window:
    """One window of a sliding-window evaluation: tokens ``[begin, end)`` are read, ``[scored_from, end)`` scored."""

    begin: int
    end: int
    scored_from: int
    nll: float  # summed over the scored tokens, in nats

    @property
    def tokens(self) -> int:
        return self.end - self.scored_from


def sliding_windows(length: int, window: int, stride: int) -> List[Tuple[int, int, int]]:
    """``(begin, end, scored_from)`` of each window over ``length`` tokens, in the HF guide's order.

    Windows start every ``stride`` tokens and hold up to ``window`` tokens; each scores the
    tokens after the previous window's end (a window's first token has no context inside it,
    so it is scored only when an earlier window covered it: with ``stride == window`` the
    first token of every window goes unscored, as in the guide). The last window ends at the text's end.
    """
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, not window={window}, stride={stride}")
    spans: List[Tuple[int, int, int]] = []
    previous_end = 0
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        scored_from = max(previous_end, begin + 1)
        if scored_from < end:
            spans.append((begin, end, scored_from))
        previous_end = end
        if end == length:
            break
    return spans


def sliding_window_nll(
    model,
    tokenizer,
    text: str,
    window: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 32,
    report: Optional[Report] = None,
) -> List[Window]:
    """The windows of ``sliding_windows`` over ``text``'s tokens (as the tokenizer encodes it, BOS included), scored.

    ``window`` defaults to the model's context, ``stride`` to ``window`` (disjoint windows,
    lm-eval's rolling log-likelihood); every scored token is predicted from the tokens
    before it in its window. Windows are independent, so they are scored in batches.
    """
    limit = max_length(model, tokenizer)
    window = window or limit
    if window > limit:
        raise ValueError(f"window={window} exceeds the model's context of {limit} tokens")
    ids = list(tokenizer(text, verbose=False).input_ids)  # longer than the context on purpose: no warning
    spans = sliding_windows(len(ids), window, stride or window)
    # the input stops one token short of the window: the last token is only predicted
    rows: List[Row] = [(ids[begin : end - 1], ids[scored_from:end]) for begin, end, scored_from in spans]
    scores = score_token_rows(model, tokenizer, rows, batch_size, report)
    return [Window(begin, end, scored_from, -logprob) for (begin, end, scored_from), (logprob, _) in zip(spans, scores)]


def next_token_kl(
    model, reference, tokenizer, documents: Sequence[str], batch_size: int = 32, report: Optional[Report] = None
) -> Tuple[float, int]:
    """Summed KL(reference || model) of the next-token distributions at every predicted token, and the count.

    Both models read the same token rows as ``document_nll``'s. The mean (sum / count) is the
    paired, continuous measure of how far a compressed model moved from its baseline: it sees
    changes far below what an accuracy over a few hundred items can resolve.
    """
    rows, _ = document_rows(tokenizer, documents, min(max_length(model, tokenizer), max_length(reference, tokenizer)))
    total, count = 0.0, 0
    with evaluating(model), evaluating(reference):
        for start, input_ids, attention_mask in padded_batches(rows, batch_size, pad_id(tokenizer), right=True):
            mine = model(input_ids=input_ids.to(device_of(model)), attention_mask=attention_mask.to(device_of(model))).logits
            theirs = reference(
                input_ids=input_ids.to(device_of(reference)), attention_mask=attention_mask.to(device_of(reference))
            ).logits
            mask = attention_mask.bool().to(mine.device)
            log_p = theirs.to(mine.device)[mask].float().log_softmax(-1)
            log_q = mine[mask].float().log_softmax(-1)
            total += (log_p.exp() * (log_p - log_q)).sum().item()
            count += int(mask.sum())
            if report is not None:
                report(min(start + batch_size, len(rows)), len(rows))
    return total, count


def forward_throughput(
    model, tokenizer, documents: Sequence[str], batch_size: int = 32, min_seconds: float = 0.5
) -> float:
    """Tokens per second of batched forward passes over ``documents``, repeated for at least ``min_seconds``.

    One warm-up pass first; then whole passes until the time is reached, so a fast model is
    timed over many passes rather than one noisy one. On a fake-quantized model this is the
    speed of the simulation, not of a deployed engine.
    """
    import time

    rows, _ = document_rows(tokenizer, documents, max_length(model, tokenizer))
    batches = [(ids, mask) for _, ids, mask in padded_batches(rows, batch_size, pad_id(tokenizer), right=True)]
    tokens = sum(int(mask.sum()) for _, mask in batches)
    device = device_of(model)
    with evaluating(model):

        def one_pass() -> None:
            for input_ids, attention_mask in batches:
                model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))

        one_pass()
        passes, clock = 0, time.perf_counter()
        while passes == 0 or time.perf_counter() - clock < min_seconds:
            one_pass()
            passes += 1
        elapsed = time.perf_counter() - clock
    return passes * tokens / elapsed


class Scorer:
    """A model, its tokenizer and batch settings, with one progress bar per evaluation task."""

    def __init__(self, model, tokenizer, batch_size: int = 32, max_new_tokens: int = 40, progress=None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.progress = progress  # a started rich.progress.Progress, or None
        self._bar = None
        self._completed = 0
        self.free_cores = FreeCores("evaluate", warn)  # checked at each batch: threads to the cores others leave free

    def track(self, description: str) -> None:
        """Start a new progress bar; scoring calls that follow advance it."""
        if self.progress is not None:
            self._bar = self.progress.add_task(description, total=None)
            self._completed = 0

    def loglikelihood(self, requests: Sequence[Tuple[str, str]]) -> List[LogLikelihood]:
        return loglikelihood(self.model, self.tokenizer, requests, self.batch_size, self._report())

    def generate(
        self,
        prompts: Sequence[str],
        stop: Sequence[str],
        max_new_tokens: Optional[int] = None,
        sampling: Optional[Sampling] = None,
    ) -> List[str]:
        """Greedy continuations, or sampled ones with ``sampling``; ``max_new_tokens`` overrides the scorer's."""
        budget = max_new_tokens or self.max_new_tokens
        if sampling is None:
            return greedy_generate(self.model, self.tokenizer, prompts, budget, self.batch_size, stop, self._report())
        return sampled_generate(
            self.model, self.tokenizer, prompts, sampling, budget, self.batch_size, stop, self._report()
        )

    def document_nll(self, documents: Sequence[str]) -> List[Tuple[float, int]]:
        return document_nll(self.model, self.tokenizer, documents, self.batch_size, self._report())

    def sliding_window_nll(self, text: str, window: Optional[int] = None, stride: Optional[int] = None) -> List[Window]:
        return sliding_window_nll(self.model, self.tokenizer, text, window, stride, self.batch_size, self._report())

    def next_token_kl(self, reference, documents: Sequence[str]) -> Tuple[float, int]:
        return next_token_kl(self.model, reference, self.tokenizer, documents, self.batch_size, self._report())

    def forward_throughput(self, documents: Sequence[str]) -> float:
        return forward_throughput(self.model, self.tokenizer, documents, self.batch_size)

    def _report(self) -> Optional[Report]:
        if self.progress is None or self._bar is None:
            return None
        base = self._completed

        def report(done: int, total: int) -> None:
            self.free_cores.check()
            self.progress.update(self._bar, completed=base + done, total=base + total)
            if done == total:
                self._completed = base + total

        return report


def score_token_rows(
    model, tokenizer, rows: Sequence[Row], batch_size: int, report: Optional[Report]
) -> List[Tuple[float, bool]]:
    """(summed log-prob of the targets, whether each target is the argmax) for every row."""
    device = device_of(model)
    scores: List[Tuple[float, bool]] = []
    with evaluating(model):
        for start, input_ids, attention_mask in padded_batches(rows, batch_size, pad_id(tokenizer), right=True):
            batch = rows[start : start + batch_size]
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            for i, (ids, targets) in enumerate(batch):
                if not targets:
                    scores.append((0.0, True))
                    continue
                positions = logits[i, len(ids) - len(targets) : len(ids)].float().log_softmax(dim=-1)
                wanted = torch.tensor(targets, dtype=torch.long, device=positions.device)
                logprob = positions.gather(-1, wanted[:, None]).sum().item()
                scores.append((logprob, bool((positions.argmax(dim=-1) == wanted).all())))
            if report is not None:
                report(min(start + batch_size, len(rows)), len(rows))
    return scores
