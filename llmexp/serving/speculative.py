"""Draft-target speculative decoding: one round for one sequence, the acceptance rule, and what the rounds counted.

A small draft model proposes ``k`` tokens one at a time; the target scores the sequence's
next token and all ``k`` proposals in ONE forward pass, and keeps the longest prefix its
acceptance rule admits plus one token of its own, so a round yields 1 to ``k + 1`` tokens for
one target forward (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling"):

* greedy (temperature 0): a proposal is accepted while it is the target's argmax; the first
  mismatch is replaced by the target's argmax; all accepted, the target's next argmax is added.
  The output is the target's own greedy output, token for token.
* sampled: proposal ``x`` drawn from the draft's ``q`` is accepted with probability
  ``min(1, p(x) / q(x))``; on rejection the token is drawn from ``norm(max(0, p - q))``; all
  accepted, a bonus token is drawn from the target's next ``p``. Each token then follows ``p``
  exactly. ``p`` and ``q`` are the request's processed distributions (temperature, top-p:
  ``llmexp.serving.sampling``), so the output follows what the engine samples without a draft.

transformers' assisted generation (``generate(assistant_model=...)``) does the same inside
``generate`` but works on one batch at a time and reports no acceptance figures; this round is
what the engine runs per request, with its own seeded generator, and counts what it does.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Collection, Dict, List, Optional, Tuple

import torch

from llmexp.errors import UserError
from llmexp.serving.running_batch import cache_keyword
from llmexp.serving.sampling import draw, token_distribution
from llmexp.serving.served_models import vocabulary_mismatch


@dataclass
class SpeculationCounts:
    """What speculative rounds did: target forward passes, tokens proposed by the draft, accepted, produced."""

    target_forwards: int = 0
    proposed: int = 0
    accepted: int = 0
    produced: int = 0  # accepted proposals plus the target's own token of each round

    @property
    def acceptance_rate(self) -> float:
        """Accepted proposals over proposed ones (NaN before any proposal)."""
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def tokens_per_target_forward(self) -> float:
        """Tokens produced per target forward pass: 1 without speculation, up to k + 1 with it."""
        return self.produced / self.target_forwards if self.target_forwards else float("nan")

    def as_dict(self) -> Dict[str, float]:
        return {"target_forwards": self.target_forwards, "proposed": self.proposed, "accepted": self.accepted,
                "produced": self.produced, "acceptance_rate": self.acceptance_rate,
                "tokens_per_target_forward": self.tokens_per_target_forward}


@dataclass(frozen=True)
class Sampling:
    """How a sequence picks tokens: greedy at temperature 0, else drawn with its own generator."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: Optional[torch.Generator] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class DraftedSequence:
    """One sequence's two KV caches between rounds.

    The target's cache holds every token but the last one produced (``last_token``, read at the
    next round); the draft's cache lags behind by ``draft_pending`` (which ends with
    ``last_token``): after a round whose proposals were all accepted, the last proposal was never
    fed to the draft, and before the first round the draft has read nothing (the prompt is pending).
    """

    target_cache: Any
    draft_cache: Any
    last_token: int
    draft_pending: List[int] = field(default_factory=list)


def check_same_vocabulary(target, target_tokenizer, draft, draft_tokenizer, field_name: str) -> None:
    """Refuse (``UserError``) a draft whose tokens do not mean the target's: the acceptance rule compares their
    distributions token by token, so both tokenizers and both output layers must be the same."""
    target_size, draft_size = _vocabulary_size(target), _vocabulary_size(draft)
    if target_size != draft_size:
        raise vocabulary_mismatch(field_name, draft_size, target_size)
    if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        different = sorted(set(target_tokenizer.get_vocab().items()) ^ set(draft_tokenizer.get_vocab().items()))
        example = ", ".join(f"{token!r}={index}" for token, index in different[:3])
        raise UserError(
            f"{field_name}: the draft's tokenizer maps tokens to other ids than the target's ({len(different)} "
            f"entries differ, e.g. {example}). Give a draft with the target's tokenizer (a pruned or distilled model "
            "of the target, or one trained with its tokenizer)."
        )


def _vocabulary_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def new_cache(model):
    """An empty ``DynamicCache`` for ``model``."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def greedy_start(target, draft, prompt_ids: List[int]) -> DraftedSequence:
    """A sequence whose prompt the target has read (one forward), with the target's greedy first token next."""
    cache = new_cache(target)
    first = int(_forward(target, list(prompt_ids), cache, keep_last=True)[-1].argmax())
    return DraftedSequence(cache, new_cache(draft), first, [*prompt_ids, first])


def speculative_round(
    target, draft, sequence: DraftedSequence, k: int, sampling: Sampling, counts: SpeculationCounts,
    target_inputs: Optional[Dict[str, Any]] = None, stop_tokens: Collection[int] = (),
) -> List[int]:
    """Run one round for ``sequence``: the 1 to ``k + 1`` tokens it produces, its caches advanced to them.

    The draft stops proposing after one of ``stop_tokens`` (EOS): what follows it would be checked for
    nothing. ``target_inputs`` go to the target's forward too (a served adapter: ``adapter_names``). A target
    whose logits hold NaN or +inf raises ``FloatingPointError``, after which the sequence cannot go on.
    """
    proposals: List[int] = []
    draft_dists: List[Optional[torch.Tensor]] = []
    feed = sequence.draft_pending
    for _ in range(k):
        logits = _forward(draft, feed, sequence.draft_cache, keep_last=True)[-1]
        token, dist = propose(logits, sampling, "draft")
        proposals.append(token)
        draft_dists.append(dist)
        feed = [token]
        if token in stop_tokens:
            break
    drafted = len(proposals)  # what the draft's cache read: its pending tokens and proposals 1..drafted-1
    target_logits = _forward(target, [sequence.last_token, *proposals], sequence.target_cache, keep_last=False,
                             **(target_inputs or {}))
    counts.target_forwards += 1
    check_numbers(target_logits)
    accepted, token = accept(target_logits, proposals, draft_dists, sampling)
    counts.proposed += drafted
    counts.accepted += accepted
    counts.produced += accepted + 1
    # the target read last_token and every proposal: keep last_token and the accepted ones
    _drop_last(sequence.target_cache, drafted - accepted)
    if drafted == 0:  # the draft did not run: what it has not read grows
        sequence.draft_pending = [*sequence.draft_pending, token]
    else:  # keep the draft's cache up to the last accepted proposal; a last proposal accepted is still unread
        _drop_last(sequence.draft_cache, max(0, drafted - 1 - accepted))
        sequence.draft_pending = [*proposals[drafted - 1:accepted], token]
    sequence.last_token = token
    return [*proposals[:accepted], token]


def accept(target_logits: torch.Tensor, proposals: List[int], draft_dists: List[Optional[torch.Tensor]],
           sampling: Sampling) -> Tuple[int, int]:
    """(proposals accepted, the token that follows them) by the rule in the module docstring.

    ``target_logits`` [k + 1, vocabulary] score each proposal's position and the one after the last;
    ``draft_dists`` are the draft's processed distributions the proposals were drawn from (None when greedy).
    """
    if sampling.greedy:
        choices = target_logits.argmax(-1).tolist()
        accepted = 0
        while accepted < len(proposals) and proposals[accepted] == choices[accepted]:
            accepted += 1
        return accepted, choices[accepted]
    p = token_distribution(target_logits, sampling.temperature, sampling.top_p)
    for i, (x, q) in enumerate(zip(proposals, draft_dists)):
        ratio = p[i, x] / q[x]  # q[x] > 0: x was drawn from q
        if ratio >= 1 or torch.rand((), dtype=torch.float64, generator=sampling.generator) < ratio:
            continue
        residual = (p[i] - q).clamp(min=0)
        # p <= q everywhere yet x rejected happens only by rounding (p == q up to it): then p itself
        return i, draw(residual / residual.sum() if residual.sum() > 0 else p[i], sampling.generator)
    return len(proposals), draw(p[len(proposals)], sampling.generator)


def propose(logits: torch.Tensor, sampling: Sampling, which: str) -> Tuple[int, Optional[torch.Tensor]]:
    """The token ``sampling`` picks from ``logits`` [vocabulary], and the distribution it was drawn from (None when
    greedy); ``which`` model made them, for the error when they are not numbers."""
    if sampling.greedy:
        return int(logits.argmax()), None
    check_numbers(logits[None], which)
    dist = token_distribution(logits, sampling.temperature, sampling.top_p)[0]
    return draw(dist, sampling.generator), dist


def check_numbers(logits: torch.Tensor, which: str = "target") -> None:
    """Raise ``FloatingPointError`` when ``logits`` hold NaN or +inf (the request cannot be sampled)."""
    if bool((logits.isnan() | logits.isposinf()).any()):
        raise FloatingPointError(f"the {which} model's output (logits) for this request holds NaN or +inf")


def _forward(model, token_ids: List[int], cache, keep_last: bool, **inputs) -> torch.Tensor:
    """Float logits [positions, vocabulary] of ``token_ids`` read after what ``cache`` holds (one sequence)."""
    input_ids = torch.tensor([token_ids], device=model.device)
    with torch.inference_mode():
        out = model(input_ids=input_ids, use_cache=True, **{cache_keyword_of(model): cache},
                    logits_to_keep=1 if keep_last else 0, **inputs)
    return out.logits[0].float()


_CACHE_KEYWORDS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def cache_keyword_of(model) -> str:
    """``running_batch.cache_keyword`` of ``model``, looked up once: inspecting the signature costs ~0.1 ms, 2% of a
    tiny model's forward."""
    if model not in _CACHE_KEYWORDS:
        _CACHE_KEYWORDS[model] = cache_keyword(model)
    return _CACHE_KEYWORDS[model]


def _drop_last(cache, count: int) -> None:
    if count > 0:
        cache.crop(-count)  # transformers >= 5: a negative count removes that many positions
