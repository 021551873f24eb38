"""Passages: documents cut into overlapping windows of words, the unit a retriever indexes and returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

from llmexp.errors import UserError
from llmexp.retrieval.documents import Document


@dataclass(frozen=True)
class Passage:
    """``id`` is ``"<document id>#<n>"``, n counting the document's windows from 0."""

    id: str
    document: str
    text: str


@dataclass(frozen=True)
class Hit:
    """A passage found for a query; a higher score is a better match (scales differ between retrievers)."""

    passage: Passage
    score: float


def chunk(documents: Sequence[Document], chunk_words: int, chunk_overlap: int) -> List[Passage]:
    """Windows of ``chunk_words`` words, each starting ``chunk_words - chunk_overlap`` words after the last.

    A document's last window ends at its last word; a window wholly inside the previous one is not made,
    so a short document is one passage. A title, when a document has one, starts each of its passages:
    it is often the one place a passage's subject is named.
    """
    if chunk_words < 1 or not 0 <= chunk_overlap < chunk_words:
        raise UserError(f"retriever.chunk_words={chunk_words} and retriever.chunk_overlap={chunk_overlap}: a passage "
                        "needs at least one word and an overlap of 0 or more words, smaller than chunk_words.")
    step = chunk_words - chunk_overlap
    passages: List[Passage] = []
    for document in documents:
        words = document.text.split()
        prefix = f"{document.title}. " if document.title else ""
        starts = range(0, max(len(words) - chunk_overlap, 1), step)
        for n, start in enumerate(starts):
            text = prefix + " ".join(words[start:start + chunk_words])
            passages.append(Passage(f"{document.id}#{n}", document.id, text))
    return passages
