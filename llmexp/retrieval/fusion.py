"""Reciprocal rank fusion (Cormack, Clarke and Büttcher, SIGIR 2009): rankings merged by rank, not by score.

BM25 scores and cosine similarities live on unrelated scales; summing ``1 / (rrf_k + rank)`` over the
rankings a passage appears in needs no calibration, and ``rrf_k`` (60 in the paper) damps the weight of
the very first ranks.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], rrf_k: int) -> List[Tuple[int, float]]:
    """``(item, fused score)`` over every item of ``rankings`` (each best first; ranks count from 1), best first.

    Ties keep the order in which items were first seen, so fusion is deterministic.
    """
    fused: Dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (rrf_k + rank)
    return sorted(fused.items(), key=lambda pair: -pair[1])
