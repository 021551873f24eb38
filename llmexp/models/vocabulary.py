"""Whether a model's embedding rows hold its tokenizer: checked by the plan and again when a model is built."""

from __future__ import annotations

from typing import Optional


def vocabulary_problem(vocab_size: int, tokens: int, tokenizer: str = "the tokenizer's") -> Optional[str]:
    """The refusal of a model with ``vocab_size`` embedding rows for a tokenizer of ``tokens`` tokens, or None."""
    if tokens <= vocab_size:
        return None
    return (f"model.vocab_size={vocab_size} is smaller than {tokenizer} {tokens} tokens; set model.vocab_size="
            f"{-(-tokens // 64) * 64} or more.")
