"""How retrieved passages reach a prompt: one fixed layout, the one the embedded reader model is trained on."""

from __future__ import annotations

from typing import Sequence

from llmexp.retrieval.passages import Hit


def with_context(prompt: str, hits: Sequence[Hit]) -> str:
    """``"Context: <passages joined by spaces>\\n<prompt>"``, the prompt being e.g. ``"Question: ...\\nAnswer:"``."""
    return "Context: " + " ".join(hit.passage.text for hit in hits) + "\n" + prompt
