"""The request bodies of the OpenAI-compatible API, checked strictly, and the parameters this server refuses.

A JSON string is not a number, 1 is not true, 4.0 is not a whole number, and NaN or Infinity
(which Python's JSON parser accepts) is no number at all. An OpenAI parameter this server does
not implement is refused (400) unless it holds the value that means "not used", rather than
silently ignored.
"""

from __future__ import annotations

from typing import Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from llmexp.serving.api_errors import ApiError, refused
from llmexp.serving.limits import refuse, shown

STRICT = ConfigDict(strict=True, allow_inf_nan=False)

UNSUPPORTED_PARAMETERS: Dict[str, tuple] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "suffix": (None, ""), "tools": (None, []), "response_format": (None, {"type": "text"}),
}


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields completions and chat completions share (unknown extra fields are checked, not dropped)."""

    model_config = ConfigDict(extra="allow", **STRICT)

    model: str
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past EOS (benchmarks)


class CompletionBody(SamplingFields):
    prompt: Union[str, List[int], List[str], List[List[int]]]


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT

    role: str
    content: Union[str, List[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatBody(SamplingFields):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None


def check_common(body: SamplingFields) -> None:
    if body.n != 1:
        raise refused(refuse("n", body.n))
    for name, value in (body.model_extra or {}).items():
        if name in UNSUPPORTED_PARAMETERS and value not in UNSUPPORTED_PARAMETERS[name]:
            raise ApiError(400, f"{name}={shown(value)} is not supported by llmexp serve; leave it out.", param=name)


def max_tokens_of(field: str, requested: Optional[int], default: int, limit: int) -> int:
    if requested is None:
        return min(default, limit)
    if requested < 1:
        raise refused(refuse(field, requested))
    if requested > limit:
        raise ApiError(400, f"{field}={shown(requested)} is above this server's limit of {limit}; ask for at most "
                            f"{limit}.", param=field)
    return requested
