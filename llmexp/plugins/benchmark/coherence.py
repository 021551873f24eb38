"""The coherence gate: a point is timed only if the model's greedy outputs look like text.

A broken model (a quantization that destroyed it, a wrong chat template) can be very fast at
emitting nothing, or one token over and over; a benchmark that reports that speed misleads.
So before timing a point a few greedy outputs are checked, and a point whose outputs fail is
marked ``invalid`` with the reason and reports no throughput. The checks are deliberately
weak (they must pass on any working model, whatever it was trained on):

- not empty;
- not one token repeated throughout (two or more tokens, all the same);
- optionally at least ``min_distinct_ratio`` distinct tokens per output token (catches short
  loops such as ``a b a b a b``); 0 turns it off.
"""

from __future__ import annotations

from typing import Optional, Sequence


def degeneracy(token_ids: Sequence[int], min_distinct_ratio: float = 0.0) -> Optional[str]:
    """Why one output is degenerate, or None when it passes."""
    if len(token_ids) == 0:
        return "empty output"
    distinct = len(set(token_ids))
    if len(token_ids) >= 2 and distinct == 1:
        return f"one token ({token_ids[0]}) repeated {len(token_ids)} times"
    ratio = distinct / len(token_ids)
    if ratio < min_distinct_ratio:
        return (f"{distinct} distinct tokens in {len(token_ids)} "
                f"(ratio {ratio:.2f} < min_distinct_ratio {min_distinct_ratio})")
    return None


def gate(outputs: Sequence[Sequence[int]], min_distinct_ratio: float = 0.0) -> Optional[str]:
    """None when every output passes ``degeneracy``; else the reason, naming the first output that failed."""
    for index, token_ids in enumerate(outputs):
        reason = degeneracy(token_ids, min_distinct_ratio)
        if reason is not None:
            return f"coherence gate: greedy output {index + 1} of {len(outputs)}: {reason}"
    return None
