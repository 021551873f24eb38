"""Dense retrieval: passages and queries embedded by a sentence-transformers encoder, searched with FAISS.

Embeddings are L2-normalised, so the inner product of ``faiss.IndexFlatIP`` (exact search) is their
cosine similarity. The encoder itself comes from ``llmexp.retrieval.encoders.load_encoder``; its
``lineage`` (the spec and a hash of its weights) goes into the index's manifest, so an index is never
searched with queries from another encoder.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple


def _faiss():
    """The faiss module, imported with its loader's log held to warnings (it logs each CPU build it tries at INFO)."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def embed(encoder, texts: Sequence[str], batch_size: int):
    """Normalised float32 embeddings of ``texts``, one row each."""
    return encoder.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                          show_progress_bar=False).astype("float32")


def lineage(encoder, spec: Optional[str]) -> Dict[str, Any]:
    """What the encoder is: the ``retriever.encoder`` it came from and a SHA-256 of its weights, in order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"spec": spec, "weights_sha256": digest.hexdigest()}


class DenseRanking:
    """Passage indexes ranked by cosine similarity to the query; the index is saved as one FAISS file."""

    FILE = "dense.faiss"  # its file in the index directory

    def __init__(self, encoder, index, batch_size: int) -> None:
        self.encoder, self.index, self.batch_size = encoder, index, batch_size

    @classmethod
    def build(cls, encoder, texts: Sequence[str], batch_size: int) -> "DenseRanking":
        faiss = _faiss()
        vectors = embed(encoder, texts, batch_size)
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return cls(encoder, index, batch_size)

    @classmethod
    def load(cls, encoder, file: Path, batch_size: int) -> "DenseRanking":
        return cls(encoder, _faiss().read_index(str(file)), batch_size)

    def save(self, file: Path) -> None:
        _faiss().write_index(self.index, str(file))

    def rank(self, queries: Sequence[str], depth: int) -> List[List[Tuple[int, float]]]:
        """The ``depth`` nearest passages of each query as ``(passage index, cosine)``, best first."""
        scores, found = self.index.search(embed(self.encoder, queries, self.batch_size), min(depth, self.index.ntotal))
        return [[(int(i), float(s)) for i, s in zip(row, row_scores) if i >= 0] for row, row_scores in zip(found, scores)]

    @staticmethod
    def fusion_ranking(row: Sequence[Tuple[int, float]]) -> List[int]:
        """What a ranked row gives reciprocal rank fusion: every passage, in order (every cosine is a measurement)."""
        return [i for i, _ in row]
