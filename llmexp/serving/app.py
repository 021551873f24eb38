"""The OpenAI-compatible HTTP API over an ``Engine``: completions, chat completions, models, health, metrics.

Responses follow OpenAI's schema (ids, ``object``, ``created``, ``choices``, ``usage``;
``stream: true`` gives server-sent events ``data: {...}`` ending with ``data: [DONE]``, and
``stream_options.include_usage`` a last chunk with the usage). Errors use OpenAI's error body
(``llmexp.serving.api_errors``): 400 for a bad body or field (naming it, its
value and what to give; ``llmexp.serving.request_bodies``, ``llmexp.serving.limits``), 401 without one of the API keys when the
server has keys (``llmexp.serving.auth``), 404 for an unknown model (naming the served ones) or
path, 405 for a wrong method, 413 for a body above ``max_body_bytes`` (``llmexp.serving.body_limit``),
422 when the model fails on this request alone, 429 with
``Retry-After`` when the queue is full, 500 when generation failed for the whole batch. None of
them stops the server or fails another request. The interactive docs (``/docs``, ``/redoc``,
``/openapi.json``) are not served: they would describe the API to anyone who reaches the port.

A client that closes its connection before the answer gives up its batch slot: a non-streaming
request waits for its result and for the client's disconnect at once, and cancels the generation
on the disconnect (a streaming one is cancelled when its next chunk cannot be sent).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Dict, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llmexp.rails import Rails
from llmexp.serving.api_errors import (
    ApiError, error_body, error_json, generation_error, invalid_body, not_admitted, refused,
)
from llmexp.serving.auth import RequireApiKey
from llmexp.serving.body_limit import LimitBodySize
from llmexp.serving.chat import chat_prompt_ids
from llmexp.serving.engine import Engine
from llmexp.serving.generation import (
    GenerationChunk, GenerationFailed, GenerationRequest, GenerationStream, QueueFull, UnknownModel,
)
from llmexp.serving.guarded import Guarded, guard_chat, guard_input
from llmexp.serving.limits import InvalidRequest, default_max_body_bytes, shown
from llmexp.serving.request_bodies import ChatBody, CompletionBody, SamplingFields, check_common, max_tokens_of
from llmexp.serving.retrieval_augmented import RetrievalAugmentation, augment_chat, augment_completion

CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer": counted, never sent
ENDPOINTS = "POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics"


def create_app(engine: Engine, max_tokens_limit: Optional[int] = None,
               on_ready: Optional[Callable[[], None]] = None, api_keys: Sequence[str] = (),
               max_body_bytes: Optional[int] = None, retrieval: Optional[RetrievalAugmentation] = None,
               rails: Optional[Rails] = None) -> FastAPI:
    """The FastAPI app serving ``engine``'s models; ``max_tokens_limit`` caps a request's ``max_tokens`` and
    ``max_body_bytes`` its body (default: ``limits.default_max_body_bytes`` of the context); with ``api_keys``,
    every path but ``/health`` needs one of them (``llmexp.serving.auth``); with ``retrieval``, prompts get the
    passages their question retrieves and responses list them (``llmexp.serving.retrieval_augmented``); with
    ``rails``, requests and answers are checked and responses say what fired (``llmexp.serving.guarded``)."""
    served = engine.served
    metrics = engine.metrics
    limit = min(max_tokens_limit or served.context_length, served.context_length)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if on_ready is not None:
            on_ready()
        yield

    app = FastAPI(title="llmexp serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def count(request: Request, status: int) -> None:
        name = getattr(request.state, "model", None)
        metrics.requests.labels(name if name in served.names else "unknown", str(status)).inc()

    def error_response(request: Request, error: ApiError) -> JSONResponse:
        count(request, error.status)
        return error_json(error)

    app.add_middleware(LimitBodySize, max_bytes=max_body_bytes or default_max_body_bytes(served.context_length))
    if api_keys:  # added last, so it runs first: a client without a key learns not even the body limit
        def reject(message: str) -> Response:
            metrics.requests.labels("unknown", "401").inc()
            return error_json(ApiError(401, message, error_type="authentication_error",
                                        headers={"WWW-Authenticate": "Bearer"}))

        app.add_middleware(RequireApiKey, keys=api_keys, reject=reject)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def on_bad_body(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(request, invalid_body(error, request.headers.get("content-type", "")))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> Response:
        if isinstance(error.__cause__, ClientDisconnect):  # gone before its body was read: FastAPI says 400
            count(request, CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        message = {
            400: "the body could not be parsed as JSON (nested too deeply, or a number too long); send one JSON "
                 "object.",
            404: f"no such path: {shown(request.url.path)}. This server answers {ENDPOINTS}.",
            405: f"{request.method} is not allowed on {shown(request.url.path)}. This server answers {ENDPOINTS}.",
        }.get(error.status_code, str(error.detail))
        return error_response(request, ApiError(error.status_code, message,
                                                error_type="not_found_error" if error.status_code == 404
                                                else "invalid_request_error"))

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
        check_common(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt holds {len(prompt)} prompts; send one prompt per request.", param="prompt")
            prompt = prompt[0]
        guarded = await guard_input(rails, engine, body, prompt if isinstance(prompt, str) else None)
        if guarded is not None and guarded.input.blocked:
            count(request, 200)
            return guarded.refusal(body, "cmpl", "text_completion", completion_choice)
        prompt = guarded.input.text if guarded is not None else prompt
        augmented = await augment_completion(retrieval, body.model_extra or {}, prompt)
        text, ids = (augmented.prompt, None) if isinstance(augmented.prompt, str) else (None, augmented.prompt)
        max_tokens = max_tokens_of("max_tokens", body.max_tokens, 16, limit)
        stream = augmented.submitted(lambda: _submit(engine, body, max_tokens, prompt=text, prompt_ids=ids))
        return await respond(request, body, stream, "cmpl", "text_completion", completion_choice, augmented.fields(),
                             guarded)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        request.state.model = body.model
        check_common(body)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        guarded = await guard_chat(rails, engine, body, messages)  # a masking rail rewrites the last user message
        if guarded is not None and guarded.input.blocked:
            count(request, 200)
            return guarded.refusal(body, "chatcmpl", "chat.completion", chat_choice)
        augmented = await augment_chat(retrieval, body.model_extra or {}, messages)
        try:
            ids = chat_prompt_ids(augmented.prompt, served.tokenizer)
        except InvalidRequest as error:
            raise refused(error) from None
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = max_tokens_of(field, requested, max(1, min(limit, served.context_length - len(ids))), limit)
        stream = augmented.submitted(lambda: _submit(engine, body, max_tokens, prompt_ids=ids))
        return await respond(request, body, stream, "chatcmpl", "chat.completion", chat_choice, augmented.fields(),
                             guarded)

    async def respond(request: Request, body: SamplingFields, stream: GenerationStream, id_prefix: str, kind: str,
                      choice: Callable[[GenerationChunk, bool, bool], Dict[str, Any]], extra: Dict[str, Any],
                      guarded: Optional[Guarded] = None):
        """The response (or its events); ``extra`` top-level fields go in it (in the first event when streaming);
        ``guarded``'s output rails check the answer (a guarded request does not stream)."""
        response_id = f"{id_prefix}-{uuid.uuid4().hex}"
        created = int(time.time())
        head = {"id": response_id, "created": created, "model": body.model}
        if not body.stream:
            reading = asyncio.ensure_future(stream.aread_all())
            leaving = asyncio.ensure_future(_until_disconnected(request))
            try:
                await asyncio.wait({reading, leaving}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                leaving.cancel()
                stream.cancel()  # a no-op once finished; frees the slot when the client left or this handler stopped
            if not reading.done():
                reading.cancel()
                count(request, CLIENT_CLOSED)
                return Response(status_code=CLIENT_CLOSED)  # nobody reads it
            try:
                result = reading.result()
            except GenerationFailed as error:
                raise generation_error(error) from None
            if guarded is not None:
                result, checked = await guarded.check_output(result)
                extra = {**extra, **checked}
            count(request, 200)
            return {**head, "object": kind, "choices": [choice(result, False, False)], "usage": usage(stream),
                    **extra}
        count(request, 200)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk_kind = f"{kind}.chunk"

        async def events() -> AsyncIterator[str]:
            try:
                first = True
                async for chunk in stream:
                    if chunk.finish_reason == "cancelled":
                        return
                    event = {**head, "object": chunk_kind, "choices": [choice(chunk, True, first)],
                             **(extra if first else {})}
                    if include_usage:
                        event["usage"] = None
                    first = False
                    yield sse(event)
                if include_usage:
                    yield sse({**head, "object": chunk_kind, "choices": [], "usage": usage(stream)})
            except GenerationFailed as error:
                yield sse(error_body(generation_error(error)))
            finally:
                stream.cancel()  # the client went away (or we are done): free the slot
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def _until_disconnected(request: Request) -> None:
    """Return when the client closes its connection. Once the body is read, the server's ``receive`` waits for
    exactly that (``http.disconnect``), so nothing is polled."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _submit(engine: Engine, body: SamplingFields, max_tokens: int, prompt=None, prompt_ids=None) -> GenerationStream:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    request = GenerationRequest(model=body.model, prompt=prompt, prompt_ids=prompt_ids, max_tokens=max_tokens,
                                temperature=body.temperature, top_p=body.top_p, stop=stop, seed=body.seed,
                                ignore_eos=body.ignore_eos)
    try:
        return engine.submit(request)
    except (UnknownModel, QueueFull) as error:
        raise not_admitted(error) from None
    except InvalidRequest as error:
        raise refused(error) from None
    except GenerationFailed as error:
        raise ApiError(503, str(error), error_type="server_error") from None


def completion_choice(chunk: GenerationChunk, streaming: bool, first: bool) -> Dict[str, Any]:
    return {"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": chunk.finish_reason}


def chat_choice(chunk: GenerationChunk, streaming: bool, first: bool) -> Dict[str, Any]:
    if not streaming:
        return {"index": 0, "message": {"role": "assistant", "content": chunk.text}, "logprobs": None,
                "finish_reason": chunk.finish_reason}
    delta: Dict[str, Any] = {"role": "assistant"} if first else {}
    if chunk.text or first:
        delta["content"] = chunk.text
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": chunk.finish_reason}


def usage(stream: GenerationStream) -> Dict[str, int]:
    return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
            "total_tokens": stream.prompt_tokens + stream.completion_tokens}


def sse(event: Dict[str, Any]) -> str:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n"


