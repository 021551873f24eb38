"""Retrieval: documents chunked into passages, indexed (BM25, dense, hybrid), searched and scored.

Evaluation's rag condition and `llmexp serve` use the same retrievers, so what is measured is what is served.
Importing this package imports neither torch nor the index libraries: they load when an index is built.

``documents.py`` (what is searched), ``passages.py`` (chunking; ``Passage``, ``Hit``), ``sparse.py`` (BM25),
``dense.py`` (an encoder and FAISS), ``fusion.py`` (reciprocal rank fusion), ``reranking.py`` (a cross-encoder),
``retriever.py`` (the configured retriever and its cached index), ``metrics.py`` (recall@k, MRR, nDCG@k),
``prompting.py`` (passages in a prompt), ``encoders.py`` (the encoders dense retrieval embeds with).
"""

from llmexp.retrieval.documents import Document, documents_for, read_documents
from llmexp.retrieval.metrics import retrieval_metrics
from llmexp.retrieval.passages import Hit, Passage, chunk
from llmexp.retrieval.prompting import with_context
from llmexp.retrieval.retriever import INDEX_DIRECTORY, Retriever, build_retriever

__all__ = ["INDEX_DIRECTORY", "Document", "Hit", "Passage", "Retriever", "build_retriever", "chunk", "documents_for", "read_documents",
           "retrieval_metrics", "with_context"]
