"""The records fine-tuning reads: an instruction example (SFT, LoRA) and a preference pair (DPO).

Plain text on both sides, not tokenized yet. The readers of each format (``instructions``,
``preference``) and the embedded Text2SQL set (``text2sql``) all make them, so they sit apart
from every one of those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Example:
    """``prompt`` is the user's side as plain text (not chat-templated yet), ``response`` the target."""

    prompt: str
    response: str


@dataclass(frozen=True)
class PreferencePair:
    """``prompt`` is plain text like ``Example.prompt``; ``chosen`` is preferred over ``rejected``, by at least
    ``margin`` in reward where the record gives one (a reward model's Bradley–Terry margin, as TRL reads it)."""

    prompt: str
    chosen: str
    rejected: str
    margin: Optional[float] = None
