"""Asking an OpenAI-compatible chat endpoint for verdicts: concurrency-limited, retried, never raising per item.

``POST <url>/chat/completions`` with ``{model, messages, temperature, max_tokens}`` and,
when an API key is given, ``Authorization: Bearer <key>``; the reply's text is
``choices[0].message.content``. Works with OpenAI, vLLM, TensorRT-LLM, NIM and
``llmexp serve``.

Each item is retried up to ``retries`` more times, after ``backoff_s * 2**(attempt - 1)``
seconds (or the server's ``Retry-After``, whichever is longer, at most a minute), when

* the endpoint cannot be reached or does not answer within ``timeout_s``,
* it answers 429 (rate limit) or 5xx, or
* its reply is malformed (no score in range: the template decides).

Other 4xx answers (a wrong model name, a missing key) are not retried. Every item ends as
a ``Judgment``: ``scored``; ``unparsable`` (replies came back but none held a score);
``error`` (no usable reply: the reason, with the URL, is in ``error``). A semaphore
bounds the requests in flight to ``concurrency``; waiting between retries holds no slot.

Credentials are only ever put in the request header, and removed from any text recorded.
A ``user:password@`` in the URL is taken out of it when the client is made and sent as HTTP
Basic authentication (in place of the Bearer key), so the URL that is logged (httpx logs each
request's at INFO, which reaches the run's log, the console and trackers), stored and shown in
error rows holds no password.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from llmexp.plugins.evaluate.judge.template import Verdict
from llmexp.sdk import REDACTED, redact_url_credentials, split_url_credentials

Messages = List[Dict[str, str]]
_MAX_BACKOFF_S = 60.0


@dataclass(frozen=True)
class Judgment:
    status: str  # "scored" | "unparsable" | "error"
    score: Optional[int] = None
    reason: str = ""
    reply: Optional[str] = None  # the judge's last reply text
    requests: int = 0  # HTTP requests sent for this item
    error: str = ""


@dataclass
class JudgeClient:
    url: str  # base URL, e.g. http://127.0.0.1:8000/v1 (a user:password in it moves to basic_auth)
    model: str
    api_key: Optional[str] = field(default=None, repr=False)
    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 1.0
    concurrency: int = 8
    temperature: float = 0.0
    max_tokens: int = 256
    basic_auth: Optional[Tuple[str, str]] = field(default=None, init=False, repr=False)  # (user, password)

    def __post_init__(self) -> None:
        self.url, self.basic_auth = split_url_credentials(self.url)

    @property
    def endpoint(self) -> str:
        return f"{self.url.rstrip('/')}/chat/completions"

    def judge_all(self, conversations: Sequence[Messages], parse: Callable[[str], Optional[Verdict]]) -> List[Judgment]:
        """One ``Judgment`` per conversation, in order (runs its own event loop)."""
        return asyncio.run(self._judge_all(conversations, parse))

    async def _judge_all(self, conversations, parse) -> List[Judgment]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        auth = httpx.BasicAuth(*self.basic_auth) if self.basic_auth else None
        limits = httpx.Limits(max_connections=self.concurrency)
        slots = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(headers=headers, auth=auth, timeout=self.timeout_s, limits=limits) as client:
            asked = (self._judge(client, slots, messages, parse) for messages in conversations)
            return list(await asyncio.gather(*asked))

    async def _judge(self, client, slots: asyncio.Semaphore, messages: Messages, parse) -> Judgment:
        import httpx

        body = {"model": self.model, "messages": messages, "temperature": self.temperature}
        body["max_tokens"] = self.max_tokens
        last_reply: Optional[str] = None
        problem = ""
        wait_s = 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(_MAX_BACKOFF_S, max(wait_s, self.backoff_s * 2 ** (attempt - 1))))
            wait_s = 0.0
            async with slots:
                try:
                    response = await client.post(self.endpoint, json=body)
                except httpx.TimeoutException:
                    problem = f"no reply from {self.endpoint} within timeout_s={self.timeout_s}"
                    continue
                except httpx.HTTPError as error:
                    problem = f"cannot reach {self.endpoint}: {type(error).__name__}: {self._clean(str(error))}"
                    continue
            if response.status_code == 429 or response.status_code >= 500:
                problem = f"{self.endpoint} answered HTTP {response.status_code}: {self._clean(response.text[:300])}"
                wait_s = _retry_after(response.headers.get("retry-after"))
                continue
            if response.status_code >= 400:
                return Judgment(
                    "error",
                    requests=attempt + 1,
                    error=f"{self.endpoint} answered HTTP {response.status_code} (not retried): "
                    f"{self._clean(response.text[:300])}",
                )
            text = _reply_text(response)
            if text is None:
                problem = "the response is not an OpenAI chat completion (no choices[0].message.content)"
                continue
            verdict = parse(text)
            if verdict is not None:
                return Judgment("scored", verdict.score, self._clean(verdict.reason), self._clean(text), attempt + 1)
            last_reply, problem = self._clean(text), "the reply holds no score the template can read"
        attempts = self.retries + 1
        if last_reply is not None:
            return Judgment("unparsable", reply=last_reply, requests=attempts, error=f"{problem} ({attempts} attempts)")
        return Judgment("error", requests=attempts, error=f"{problem} ({attempts} attempts)")

    def _clean(self, text: str) -> str:
        """``text`` with every credential blanked out, should a server echo one: the API key, the password and
        the Basic token made of it, and any URL's ``user:password@``."""
        secrets = [self.api_key]
        if self.basic_auth:
            user, password = self.basic_auth
            secrets += [password, base64.b64encode(f"{user}:{password}".encode()).decode()]
        for secret in filter(None, secrets):
            text = text.replace(secret, REDACTED)
        return redact_url_credentials(text)


def _reply_text(response) -> Optional[str]:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _retry_after(value: Optional[str]) -> float:
    try:
        return max(0.0, float(value)) if value is not None else 0.0
    except ValueError:  # an HTTP date: fall back on the backoff
        return 0.0
