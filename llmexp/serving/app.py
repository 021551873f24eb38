"""The OpenAI-compatible HTTP API over an ``Engine``: completions, chat completions, models, health, metrics.

Responses follow OpenAI's schema (ids, ``object``, ``created``, ``choices``, ``usage``;
``stream: true`` gives server-sent events ``data: {...}`` ending with ``data: [DONE]``, and
``stream_options.include_usage`` a last chunk with the usage). Errors use OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``: 400 for a bad body or field, 404 for an
unknown model (naming the served ones), 429 with ``Retry-After`` when the queue is full, 500
when generation failed. None of them stops the server.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Dict, List, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from llmexp.serving.chat import ChatFormatError, chat_prompt_ids
from llmexp.serving.engine import (
    Engine,
    GenerationChunk,
    GenerationFailed,
    GenerationRequest,
    GenerationStream,
    InvalidRequest,
    QueueFull,
    UnknownModel,
)

RETRY_AFTER_SECONDS = 1

# OpenAI parameters this server does not implement, with the values that mean "not used": any other
# value is refused (400) rather than silently ignored.
UNSUPPORTED_PARAMETERS: Dict[str, tuple] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "suffix": (None, ""), "tools": (None, []), "response_format": (None, {"type": "text"}),
}


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error",
                 param: Optional[str] = None, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.param, self.headers = status, message, error_type, param, headers


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields completions and chat completions share (unknown extra fields are checked, not dropped)."""

    model_config = ConfigDict(extra="allow")

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


class CompletionBody(_Sampling):
    prompt: Union[str, List[int], List[str], List[List[int]]]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str
    content: Union[str, List[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatBody(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None


def create_app(engine: Engine, max_tokens_limit: Optional[int] = None,
               on_ready: Optional[Callable[[], None]] = None) -> FastAPI:
    """The FastAPI app serving ``engine``'s models; ``max_tokens_limit`` caps a request's ``max_tokens``."""
    served = engine.served
    metrics = engine.metrics
    limit = min(max_tokens_limit or served.context_length, served.context_length)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if on_ready is not None:
            on_ready()
        yield

    app = FastAPI(title="llmexp serve", lifespan=lifespan)

    def count(request: Request, status: int) -> None:
        name = getattr(request.state, "model", None)
        metrics.requests.labels(name if name in served.names else "unknown", str(status)).inc()

    def error_response(request: Request, error: ApiError) -> JSONResponse:
        count(request, error.status)
        body = {"error": {"message": error.message, "type": error.error_type, "param": error.param,
                          "code": error.status}}
        return JSONResponse(body, status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def on_bad_body(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(_describe(problem) for problem in error.errors())
        return error_response(request, ApiError(400, f"invalid request body: {problems}"))

    @app.get("/health")
    async def health() -> Dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> Dict[str, Any]:
        data = [{"id": served.base_name, "object": "model", "created": served.created, "owned_by": "llmexp",
                 "root": str(served.base_dir), "parent": None}]
        data += [{"id": name, "object": "model", "created": served.created, "owned_by": "llmexp",
                  "root": str(path), "parent": served.base_name} for name, path in served.adapter_dirs.items()]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        request.state.model = body.model
        _check_common(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt holds {len(prompt)} prompts; send one prompt per request.", param="prompt")
            prompt = prompt[0]
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
        max_tokens = _max_tokens(body.max_tokens, 16, limit)
        stream = _submit(engine, body, max_tokens, prompt=text, prompt_ids=ids)
        return await respond(request, body, stream, "cmpl", "text_completion", _completion_choice)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        request.state.model = body.model
        _check_common(body)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = chat_prompt_ids(messages, served.tokenizer)
        except ChatFormatError as error:
            raise ApiError(400, str(error), param="messages") from None
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = _max_tokens(requested, max(1, min(limit, served.context_length - len(ids))), limit)
        stream = _submit(engine, body, max_tokens, prompt_ids=ids)
        return await respond(request, body, stream, "chatcmpl", "chat.completion", _chat_choice)

    async def respond(request: Request, body: _Sampling, stream: GenerationStream, id_prefix: str, kind: str,
                      choice: Callable[[GenerationChunk, bool, bool], Dict[str, Any]]):
        response_id = f"{id_prefix}-{uuid.uuid4().hex}"
        created = int(time.time())
        head = {"id": response_id, "created": created, "model": body.model}
        count(request, 200)
        if not body.stream:
            try:
                result = await stream.aread_all()
            except GenerationFailed as error:
                raise ApiError(500, str(error), error_type="server_error") from None
            finally:
                stream.cancel()  # a no-op once finished; frees the slot if this handler was interrupted
            return {**head, "object": kind, "choices": [choice(result, False, False)], "usage": _usage(stream)}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk_kind = f"{kind}.chunk"

        async def events() -> AsyncIterator[str]:
            try:
                first = True
                async for chunk in stream:
                    if chunk.finish_reason == "cancelled":
                        return
                    event = {**head, "object": chunk_kind, "choices": [choice(chunk, True, first)]}
                    if include_usage:
                        event["usage"] = None
                    first = False
                    yield _sse(event)
                if include_usage:
                    yield _sse({**head, "object": chunk_kind, "choices": [], "usage": _usage(stream)})
            except GenerationFailed as error:
                yield _sse({"error": {"message": str(error), "type": "server_error", "param": None, "code": 500}})
            finally:
                stream.cancel()  # the client went away (or we are done): free the slot
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _submit(engine: Engine, body: _Sampling, max_tokens: int, prompt=None, prompt_ids=None) -> GenerationStream:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    request = GenerationRequest(model=body.model, prompt=prompt, prompt_ids=prompt_ids, max_tokens=max_tokens,
                                temperature=body.temperature, top_p=body.top_p, stop=stop, seed=body.seed,
                                ignore_eos=body.ignore_eos)
    try:
        return engine.submit(request)
    except UnknownModel as error:
        raise ApiError(404, str(error), param="model", error_type="not_found_error") from None
    except InvalidRequest as error:
        raise ApiError(400, str(error)) from None
    except QueueFull as error:
        raise ApiError(429, f"the server is busy: {error}", error_type="rate_limit_error",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
    except GenerationFailed as error:
        raise ApiError(503, str(error), error_type="server_error") from None


def _check_common(body: _Sampling) -> None:
    if body.n != 1:
        raise ApiError(400, f"n={body.n}: this server returns one choice per request; send n=1 (or leave it out) "
                            "and make several requests.", param="n")
    for name, value in (body.model_extra or {}).items():
        if name in UNSUPPORTED_PARAMETERS and value not in UNSUPPORTED_PARAMETERS[name]:
            raise ApiError(400, f"{name}={value!r} is not supported by llmexp serve; leave it out.", param=name)


def _max_tokens(requested: Optional[int], default: int, limit: int) -> int:
    if requested is None:
        return min(default, limit)
    if requested < 1:
        raise ApiError(400, f"max_tokens={requested}: give a whole number of at least 1.", param="max_tokens")
    if requested > limit:
        raise ApiError(400, f"max_tokens={requested} is above this server's limit of {limit}; ask for at most {limit}.",
                       param="max_tokens")
    return requested


def _completion_choice(chunk: GenerationChunk, streaming: bool, first: bool) -> Dict[str, Any]:
    return {"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": chunk.finish_reason}


def _chat_choice(chunk: GenerationChunk, streaming: bool, first: bool) -> Dict[str, Any]:
    if not streaming:
        return {"index": 0, "message": {"role": "assistant", "content": chunk.text}, "logprobs": None,
                "finish_reason": chunk.finish_reason}
    delta: Dict[str, Any] = {"role": "assistant"} if first else {}
    if chunk.text or first:
        delta["content"] = chunk.text
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": chunk.finish_reason}


def _usage(stream: GenerationStream) -> Dict[str, int]:
    return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
            "total_tokens": stream.prompt_tokens + stream.completion_tokens}


def _sse(event: Dict[str, Any]) -> str:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n"


def _describe(problem: Dict[str, Any]) -> str:
    where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
    return f"{where}: {problem.get('msg', 'invalid')}"
