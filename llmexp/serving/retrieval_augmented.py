"""Answers grounded in documents: each request's question is searched for, the passages found go in front of its
prompt (``with_context``, the format evaluation's rag condition uses), and the response names them as ``sources``.

The question is the prompt (completions) or the last user message (chat). A request may set its own number of
passages, ``"retrieval": {"top_k": 3}``, or turn retrieval off, ``"retrieval": false``. Searching is CPU work, so it
runs on a thread of its own: the event loop keeps serving other clients meanwhile, and one search at a time keeps
the retriever (its index, its encoder) from being used from two threads at once.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, TypeVar

from llmexp.retrieval.prompting import with_context
from llmexp.serving.api_errors import ApiError
from llmexp.serving.limits import shown

if TYPE_CHECKING:
    from llmexp.retrieval import Hit, Retriever

FIELD = "retrieval"  # the request body's extra field
MAX_TOP_K = 100  # passages one request may ask for; the model's context refuses far fewer long ones first
T = TypeVar("T")


@dataclass(frozen=True)
class Augmented:
    """A request's prompt as the model gets it, and the passages it was given (None: nothing was retrieved)."""

    prompt: Any
    sources: Optional[List[Dict[str, Any]]] = None

    def fields(self) -> Dict[str, Any]:
        """The response's extra top-level fields."""
        return {} if self.sources is None else {"sources": self.sources}

    def submitted(self, submit: Callable[[], T]) -> T:
        """``submit()``, where a prompt the passages made too long for the model's context says so."""
        try:
            return submit()
        except ApiError as error:
            if not self.sources or error.status != 400 or error.param not in ("prompt", "max_tokens"):
                raise
            raise ApiError(400, f"{error.message} The prompt holds {len(self.sources)} retrieved passages: ask for "
                                f"fewer with \"{FIELD}\": {{\"top_k\": N}}, or set \"{FIELD}\": false.",
                           param=error.param) from None


class RetrievalAugmentation:
    """A retriever attached to the server: searches off the event loop, one query at a time."""

    def __init__(self, retriever: Retriever, top_k: int) -> None:
        self.retriever = retriever
        self.top_k = top_k
        self._searching = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval")

    async def search(self, query: str, top_k: int) -> List[Hit]:
        loop = asyncio.get_running_loop()
        [hits] = await loop.run_in_executor(self._searching, self.retriever.search, [query], top_k)
        return hits

    def close(self) -> None:
        self._searching.shutdown(wait=False, cancel_futures=True)


async def augment_completion(retrieval: Optional[RetrievalAugmentation], extra: Dict[str, Any],
                             prompt: Any) -> Augmented:
    """A completion's prompt (text, or token ids) with the passages its text retrieves."""
    top_k = requested_top_k(retrieval, extra)
    if top_k is None:
        return Augmented(prompt)
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt is given as token ids, and retrieval searches with the question's text: send the "
                            f"prompt as text, or set \"{FIELD}\": false.", param="prompt")
    hits = await retrieval.search(prompt, top_k)
    return Augmented(with_context(prompt, hits), sources(hits))


async def augment_chat(retrieval: Optional[RetrievalAugmentation], extra: Dict[str, Any],
                       messages: Sequence[Dict[str, str]]) -> Augmented:
    """Chat messages whose last user message carries the passages it retrieves."""
    top_k = requested_top_k(retrieval, extra)
    if top_k is None:
        return Augmented(list(messages))
    last = max((i for i, message in enumerate(messages) if message["role"] == "user"), default=None)
    if last is None:
        raise ApiError(400, "messages hold no user message, and retrieval searches with the last one: add a "
                            f"{{\"role\": \"user\", \"content\": ...}} message, or set \"{FIELD}\": false.",
                       param="messages")
    hits = await retrieval.search(messages[last]["content"], top_k)
    augmented = [dict(message) for message in messages]
    augmented[last]["content"] = with_context(messages[last]["content"], hits)
    return Augmented(augmented, sources(hits))


def requested_top_k(retrieval: Optional[RetrievalAugmentation], extra: Dict[str, Any]) -> Optional[int]:
    """The passages this request gets: the server's top_k, the body's ``retrieval.top_k``, or None (no retrieval)."""
    if FIELD not in extra:
        return None if retrieval is None else retrieval.top_k
    value = extra[FIELD]
    if value is False:
        return None
    if retrieval is None:
        raise ApiError(400, f"{FIELD}={shown(value)}: this server has no retriever attached; leave {FIELD} out (or "
                            "start the server with one, e.g. `llmexp serve MODEL_DIR retriever=bm25 "
                            "retriever.documents=DIR`).", param=FIELD)
    if value is True or value == {}:
        return retrieval.top_k
    if isinstance(value, dict) and set(value) == {"top_k"}:
        top_k = value["top_k"]
        if type(top_k) is int and 1 <= top_k <= MAX_TOP_K:
            return top_k
        raise ApiError(400, f"{FIELD}.top_k={shown(top_k)}: give a whole number from 1 to {MAX_TOP_K}, the passages "
                            "put in front of the question.", param=f"{FIELD}.top_k")
    raise ApiError(400, f"{FIELD}={shown(value)}: give {{\"top_k\": N}} (N passages, 1 to {MAX_TOP_K}), true (the "
                        f"server's {retrieval.top_k}) or false (no retrieval).", param=FIELD)


def sources(hits: Sequence[Hit]) -> List[Dict[str, Any]]:
    """The passages a prompt was given, best first, as the response lists them."""
    return [{"id": hit.passage.id, "document": hit.passage.document, "score": float(hit.score),
             "text": hit.passage.text} for hit in hits]
