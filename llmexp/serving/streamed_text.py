"""A row's generated text as it becomes final: the ids decoded so far, sent as deltas, stop strings found.

Streamed text never shows what a stop string later removes, and never half a character.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

WINDOW = 8  # ids a decoding window grows to before it restarts


class StreamedText:
    """Turns a row's token ids into text deltas, and finds its stop strings.

    Tokenizers merge pieces across tokens (a word-level one joins words with spaces, byte-level
    BPE completes characters, SentencePiece drops the space of a text's first word), so a
    token's text depends on the tokens before it. Decoding every id at every step would cost a
    row time in proportion to its length per token; instead each step decodes a short window
    (a few ids already taken, then the new ones) and appends what it adds to the window's text
    at the last step, as vLLM and TGI stream; every ``WINDOW`` ids the window restarts at the
    last ids taken, so one decode per token suffices and the window stays short. What is new is sent,
    holding back an incomplete character and any tail that could begin a stop string, so
    streamed text never shows what a stop string later removes.
    """

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: List[int] = []
        self.text = ""  # the text of ids[:self._read]
        self.sent = 0  # characters of the text already sent
        self._window = 0  # where the decoding window starts: the text of ids before it is settled
        self._read = 0  # ids whose text is in self.text
        self._window_text = ""  # the text of ids[self._window:self._read]

    def push(self, token_id: int) -> Tuple[str, bool]:
        """Add a token; return (text to send now, whether a stop string was reached)."""
        self.ids.append(token_id)
        if not self._take_window(complete_only=True):  # a multi-byte character is not complete yet
            return "", False
        text = self.text
        # a stop string that ended within sent text would have been found when it was pushed
        stops = [i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
        if stops:
            return self._advance(min(stops)), True
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._advance(len(text) - hold), False

    def flush(self) -> str:
        """The held-back text, sent when the row ends for another reason than a stop string."""
        self._take_window(complete_only=False)
        return self._advance(len(self.text))

    def _take_window(self, complete_only: bool) -> bool:
        """Append the text the ids after ``_read`` add; False (nothing taken) if it ends in half a character."""
        if self._read == len(self.ids):
            return True
        window = self._decode(self.ids[self._window:])
        if complete_only and (window.endswith("\ufffd") or len(window) <= len(self._window_text)):
            return not window.endswith("\ufffd")
        self.text += window[len(self._window_text):]
        if len(self.ids) - self._window > WINDOW:  # restart at the ids taken last time: context for the next ones
            self._window = self._read
            window = self._decode(self.ids[self._window:])
        self._read, self._window_text = len(self.ids), window
        return True

    def _decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _advance(self, end: int) -> str:
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta
