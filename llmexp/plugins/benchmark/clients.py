"""The two targets a benchmark sends requests to, behind one ``send(request) -> RequestRecord``.

- ``InProcessClient``: llmexp's serving engine in this process (``llmexp.serving.engine``);
  output tokens are the engine's own (``output_tokens_source: engine``).
- ``OpenAIClient``: any OpenAI-compatible server (``llmexp serve``, vLLM, NIM, Triton's OpenAI
  frontend), ``/v1/completions`` or ``/v1/chat/completions`` with ``stream: true`` (SSE), over
  httpx. Output tokens come from the stream's ``usage`` when the server reports it (asked for
  with ``stream_options.include_usage``; ``output_tokens_source: usage``), else from the
  tokenizer on the streamed text (``tokenizer``).

A client never raises for one failed request: the record carries the error and the point
reports it in ``error_count``. The API key is read from the environment by the caller and
lives only in the request header; a ``user:password`` the caller took out of the URL
(``llmexp.configuration.secrets.split_url_credentials``) comes as ``auth`` (HTTP Basic), so the URL these
clients log (httpx, at INFO), show and record holds no password.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from llmexp.sdk import UserError
from llmexp.plugins.benchmark.metrics import RequestRecord


NO_OUTPUT = "no output"  # the error of a request that ended without a single output token


@dataclass(frozen=True)
class BenchRequest:
    """One request of a point: the prompt and how many tokens to generate (greedy)."""

    prompt: str
    input_tokens: int
    max_tokens: int
    ignore_eos: bool = False


@dataclass
class Reply:
    """A finished request: its timeline, and the output tokens (for the coherence gate)."""

    record: RequestRecord
    token_ids: List[int]


class InProcessClient:
    """Requests to an ``llmexp.serving.engine.Engine`` serving ``model`` in this process.

    Each request's stream is read on a thread of its own (``for chunk in stream``), not with
    ``async for``: the engine posts chunks to an event loop through its self-pipe, and on a
    busy CPU each such wake-up delays the engine's worker thread; measured on 2 cores at
    concurrency 1, 6 ms per decoding step read asynchronously against 2.2 ms read on a thread.
    """

    def __init__(self, engine, model: str, max_in_flight: int):
        from concurrent.futures import ThreadPoolExecutor

        self.engine = engine
        self.model = model
        self.readers = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="llmexp-benchmark-reader")

    async def send(self, request: BenchRequest) -> Reply:
        return await asyncio.get_running_loop().run_in_executor(self.readers, self._send_blocking, request)

    def _send_blocking(self, request: BenchRequest) -> Reply:
        from llmexp.sdk import GenerationRequest

        record = RequestRecord(sent=time.perf_counter(), input_tokens=request.input_tokens,
                               output_tokens_source="engine")
        token_ids: List[int] = []
        pieces: List[str] = []
        try:
            stream = self.engine.submit(GenerationRequest(
                model=self.model, prompt=request.prompt, max_tokens=request.max_tokens, temperature=0.0,
                top_p=1.0, stop=(), seed=None, ignore_eos=request.ignore_eos,
            ))
            for chunk in stream:
                if chunk.token_ids and record.first_token is None:
                    record.first_token = time.perf_counter()
                token_ids.extend(chunk.token_ids)
                pieces.append(chunk.text or "")
        except Exception as error:  # noqa: BLE001 - a failed request is data, not a crash
            record.error = f"{type(error).__name__}: {error}"
        record.done = time.perf_counter()
        record.output_tokens = len(token_ids)
        record.text = "".join(pieces)
        if record.error is None and record.first_token is None:
            record.error = NO_OUTPUT
        return Reply(record, token_ids)

    async def aclose(self) -> None:
        self.readers.shutdown(wait=True)


def api_base(url: str) -> str:
    """``http://host:port`` or ``.../v1`` -> the ``.../v1`` base the OpenAI routes hang from."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


class OpenAIClient:
    """Streaming requests to an OpenAI-compatible server; ``tokenizer`` counts text when there is no usage."""

    def __init__(self, url: str, model: str, endpoint_type: str, tokenizer, api_key: Optional[str] = None,
                 timeout_s: float = 600.0, extra_body: Optional[Dict[str, Any]] = None, max_connections: int = 1024,
                 auth=None):
        import httpx

        self.base = api_base(url)
        self.model = model
        self.endpoint_type = endpoint_type
        self.tokenizer = tokenizer
        self.extra_body = dict(extra_body or {})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.http = httpx.AsyncClient(headers=headers, auth=auth, timeout=httpx.Timeout(timeout_s, connect=10.0),
                                      limits=limits)

    @property
    def route(self) -> str:
        return f"{self.base}/chat/completions" if self.endpoint_type == "chat" else f"{self.base}/completions"

    def body(self, request: BenchRequest) -> Dict[str, Any]:
        """The JSON body: greedy, streamed, usage asked for; vLLM's ``ignore_eos``/``min_tokens`` only when asked."""
        body: Dict[str, Any] = {
            "model": self.model, "max_tokens": request.max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.endpoint_type == "chat":
            body["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.prompt
        if request.ignore_eos:
            body.update(ignore_eos=True, min_tokens=request.max_tokens)
        body.update(self.extra_body)
        return body

    async def send(self, request: BenchRequest) -> Reply:
        record = RequestRecord(sent=time.perf_counter(), input_tokens=request.input_tokens)
        pieces: List[str] = []
        usage_tokens: Optional[int] = None
        try:
            async with self.http.stream("POST", self.route, json=self.body(request)) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode("utf-8", "replace")
                    raise RuntimeError(f"HTTP {response.status_code} from {self.route}: {' '.join(text.split())[:300]}")
                # SSE by hand: an OpenAI stream is only `data: {json}` lines and `data: [DONE]`
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if event.get("error"):
                        raise RuntimeError(f"server error in stream: {event['error']}")
                    text = self._text_of(event)
                    if text and record.first_token is None:
                        record.first_token = time.perf_counter()
                    pieces.append(text)
                    usage = event.get("usage") or {}
                    if usage.get("completion_tokens") is not None:
                        usage_tokens = int(usage["completion_tokens"])
        except Exception as error:  # noqa: BLE001 - a failed request is data, not a crash
            record.error = f"{type(error).__name__}: {error}"
        record.done = time.perf_counter()
        record.text = "".join(pieces)
        token_ids = self.tokenizer.encode(record.text, add_special_tokens=False) if record.text else []
        if usage_tokens is not None:
            record.output_tokens, record.output_tokens_source = usage_tokens, "usage"
        else:
            record.output_tokens = len(token_ids)
        if record.error is None and record.first_token is None:
            record.error = NO_OUTPUT
        return Reply(record, token_ids)

    def _text_of(self, event: Dict[str, Any]) -> str:
        choices = event.get("choices") or []
        if not choices:
            return ""  # the final usage-only chunk
        choice = choices[0]
        if self.endpoint_type == "chat":
            return (choice.get("delta") or {}).get("content") or ""
        return choice.get("text") or ""

    async def aclose(self) -> None:
        await self.http.aclose()


async def listed_models(url: str, api_key: Optional[str], field: str = "technique", attempts: int = 5,
                        backoff_s: float = 0.5, auth=None) -> List[str]:
    """The model ids ``GET /v1/models`` lists, retried ``attempts`` times; unreachable -> ``UserError``.

    ``auth``: httpx's, e.g. ``httpx.BasicAuth`` for a ``user:password`` taken out of ``url``.
    """
    import httpx

    route = f"{api_base(url)}/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    last = ""
    async with httpx.AsyncClient(headers=headers, auth=auth, timeout=10.0) as http:
        for attempt in range(attempts):
            try:
                response = await http.get(route)
            except httpx.HTTPError as error:
                last = f"{type(error).__name__}: {error}"
            else:
                if response.status_code in (401, 403):
                    raise UserError(
                        f"{field}.url={url}: {route} answered HTTP {response.status_code} (not authorized); set "
                        f"{field}.api_key_env to the name of the environment variable holding the server's API key."
                    )
                if response.status_code == 200:
                    return [entry.get("id") for entry in response.json().get("data", []) if entry.get("id")]
                last = f"HTTP {response.status_code}: {' '.join(response.text.split())[:200]}"
            if attempt + 1 < attempts:
                await asyncio.sleep(backoff_s * 2 ** attempt)
    raise UserError(
        f"{field}.url={url}: the endpoint did not answer {route} after {attempts} attempts ({last}). Start the "
        f"server (e.g. `llmexp serve`), or fix {field}.url to its address (http://host:port)."
    )
