"""The load driver: keep exactly ``concurrency`` requests in flight until the point's budget is spent.

Closed-loop, as GenAI-Perf's ``--concurrency`` mode: ``concurrency`` workers each send a
request, wait for its last token, and send the next, so the target always holds
``concurrency`` requests (less only while the last ones drain). The budget is a request
count, a duration, or both (whichever runs out first); once the duration has passed no new
request starts and those in flight finish and count. Requests take prompts from the pool in
turn.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Awaitable, Callable, Iterable, List, Optional

from llmexp.plugins.benchmark.clients import BenchRequest, Reply

Send = Callable[[BenchRequest], Awaitable[Reply]]


async def drive(send: Send, requests: Iterable[BenchRequest], concurrency: int, request_count: Optional[int] = None,
                duration_s: Optional[float] = None,
                on_reply: Callable[[Reply], None] = lambda reply: None) -> List[Reply]:
    """Send from ``requests`` (cycled) with ``concurrency`` in flight; the replies in completion order."""
    if request_count is None and duration_s is None:
        raise ValueError("drive needs a request_count, a duration_s or both")
    pool = itertools.cycle(list(requests))
    deadline = None if duration_s is None else time.perf_counter() + duration_s
    replies: List[Reply] = []
    issued = 0

    def may_start() -> bool:
        if request_count is not None and issued >= request_count:
            return False
        return deadline is None or time.perf_counter() < deadline

    async def worker() -> None:
        nonlocal issued
        while may_start():
            issued += 1  # one event loop, no await between the check and this: no two workers take one slot
            reply = await send(next(pool))
            replies.append(reply)
            on_reply(reply)

    workers = concurrency if request_count is None else min(concurrency, request_count)
    await asyncio.gather(*(worker() for _ in range(workers)))
    return replies
