"""How well a retriever ranks the documents a question came from: recall@k, MRR and nDCG@k.

Each query's ranking is of document ids, best first; a document is counted once, at its best passage's
rank (``ranked_documents``), so a document cut into many passages cannot fill the first k alone. Relevance
is binary. Recall@k is the share of a query's relevant documents in its first k; MRR is the mean of
1 / the rank of the first relevant document (0 if none is ranked); nDCG@k divides the discounted gain
``sum 1 / log2(rank + 1)`` of the relevant documents in the first k by that of a perfect ranking.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Sequence, Set


def ranked_documents(document_ids: Iterable[str]) -> List[str]:
    """Document ids in the order first met: a ranking of passages' documents with repeats dropped."""
    return list(dict.fromkeys(document_ids))


def retrieval_metrics(ranked: List[List[str]], relevant: List[Set[str]], ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """``recall_at_<k>``, ``mrr`` and ``ndcg_at_<k>`` averaged over queries (one ranking and one set per query)."""
    if len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} rankings for {len(relevant)} sets of relevant documents")
    if not ranked:
        raise ValueError("no queries to score")
    totals = {**{f"recall_at_{k}": 0.0 for k in ks}, "mrr": 0.0, **{f"ndcg_at_{k}": 0.0 for k in ks}}
    for ranking, wanted in zip(ranked, relevant):
        if not wanted:
            raise ValueError("a query with no relevant document cannot be scored")
        ranking = ranked_documents(ranking)
        hits = [document in wanted for document in ranking]
        for k in ks:
            totals[f"recall_at_{k}"] += sum(hits[:k]) / len(wanted)
            ideal = sum(1 / math.log2(rank + 1) for rank in range(1, min(k, len(wanted)) + 1))
            gain = sum(1 / math.log2(rank + 1) for rank, hit in enumerate(hits[:k], start=1) if hit)
            totals[f"ndcg_at_{k}"] += gain / ideal
        totals["mrr"] += next((1 / rank for rank, hit in enumerate(hits, start=1) if hit), 0.0)
    return {name: total / len(ranked) for name, total in totals.items()}
