"""``llmexp serve`` under a mixed load: good requests, every class of bad one (tests/bad_requests.py), requests
without a key or with a wrong one, and clients that leave before their answer, all at concurrency 64
against the real command in its own process (API keys on). Every good request gets what it gets alone,
every bad one its 4xx, every abandoned one frees its slot, and the server's resident memory comes back
to where it was."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.bad_requests import BadRequest, bad_requests
from tests.conftest import REPO

MODEL = "tiny"  # tests/conftest.py's tiny_checkpoint directory
CONTEXT = 256
CONCURRENCY = 64
ROUNDS = 4
# Above the resident memory after the good requests ran alone: what concurrency itself costs (64 connections,
# batches of 16; measured +5 to +8 MiB on 2 cores), not a growth per round
RSS_TOLERANCE_MIB = 24
KEY = "load-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


def good_requests() -> List[Dict[str, Any]]:
    """Requests that must succeed, each with a deterministic answer: greedy (a tiny temperature is greedy too) or
    seeded sampling, completions and chat, plain and streamed."""
    words = ["Alice", "lives", "in", "the", "town", "of", "pilot", "owns", "a", "pony", "what", "is", "her", "pet"]
    rng = random.Random(0)
    requests = []
    for i in range(24):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 30)))
        sampling = [{"temperature": 0}, {"temperature": 1e-300}, {"temperature": 0.8, "seed": i, "top_p": 0.9},
                    {"temperature": 5e-324, "top_p": 1e-300}][i % 4]
        body: Dict[str, Any] = {"model": MODEL, "max_tokens": 2 + i % 7, **sampling, "stream": i % 3 == 0}
        if i % 5 == 4:
            body["messages"] = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        requests.append(body)
    return requests


async def answer(client: httpx.AsyncClient, body: Dict[str, Any]) -> str:
    """The text a good request gets (joined from the events when streamed); fails on any other status."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    if not body["stream"]:
        response = await client.post(path, json=body, headers=AUTH)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return choice["message"]["content"] if "messages" in body else choice["text"]
    pieces = []
    async with client.stream("POST", path, json=body, headers=AUTH) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: "):])
                assert "error" not in event, event
                choice = event["choices"][0]
                pieces.append(choice["delta"].get("content", "") if "messages" in body else choice["text"])
    return "".join(pieces)


async def refused(client: httpx.AsyncClient, bad: BadRequest, headers: Dict[str, str]) -> None:
    response = await client.request(bad.method, bad.path, content=bad.body,
                                    headers={"content-type": bad.content_type, **headers})
    assert response.status_code == bad.status, (bad.label, response.status_code, response.text[:300])
    assert bad.fragment in response.json()["error"]["message"], (bad.label, response.text[:300])


async def abandon(url: str, body: Dict[str, Any]) -> None:
    """Send a long request and close the connection before the answer, as a client that gave up."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                 % (host.encode(), KEY.encode(), len(payload), payload))
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()
    await writer.wait_closed()


def unauthorized() -> List[BadRequest]:
    body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 2}).encode()
    return [BadRequest("no API key", body, 401, "needs an API key"),
            BadRequest("wrong API key", body, 401, "not one of this server's keys"),
            BadRequest("metrics without a key", b"", 401, "needs an API key", path="/metrics", method="GET")]


async def mixed_round(url: str, goods: List[Dict[str, Any]], expected: List[str], seed: int) -> int:
    """Every good request twice, every bad one, the unauthorized ones and 8 abandoned ones, shuffled, through
    CONCURRENCY workers; returns how many were abandoned."""
    abandoned = {"model": MODEL, "prompt": "hello", "max_tokens": CONTEXT - 8, "temperature": 0, "ignore_eos": True}
    jobs = [("good", i) for i in range(len(goods))] * 2
    jobs += [("bad", bad) for bad in bad_requests(MODEL, CONTEXT)] + [("unauthorized", bad) for bad in unauthorized()]
    jobs += [("abandon", None)] * 8
    random.Random(seed).shuffle(jobs)
    pending = list(jobs)

    async def worker(client: httpx.AsyncClient) -> None:
        while pending:
            kind, item = pending.pop()
            if kind == "good":
                assert await answer(client, goods[item]) == expected[item], goods[item]
            elif kind == "bad":
                await refused(client, item, AUTH)
            elif kind == "unauthorized":
                await refused(client, item, {"Authorization": "Bearer not-the-key-0123456789"}
                              if item.label == "wrong API key" else {})
            else:
                await abandon(url, abandoned)

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
    return 8


def metrics(url: str) -> Dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=30).text
    totals: Dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f"|{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model")
            totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def resident_mib(pid: int) -> float:
    """The process's resident set size (Linux /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


def settled(url: str, timeout: float = 60) -> Dict[str, float]:
    """The metrics once no request runs or waits."""
    deadline = time.monotonic() + timeout
    while True:
        now = metrics(url)
        if now.get("llmexp_serve_running", 0) == 0 and now.get("llmexp_serve_queue_depth", 0) == 0:
            return now
        assert time.monotonic() < deadline, now
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the server's memory from Linux's /proc")
def test_a_mixed_load_at_concurrency_64_fails_no_good_request_and_gives_the_memory_back(tiny_checkpoint):
    environment = {name: value for name, value in os.environ.items() if name != "VLLM_API_KEY"}
    process = subprocess.Popen(
        [sys.executable, "-m", "llmexp.cli.serve", str(tiny_checkpoint), "--port", "0", "--max-batch-size", "16",
         "--max-queue", str(CONCURRENCY)],
        cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**environment, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LLMEXP_API_KEY": KEY})
    try:
        line = process.stdout.readline()
        assert line.startswith("llmexp serve: http://127.0.0.1:"), line + process.stderr.read()
        url = line.split()[2].removesuffix("/v1")
        goods = good_requests()

        async def alone() -> List[str]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                return [await answer(client, body) for body in goods]

        expected = asyncio.run(alone())
        assert len(set(expected)) > len(goods) // 2  # the answers differ: a real check of who got what
        baseline = resident_mib(process.pid)
        figures = []
        for round_number in range(ROUNDS):
            before = settled(url)
            start = time.perf_counter()
            left = asyncio.run(mixed_round(url, goods, expected, seed=round_number))
            seconds = time.perf_counter() - start
            after = settled(url)
            assert after["llmexp_serve_requests_total|status=499"] - before.get(
                "llmexp_serve_requests_total|status=499", 0) == left
            assert after.get("llmexp_serve_generations_total|finish_reason=error", 0) == 0
            figures.append((seconds, resident_mib(process.pid)))
        print(f"\nRSS {baseline:.1f} MiB alone; rounds (s, RSS MiB): {[(round(s, 1), round(m, 1)) for s, m in figures]}")
        assert figures[-1][1] - baseline <= RSS_TOLERANCE_MIB, (baseline, figures)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        finally:
            process.kill()
            process.communicate()
