"""BM25 over the passages' words (bm25s: Okapi BM25, Lucene's variant, as a sparse matrix).

Words are lower-cased and English stop words dropped, for passages and queries alike, so "where does
X live ?" matches on X and "live" alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Sequence, Tuple

STOPWORDS = "en"


def _bm25s():
    """The bm25s module, its logger held to warnings (importing it sets that to DEBUG: every build would be logged)."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def _words(texts: Sequence[str]) -> List[List[str]]:
    return _bm25s().tokenize(list(texts), stopwords=STOPWORDS, return_ids=False, show_progress=False)


class Bm25Ranking:
    """Passage indexes ranked by BM25 score; saved to and loaded from a folder of bm25s's files."""

    FILE = "bm25"  # its folder in the index directory

    def __init__(self, index) -> None:
        self.index = index

    @classmethod
    def build(cls, texts: Sequence[str], k1: float, b: float) -> "Bm25Ranking":
        index = _bm25s().BM25(k1=k1, b=b)
        index.index(_words(texts), show_progress=False)
        return cls(index)

    @classmethod
    def load(cls, folder: Path) -> "Bm25Ranking":
        return cls(_bm25s().BM25.load(str(folder), show_progress=False))

    def save(self, folder: Path) -> None:
        self.index.save(str(folder), show_progress=False)

    def rank(self, queries: Sequence[str], depth: int) -> List[List[Tuple[int, float]]]:
        """The ``depth`` best passages of each query as ``(passage index, score)``, best first."""
        depth = min(depth, self.index.scores["num_docs"])
        found, scores = self.index.retrieve(_words(queries), k=depth, show_progress=False, n_threads=1)
        return [[(int(i), float(s)) for i, s in zip(row, row_scores)] for row, row_scores in zip(found, scores)]

    @staticmethod
    def fusion_ranking(row: Sequence[Tuple[int, float]]) -> List[int]:
        """What a ranked row gives reciprocal rank fusion: the passages sharing a word with the query. BM25 scores
        the others 0, so their order is arbitrary; fused, it would outvote the other ranking."""
        return [i for i, score in row if score > 0]
