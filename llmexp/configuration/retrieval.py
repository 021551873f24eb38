"""The ``retriever`` group's schemas: which passages are put in front of a question.

Evaluation's ``rag`` condition and ``llmexp serve`` read the same option, so a retriever measured
offline is the one deployed. Each option has a schema of its own (``RETRIEVER_OPTIONS``), so a dense
key on ``retriever=bm25`` is refused at compose time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from llmexp.configuration.choice import Choice


class RetrieverKind(Choice):
    """How passages are found: none, sparse (BM25), dense (an embedding model), or both fused."""

    none = "none"
    bm25 = "bm25"
    dense = "dense"
    hybrid = "hybrid"


@dataclass
class RetrieverConfig:
    """What every ``retriever`` option has: its name."""

    name: RetrieverKind = MISSING


@dataclass
class NoRetrieverConfig(RetrieverConfig):
    """``retriever=none`` (the default): prompts carry no retrieved passages."""

    name: RetrieverKind = RetrieverKind.none


@dataclass
class IndexedRetrieverConfig(RetrieverConfig):
    """A retriever over an index of documents, chunked into passages."""

    documents: Optional[str] = None  # a file or directory of .txt/.md/.jsonl; None: the data option's documents
    chunk_words: int = 128
    chunk_overlap: int = 32
    top_k: int = 5
    reranker: Optional[str] = None  # a cross-encoder directory: re-scores the first `rerank_candidates`
    rerank_candidates: int = 20


@dataclass
class Bm25RetrieverConfig(IndexedRetrieverConfig):
    """Okapi BM25 over the passages' words."""

    name: RetrieverKind = RetrieverKind.bm25
    k1: float = 1.5
    b: float = 0.75


@dataclass
class DenseRetrieverConfig(IndexedRetrieverConfig):
    """Nearest passages by an embedding model's cosine similarity."""

    name: RetrieverKind = RetrieverKind.dense
    # a sentence-transformers directory, or the pipeline stage that trained one (technique=embed);
    # None: the embedded encoder, trained once on the embedded data and cached
    encoder: Optional[str] = None
    batch_size: int = 64


@dataclass
class HybridRetrieverConfig(DenseRetrieverConfig):
    """BM25 and dense rankings fused by reciprocal rank (score = sum of 1 / (rrf_k + rank))."""

    name: RetrieverKind = RetrieverKind.hybrid
    k1: float = 1.5
    b: float = 0.75
    rrf_k: int = 60


RETRIEVER_OPTIONS = {"none": NoRetrieverConfig, "bm25": Bm25RetrieverConfig, "dense": DenseRetrieverConfig,
                     "hybrid": HybridRetrieverConfig}  # retriever=<option> -> its schema
