"""Every class of bad request ``llmexp serve`` answers with a 4xx, shared by tests/test_serve.py (each alone) and
tests/test_serve_load.py (all of them mixed with good requests at concurrency 64).

Bodies are raw bytes, so JSON that ``json.dumps`` would not write (``NaN``, a lone surrogate escape,
a 5000-digit number, nesting 100000 deep) is sent exactly as a client could send it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from llmexp.serving.limits import default_max_body_bytes


@dataclass(frozen=True)
class BadRequest:
    """One bad request: what is sent, the status it gets, and a fragment of the error message (the field named)."""

    label: str
    body: bytes
    status: int
    fragment: str
    path: str = "/v1/completions"
    method: str = "POST"
    content_type: str = "application/json"


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def bad_requests(model: str, context: int) -> List[BadRequest]:
    """The catalogue for a server whose base model is ``model`` with a ``context``-token window (and the default
    body limit that follows from it)."""
    max_body = default_max_body_bytes(context)

    def completion(label: str, status: int, fragment: str, raw: Optional[bytes] = None, **fields) -> BadRequest:
        body: Dict[str, Any] = {"model": model, "prompt": "hello", "max_tokens": 2, **fields}
        return BadRequest(label, raw if raw is not None else _json({k: v for k, v in body.items() if v is not ...}),
                          status, fragment)

    def raw_field(name: str, json_text: str) -> bytes:
        return f'{{"model": {json.dumps(model)}, "prompt": "hello", "max_tokens": 2, "{name}": {json_text}}}'.encode()

    def chat(label: str, status: int, fragment: str, **fields) -> BadRequest:
        body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, **fields}
        return BadRequest(label, _json({k: v for k, v in body.items() if v is not ...}), status, fragment,
                          path="/v1/chat/completions")

    return [
        # the model
        completion("model unknown", 404, "served models", model="gpt-4"),
        completion("model missing", 400, "model is required", model=...),
        completion("model not a string", 400, "model=123", model=123),
        # the prompt
        completion("prompt missing", 400, "prompt is required", prompt=...),
        completion("prompt a number", 400, "prompt=12", prompt=12),
        completion("prompt an empty list", 400, "prompt is empty", prompt=[]),
        completion("prompt an empty token list", 400, "prompt is empty", prompt=[[]]),
        completion("prompt several prompts", 400, "one prompt per request", prompt=["a", "b"]),
        completion("prompt token id negative", 400, "outside this model's vocabulary", prompt=[-1]),
        completion("prompt token id huge", 400, "outside this model's vocabulary", prompt=[10**30]),
        completion("prompt token id fractional", 400, "prompt=[1.5]", prompt=[1.5]),
        completion("prompt a lone surrogate", 400, "surrogate", raw=raw_field("prompt", '"a \\ud800 b"')),
        completion("prompt longer than the context", 400, f"context is {context} tokens", prompt="hello " * context),
        # max_tokens
        completion("max_tokens zero", 400, "max_tokens=0", max_tokens=0),
        completion("max_tokens negative", 400, "max_tokens=-3", max_tokens=-3),
        completion("max_tokens huge", 400, "above this server's limit", max_tokens=10**30),
        completion("max_tokens fractional", 400, "max_tokens=4.0", max_tokens=4.0),
        completion("max_tokens a string", 400, 'max_tokens="16"', max_tokens="16"),
        completion("max_tokens a boolean", 400, "max_tokens=true", max_tokens=True),
        completion("max_tokens 5000 digits", 400, "could not be parsed", raw=raw_field("max_tokens", "9" * 5000)),
        # temperature
        completion("temperature NaN", 400, "temperature=NaN", raw=raw_field("temperature", "NaN")),
        completion("temperature Infinity", 400, "temperature=Infinity", raw=raw_field("temperature", "Infinity")),
        completion("temperature negative", 400, "temperature=-1", temperature=-1),
        completion("temperature above 100", 400, "temperature=101", temperature=101),
        completion("temperature a string", 400, 'temperature="hot"', temperature="hot"),
        completion("temperature a boolean", 400, "temperature=true", temperature=True),
        # top_p
        completion("top_p zero", 400, "top_p=0", top_p=0),
        completion("top_p above 1", 400, "top_p=1.5", top_p=1.5),
        completion("top_p negative", 400, "top_p=-0.1", top_p=-0.1),
        completion("top_p NaN", 400, "top_p=NaN", raw=raw_field("top_p", "NaN")),
        # seed
        completion("seed above int64", 400, "seed=1000000000000000000000000000000", seed=10**30),
        completion("seed below int64", 400, "seed=-9223372036854775809", seed=-(2**63) - 1),
        completion("seed a string", 400, 'seed="7"', seed="7"),
        completion("seed fractional", 400, "seed=1.5", seed=1.5),
        # n
        completion("n two", 400, "n=2", n=2),
        completion("n zero", 400, "n=0", n=0),
        completion("n huge", 400, "n=1000000000000000000000000000000", n=10**30),
        # stop
        completion("stop empty string", 400, 'stop=[""]', stop=""),
        completion("stop list with an empty string", 400, 'stop=[""]', stop=[""]),
        completion("stop five strings", 400, "5 strings", stop=["a", "b", "c", "d", "e"]),
        completion("stop string of 257 characters", 400, "stop=", stop=["x" * 257]),
        completion("stop a number in the list", 400, "stop=[1]", stop=[1]),
        completion("stop an object", 400, 'stop={"a": 1}', stop={"a": 1}),
        # the other fields
        completion("stream a string", 400, 'stream="yes"', stream="yes"),
        completion("stream_options wrong type", 400, "stream_options.include_usage",
                   stream=True, stream_options={"include_usage": "x"}),
        completion("ignore_eos a number", 400, "ignore_eos=1", ignore_eos=1),
        completion("logprobs asked for", 400, "logprobs=5 is not supported", logprobs=5),
        completion("echo asked for", 400, "echo=true is not supported", echo=True),
        completion("best_of above 1", 400, "best_of=2 is not supported", best_of=2),
        completion("presence_penalty set", 400, "presence_penalty=0.5 is not supported", presence_penalty=0.5),
        # the body
        BadRequest("body malformed JSON", b"{not json", 400, "not valid JSON"),
        BadRequest("body a JSON array", b"[1, 2]", 400, "the body is [1, 2]"),
        BadRequest("body a JSON string", b'"hello"', 400, 'the body is "hello"'),
        BadRequest("body null", b"null", 400, "the body is null"),
        BadRequest("body empty", b"", 400, "the body is null"),
        BadRequest("body nested 100000 deep", b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400,
                   "could not be parsed"),
        completion("body above the size limit", 413, f"limit of {max_body} bytes; send a shorter request, or start "
                   "llmexp serve with a larger --max-body-bytes", prompt="x" * max_body),
        BadRequest("body JSON sent as text/plain", _json({"model": model, "prompt": "hello"}), 400, "not as JSON",
                   content_type="text/plain"),
        # chat
        chat("messages empty", 400, "messages=[]", messages=[]),
        chat("messages missing", 400, "messages is required", messages=...),
        chat("message role unknown", 400, "messages[0].role=\"wizard\"", messages=[{"role": "wizard", "content": "hi"}]),
        chat("message role missing", 400, "messages[0].role is required", messages=[{"content": "hi"}]),
        chat("conversation ends with the assistant", 400, "must end with a user message",
             messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]),
        chat("message content an image part", 400, "messages[0].content",
             messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        chat("message content a number", 400, "messages[0].content", messages=[{"role": "user", "content": 5}]),
        BadRequest("message content a lone surrogate",
                   f'{{"model": {json.dumps(model)}, "messages": [{{"role": "user", "content": "\\udc00"}}]}}'.encode(),
                   400, "messages[0].content holds", path="/v1/chat/completions"),
        chat("max_completion_tokens negative", 400, "max_completion_tokens=-1", max_completion_tokens=-1),
        # paths and methods
        BadRequest("GET on a POST endpoint", b"", 405, "GET is not allowed", method="GET"),
        BadRequest("unknown path", b"{}", 404, "no such path", path="/v1/embeddings"),
        BadRequest("interactive docs", b"", 404, "no such path", path="/docs", method="GET"),
        BadRequest("OpenAPI description", b"", 404, "no such path", path="/openapi.json", method="GET"),
        BadRequest("ReDoc", b"", 404, "no such path", path="/redoc", method="GET"),
    ]
