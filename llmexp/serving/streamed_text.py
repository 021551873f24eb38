"""A row's generated text as it becomes final: the ids decoded so far, sent as deltas, stop strings found.

Streamed text never shows what a stop string later removes, and never half a character.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple


class StreamedText:
    """Turns a row's token ids into text deltas, and finds its stop strings.

    Decodes all ids so far each step (tokenizers merge pieces across tokens: a word-level
    one joins words with spaces, byte-level BPE completes characters), sends what is new,
    and holds back an incomplete character and any tail that could begin a stop string, so
    streamed text never shows what a stop string later removes.
    """

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: List[int] = []
        self.sent = 0  # characters of the text already sent

    def push(self, token_id: int) -> Tuple[str, bool]:
        """Add a token; return (text to send now, whether a stop string was reached)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return "", False
        stops = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if stops:
            return self._advance(text, min(stops)), True
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._advance(text, len(text) - hold), False

    def flush(self) -> str:
        """The held-back text, sent when the row ends for another reason than a stop string."""
        return self._advance(self.tokenizer.decode(self.ids, skip_special_tokens=True), None)

    def _advance(self, text: str, end: Optional[int]) -> str:
        end = len(text) if end is None else end
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta
