"""The ``retriever`` group's schemas: which passages are put in front of a question.

Evaluation's ``rag`` condition and ``llmexp serve`` read the same option, so a retriever measured
offline is the one deployed. Each option has a schema of its own (``RETRIEVER_OPTIONS``), so a dense
key on ``retriever=bm25`` is refused at compose time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from omegaconf import MISSING

from llmexp.configuration.choice import Choice
from llmexp.machine.backends import importable


DOCUMENT_SUFFIXES = (".txt", ".md", ".jsonl")  # the files retriever.documents reads


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
class HybridRetrieverConfig(DenseRetrieverConfig, Bm25RetrieverConfig):
    """BM25 and dense rankings fused by reciprocal rank (score = sum of 1 / (rrf_k + rank)): both options' keys."""

    name: RetrieverKind = RetrieverKind.hybrid
    rrf_k: int = 60


RETRIEVER_OPTIONS = {"none": NoRetrieverConfig, "bm25": Bm25RetrieverConfig, "dense": DenseRetrieverConfig,
                     "hybrid": HybridRetrieverConfig}  # retriever=<option> -> its schema


# The modules each option searches with, all from the rag extra.
RETRIEVER_MODULES = {"bm25": ("bm25s",), "dense": ("faiss", "sentence_transformers"),
                     "hybrid": ("bm25s", "faiss", "sentence_transformers")}
RAG_INSTALL = "pip install 'llmexp[rag]'"


def retriever_problems(config) -> List[str]:
    """What stops ``config.retriever`` before anything runs, each naming its field and the fix (no torch, no index).

    ``retriever.encoder`` may name a stage of the pipeline that trains an encoder; any other value, like
    ``retriever.reranker``, is a directory that must exist.
    """
    from llmexp.configuration.pipeline import stage_name, stage_nodes  # pipeline imports the schema, which imports this

    settings = config.retriever
    if str(settings.name) == RetrieverKind.none:
        return []
    problems = []
    needed = RETRIEVER_MODULES[str(settings.name)] + (("sentence_transformers",) if settings.reranker else ())
    if missing := [module for module in dict.fromkeys(needed) if not importable(module)]:
        problems.append(f"retriever={settings.name} needs {', '.join(missing)}, which this environment lacks: "
                        f"{RAG_INSTALL}, or retriever=none.")
    documents = settings.documents
    if documents and not Path(str(documents)).exists():
        problems.append(
            f"retriever.documents={documents} does not exist (relative paths are resolved against {Path.cwd()}). "
            "Point it at a .txt/.md/.jsonl file or a folder of them, or leave it unset (retriever.documents=null) "
            "to search the data option's own documents."
        )
    elif documents and Path(str(documents)).is_file() and Path(str(documents)).suffix not in DOCUMENT_SUFFIXES:
        problems.append(f"retriever.documents={documents} is not a .txt, .md or .jsonl file; give one of those or a "
                        "folder of them.")
    if settings.chunk_words < 1:
        problems.append(f"retriever.chunk_words={settings.chunk_words}: a passage needs at least one word; "
                        "set it to 1 or more (128 is the default).")
    elif not 0 <= settings.chunk_overlap < settings.chunk_words:
        problems.append(
            f"retriever.chunk_overlap={settings.chunk_overlap} with retriever.chunk_words={settings.chunk_words}: "
            "consecutive passages share 0 or more words, fewer than a passage has; set chunk_overlap below "
            "chunk_words (e.g. a quarter of it)."
        )
    for key in ("top_k", "rerank_candidates", *(("batch_size",) if "batch_size" in settings else ())):
        if settings[key] < 1:
            problems.append(f"retriever.{key}={settings[key]} must be at least 1.")
    if settings.reranker:
        if not Path(str(settings.reranker)).is_dir():
            problems.append(
                f"retriever.reranker={settings.reranker} is not a directory; give a cross-encoder saved by "
                "sentence-transformers (CrossEncoder.save) or a Hugging Face sequence-classification checkpoint "
                "with one output, or retriever.reranker=null for none."
            )
        if settings.rerank_candidates < settings.top_k:
            problems.append(
                f"retriever.rerank_candidates={settings.rerank_candidates} is below retriever.top_k={settings.top_k}: "
                "the re-ranker picks the top_k among the candidates; set rerank_candidates to top_k or more."
            )
    if "k1" in settings and (settings.k1 < 0 or not 0 <= settings.b <= 1):
        problems.append(f"retriever.k1={settings.k1}, retriever.b={settings.b}: BM25 needs k1 >= 0 (term "
                        "saturation) and b in [0, 1] (length normalisation); 1.5 and 0.75 are usual.")
    if "rrf_k" in settings and settings.rrf_k < 0:
        problems.append(f"retriever.rrf_k={settings.rrf_k} must be 0 or more (60 is the usual constant).")
    encoder = settings.get("encoder")
    stage_names = [stage_name(key, node) for key, node in stage_nodes(config, strict=False)]
    if encoder and encoder not in stage_names and not Path(str(encoder)).is_dir():
        problems.append(
            f"retriever.encoder={encoder} is neither a directory nor a stage of this pipeline; give a "
            "sentence-transformers directory, the name of a pipeline stage that trains one (technique=embed), or "
            "retriever.encoder=null for the embedded encoder."
        )
    return problems
