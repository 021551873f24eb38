"""A retriever as configured (``retriever=bm25|dense|hybrid``), its index built once and cached with its lineage.

``build_retriever(cfg, directory)`` reads the documents (``documents_for``), cuts them into passages and
indexes them. With a ``directory`` (a stage's ``retrieval_index/``) the index is saved there beside a
``manifest.json`` naming what it was built from: the documents' fingerprint, the retriever settings that
shape the index, and the encoder's lineage. A later build whose manifest matches loads the index instead of
building it; anything else rebuilds. The folder is written under a temporary name and renamed into place,
so a reader finds a whole index or none.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from llmexp.atomic import replace_atomically
from llmexp.display import console
from llmexp.errors import UserError
from llmexp.retrieval.dense import DenseRanking, lineage
from llmexp.retrieval.documents import documents_for, fingerprint
from llmexp.retrieval.fusion import reciprocal_rank_fusion
from llmexp.retrieval.passages import Hit, Passage, chunk
from llmexp.retrieval.reranking import Reranker
from llmexp.retrieval.sparse import Bm25Ranking

INDEX_DIRECTORY = "retrieval_index"  # a stage's index, in its directory: its tasks and its rag condition share it
MANIFEST = "manifest.json"
# settings read at search time only: changing them keeps the index
SEARCH_SETTINGS = ("top_k", "reranker", "rerank_candidates", "rrf_k", "batch_size")
# how deep each ranking goes before fusion; a passage below it in one ranking gets nothing from that one
FUSION_DEPTH = 1000


class Retriever:
    """Passages for queries: one ranking (BM25 or dense), or two fused by reciprocal rank, optionally re-ranked."""

    def __init__(self, passages: Sequence[Passage], rankings: Sequence[Any], top_k: int, rrf_k: int = 60,
                 reranker: Optional[Reranker] = None, rerank_candidates: int = 0) -> None:
        self.passages, self.rankings, self.top_k = list(passages), list(rankings), top_k
        self.rrf_k, self.reranker, self.rerank_candidates = rrf_k, reranker, rerank_candidates

    def search(self, queries: Sequence[str], k: Optional[int] = None) -> List[List[Hit]]:
        """The ``k`` (default ``retriever.top_k``) best passages of each query, best first."""
        k = self.top_k if k is None else k
        if k < 1:
            raise ValueError(f"k={k}: ask for at least one passage")
        if not queries:
            return []
        wanted = max(k, self.rerank_candidates) if self.reranker else k
        if len(self.rankings) == 1:
            ranked = self.rankings[0].rank(queries, wanted)
        else:
            lists = [[ranking.fusion_ranking(row) for row in ranking.rank(queries, max(wanted, FUSION_DEPTH))]
                     for ranking in self.rankings]
            ranked = [reciprocal_rank_fusion(rows, self.rrf_k)[:wanted] for rows in zip(*lists)]
        hits = [[Hit(self.passages[i], score) for i, score in row] for row in ranked]
        if self.reranker:
            first = self.reranker.rerank(queries, [row[: self.rerank_candidates] for row in hits])
            hits = [best + row[self.rerank_candidates:] for best, row in zip(first, hits)]
        return [row[:k] for row in hits]


def build_retriever(cfg, directory: Optional[Path] = None) -> Retriever:
    """The retriever ``cfg.retriever`` describes over ``documents_for(cfg)``; its index cached in ``directory``."""
    settings = cfg.retriever
    kind = str(settings.name)
    if kind == "none":
        raise UserError("retriever=none has no index to search; choose retriever=bm25, retriever=dense or "
                        "retriever=hybrid (and retriever.documents=<files> for documents of your own).")
    documents = documents_for(cfg)
    passages = chunk(documents, settings.chunk_words, settings.chunk_overlap)
    encoder = None
    if kind in ("dense", "hybrid"):
        from llmexp.retrieval.encoders import load_encoder

        encoder = load_encoder(settings.encoder, cfg)
    manifest = {
        "documents": fingerprint(documents),
        "passages": len(passages),
        "retriever": {key: _plain(value) for key, value in settings.items() if key not in SEARCH_SETTINGS},
        "encoder": lineage(encoder, settings.encoder) if encoder is not None else None,
    }
    directory = Path(directory) if directory is not None else None
    if directory is not None and _manifest(directory) == manifest:
        rankings = _load(kind, directory, encoder, settings)
        console.note(f"retrieval index: {len(passages)} passages, loaded from {directory}")
    else:
        texts = [passage.text for passage in passages]
        rankings = []
        if kind in ("bm25", "hybrid"):
            rankings.append(Bm25Ranking.build(texts, settings.k1, settings.b))
        if encoder is not None:
            rankings.append(DenseRanking.build(encoder, texts, settings.batch_size))
        if directory is not None:
            _save(directory, manifest, rankings)
            console.note(f"retrieval index: {len(passages)} passages, built and saved in {directory}")
    reranker = Reranker(settings.reranker) if settings.reranker else None
    return Retriever(passages, rankings, settings.top_k, settings.get("rrf_k", 60), reranker,
                     settings.rerank_candidates)


def _plain(value: Any) -> Any:
    """A config value as JSON keeps it (a ``Choice`` as its text)."""
    return str(value) if hasattr(value, "value") else value


def _manifest(directory: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no index yet, or a damaged one: build


def _load(kind: str, directory: Path, encoder, settings) -> List[Any]:
    rankings: List[Any] = []
    if kind in ("bm25", "hybrid"):
        rankings.append(Bm25Ranking.load(directory / Bm25Ranking.FILE))
    if encoder is not None:
        rankings.append(DenseRanking.load(encoder, directory / DenseRanking.FILE, settings.batch_size))
    return rankings


def _save(directory: Path, manifest: Dict[str, Any], rankings: Sequence[Any]) -> None:
    """Write the index under a temporary name beside ``directory``, its manifest last, then rename it into place."""
    temp = directory.with_name(f".{directory.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    old = temp.with_suffix(".old")
    temp.mkdir(parents=True)
    try:
        for ranking in rankings:
            ranking.save(temp / ranking.FILE)
        replace_atomically(temp / MANIFEST, lambda handle: json.dump(manifest, handle, indent=2))
        if directory.exists():
            directory.rename(old)
        temp.rename(directory)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
