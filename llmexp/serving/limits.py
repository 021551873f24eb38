"""What one generation request may ask, checked before it joins a batch: each limit is a range the engine
computes for every value inside it, so a request either is refused alone (HTTP 400 naming the field)
or runs without disturbing the others.

``FIELD_RULES`` words each field's accepted values once; the engine's checks and the HTTP layer's
type errors both quote it, so a client reads the same rule whichever check caught the value.
"""

from __future__ import annotations

import json
import math
from typing import Any, List, Optional, Sequence

TEMPERATURE_MAX = 100.0
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # int64, as vLLM takes it; torch.Generator.manual_seed overflows beyond
STOP_STRINGS_MAX = 4  # OpenAI's limit
# Stop strings are searched in each row's text at every step, on the worker thread: bounded, so one
# request's stop list cannot slow every other row's decoding.
STOP_CHARS_MAX = 256
# The default bound on a request body (``--max-body-bytes``): room for a whole context of the costliest
# tokens as JSON (a token id with its separator takes at most 8 bytes; a CJK or emoji token, ``\uXXXX``
# escaped, about 12), 4 times over, and never below 1 MiB
BODY_BYTES_PER_TOKEN = 64
BODY_BYTES_MIN = 1 << 20

FIELD_RULES = {
    "model": "the name of a served model (GET /v1/models lists them)",
    "prompt": "a string, a list of token ids, or a list holding one string or one list of token ids",
    "messages": 'a non-empty list of {"role": "system"|"user"|"assistant", "content": text} messages, text being a '
                'string or a list of {"type": "text", "text": "..."} parts',
    "max_tokens": "a whole number of at least 1",
    "max_completion_tokens": "a whole number of at least 1",
    "temperature": f"a number from 0 (greedy) to {TEMPERATURE_MAX:g}",
    "top_p": "a number above 0 and at most 1",
    "n": "1 (one choice per request; send several requests for more)",
    "stop": f"a string or a list of at most {STOP_STRINGS_MAX} strings, each 1 to {STOP_CHARS_MAX} characters",
    "seed": f"a whole number from {SEED_MIN} to {SEED_MAX}",
    "stream": "true or false",
    "stream_options": '{"include_usage": true or false}',
    "ignore_eos": "true or false",
    "user": "a string",
}


class InvalidRequest(ValueError):
    """A request field is out of range, or the prompt does not fit the context (HTTP 400); ``param`` names the field."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param


def shown(value: Any, limit: int = 60) -> str:
    """``value`` as a client wrote it in JSON, ASCII-escaped and cut to ``limit`` characters (errors echo it)."""
    try:
        text = json.dumps(value, ensure_ascii=True, allow_nan=True)
    except (TypeError, ValueError):
        text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def refuse(field: str, value: Any, why: str = "") -> InvalidRequest:
    """The 400 for ``field=value``: what is wrong (when the rule alone does not say) and what to give instead."""
    reason = f" {why}" if why else ""
    return InvalidRequest(f"{field}={shown(value)}:{reason} give {FIELD_RULES[field]}.", param=field)


def default_max_body_bytes(context_length: int) -> int:
    """The largest request body a server with a ``context_length``-token model takes unless told otherwise."""
    return max(BODY_BYTES_MIN, BODY_BYTES_PER_TOKEN * context_length)


def check_sampling(max_tokens: Any, temperature: Any, top_p: Any, seed: Any, stop: Sequence[Any]) -> None:
    """Refuse (``InvalidRequest``) any sampling value outside what the engine computes; values of a wrong type too,
    since the engine is also called from Python."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise refuse("max_tokens", max_tokens)
    if not _is_number(temperature) or not 0 <= temperature <= TEMPERATURE_MAX:
        raise refuse("temperature", temperature)
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise refuse("top_p", top_p)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not SEED_MIN <= seed <= SEED_MAX):
        raise refuse("seed", seed)
    stop = list(stop)
    if len(stop) > STOP_STRINGS_MAX:
        raise refuse("stop", stop, f"{len(stop)} strings;")
    for string in stop:
        if not isinstance(string, str) or not 1 <= len(string) <= STOP_CHARS_MAX:
            raise refuse("stop", stop)


def check_text(text: str, field: str) -> None:
    """Refuse text the tokenizer cannot encode: a lone UTF-16 surrogate (JSON allows ``"\\ud800"``) is not a character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequest(
            f"{field} holds {ascii(text[error.start:error.end])} at character {error.start}, a lone UTF-16 surrogate "
            "that is no Unicode character; send valid text (pair the surrogate, or escape the character itself).",
            param=field,
        ) from None


def prompt_token_ids(prompt: Optional[str], prompt_ids: Optional[Sequence[int]], tokenizer, vocabulary: int) -> List[int]:
    """The prompt's token ids: exactly one of ``prompt`` (text, tokenized) and ``prompt_ids`` (each in the vocabulary)."""
    if (prompt is None) == (prompt_ids is None):
        raise InvalidRequest("give exactly one of prompt (text) and prompt_ids (token ids).", param="prompt")
    if prompt_ids is not None:
        if any(isinstance(i, bool) or not isinstance(i, int) for i in prompt_ids):
            raise InvalidRequest("prompt token ids must be whole numbers.", param="prompt")
        ids = list(prompt_ids)
        bad = [i for i in ids if not 0 <= i < vocabulary]
        if bad:
            raise InvalidRequest(f"prompt token ids {bad[:5]} are outside this model's vocabulary [0, {vocabulary}).",
                                 param="prompt")
    else:
        check_text(prompt, "prompt")
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise InvalidRequest("the prompt is empty (no tokens); give some text.", param="prompt")
    return ids


def check_context(prompt_tokens: int, max_tokens: int, context: int) -> None:
    """Refuse a prompt that, with ``max_tokens`` more, does not fit the model's ``context``."""
    if prompt_tokens >= context:
        raise InvalidRequest(
            f"the prompt is {prompt_tokens} tokens; this model's context is {context} tokens, prompt and "
            "completion together. Shorten the prompt.", param="prompt"
        )
    if prompt_tokens + max_tokens > context:
        raise InvalidRequest(
            f"max_tokens={max_tokens} with a {prompt_tokens}-token prompt exceeds the {context}-token "
            f"context; ask for max_tokens <= {context - prompt_tokens}.", param="max_tokens"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
