"""Synthetic prompts of an exact token length, drawn from the model's own vocabulary (seeded).

GenAI-Perf samples text and trims it to the requested length; here the tokens are drawn
uniformly from the tokenizer's non-special vocabulary, decoded, and re-encoded until the
text is exactly ``length`` tokens (a BPE tokenizer may merge neighbours after decoding, so
the draw is repaired a few times: too long is cut, too short is topped up). The count is of
the prompt's own tokens, without the BOS a server may add. Each request of a point gets its
own prompt from a pool, so a prefix cache cannot make one point look faster than another.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy

from llmexp.sdk import UserError

POOL_SIZE = 100  # distinct prompts per point, reused in turn (GenAI-Perf's --num-prompts default)
REPAIR_ATTEMPTS = 20


def candidate_ids(tokenizer) -> numpy.ndarray:
    """Token ids worth drawing: not special, and decoding to visible text."""
    special = set(tokenizer.all_special_ids)
    ids = [
        index for index in range(len(tokenizer))
        if index not in special and tokenizer.decode([index], skip_special_tokens=True).strip()
    ]
    return numpy.asarray(ids, dtype=numpy.int64)


def synthetic_prompt(tokenizer, length: int, rng: numpy.random.Generator, candidates: numpy.ndarray,
                     field: str = "technique") -> str:
    """A text that ``tokenizer`` encodes (without special tokens) as exactly ``length`` tokens."""
    ids: List[int] = rng.choice(candidates, size=length).tolist()
    for _ in range(REPAIR_ATTEMPTS):
        text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == length:
            return text
        if len(encoded) > length:
            ids = encoded[:length]
        else:
            ids = encoded + rng.choice(candidates, size=length - len(encoded)).tolist()
    raise UserError(
        f"{field}.input_tokens={length}: no text of exactly {length} tokens could be drawn from this tokenizer's "
        f"vocabulary in {REPAIR_ATTEMPTS} attempts (its tokens merge when re-encoded); choose another length."
    )


def prompt_pool(tokenizer, length: int, seed: Sequence[int], size: int = POOL_SIZE,
                field: str = "technique") -> List[str]:
    """``size`` distinct-draw prompts of ``length`` tokens; the same ``seed`` gives the same prompts."""
    candidates = candidate_ids(tokenizer)
    if candidates.size == 0:
        raise UserError(f"{field}: the tokenizer has no non-special tokens to build prompts from; give the model's "
                        "real tokenizer.")
    rng = numpy.random.default_rng(list(seed))
    return [synthetic_prompt(tokenizer, length, rng, candidates, field) for _ in range(size)]
