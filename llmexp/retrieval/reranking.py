"""Re-ranking: a cross-encoder reads each (query, passage) pair together and re-scores the first candidates.

A cross-encoder sees query and passage in one input, so it judges relevance better than comparing two
separate embeddings, and costs a forward pass per pair: it re-scores only the ``rerank_candidates``
best of the first-stage ranking. Loaded with ``sentence_transformers.CrossEncoder`` from a local
directory (``retriever.reranker``); nothing is downloaded.
"""

from __future__ import annotations

from typing import List, Sequence

from llmexp.retrieval.passages import Hit

FIELD = "retriever.reranker"


class Reranker:
    def __init__(self, directory: str) -> None:
        from sentence_transformers import CrossEncoder

        self.directory = directory
        self.model = CrossEncoder(directory, local_files_only=True)

    def rerank(self, queries: Sequence[str], candidates: Sequence[Sequence[Hit]], batch_size: int = 32) -> List[List[Hit]]:
        """Each query's candidates re-scored by the cross-encoder (its raw score), best first."""
        pairs = [(query, hit.passage.text) for query, hits in zip(queries, candidates) for hit in hits]
        if not pairs:
            return [list(hits) for hits in candidates]
        scores = iter(self.model.predict(pairs, batch_size=batch_size, show_progress_bar=False).tolist())
        rescored = [[Hit(hit.passage, float(next(scores))) for hit in hits] for hits in candidates]
        return [sorted(hits, key=lambda hit: -hit.score) for hits in rescored]
