"""The latency rails add to a request of ``llmexp serve``: the same model and requests without rails, with the
shipped pattern rails, and with the shipped rails whole (their self checks ask the served model), side by side.

Run from the repository root::

    python benchmarks/bench_rails.py                         # concurrency 1 and 16, 48 requests per round, 3 rounds
    python benchmarks/bench_rails.py --concurrency 1,4,16 --requests 32 --rounds 2

What is compared
----------------
Three ``python -m llmexp.cli.serve`` processes on loopback serve the same model (tiny_llama from
llmexp/conf/model/tiny_llama.yaml, 8 layers, random weights, saved once to a temporary directory;
``--max-batch-size 16``): *none* (no rails), *patterns* (``--rails`` a copy of the shipped config without its
two self checks: jailbreak patterns, denylist, personal data, topic on the input; masking and denylist on the
output) and *default* (``--rails default``: the same plus ``self check input`` and ``self check output``, each a
greedy generation of up to 3 tokens by the served model, batched with the requests like any other).

Each round, at each concurrency level C, each server in turn (the order rotating by round, so a busy machine
slows all alike) gets ``--requests`` non-streaming chat requests from C asyncio clients (httpx), sent back to
back: the embedded world's questions (on topic, so every rail runs and every request is answered), 16 tokens
each, greedy, ``ignore_eos`` so each answer costs the same everywhere. Latency is from sending a request to
its whole response. Figures per server and level: p50 and p95 latency over all rounds, requests/s, and the
p50 added against *none*; for the guarded servers, the mean time the rails themselves reported
(``rails.*.seconds``, summed over the flows). Exit 1 if a request fails, or a rail blocks one of these prompts.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `llmexp serve` sets it, before torch loads

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import httpx
import yaml

from llmexp.data.embedded import build_world
from llmexp.models.loading import save_model
from llmexp.rails import DEFAULT_CONFIG

from bench_generation import tiny_served_model
from bench_serve_load import start_server
from machine_load import describe, sample

NEW_TOKENS = 16


def percentile(values: List[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def pattern_rails(directory: Path) -> Path:
    """The shipped rails config without its self checks."""
    shutil.copytree(DEFAULT_CONFIG, directory)
    config = yaml.safe_load((directory / "config.yml").read_text())
    for side in ("input", "output"):
        flows = config["rails"][side]["flows"]
        config["rails"][side]["flows"] = [flow for flow in flows if not flow.startswith("self check")]
    (directory / "config.yml").write_text(yaml.safe_dump(config))
    return directory


async def load(url: str, questions: List[str], concurrency: int) -> Tuple[float, List[float], List[float]]:
    """(wall seconds, latency per request, rails' own seconds per request) of ``questions`` from ``concurrency``
    clients; a failed or blocked request stops the benchmark."""
    pending = list(questions)
    latencies: List[float] = []
    in_rails: List[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while pending:
            question = pending.pop()
            start = time.perf_counter()
            response = await http.post("/v1/chat/completions", json={
                "model": "tiny_llama", "messages": [{"role": "user", "content": question}],
                "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True})
            latencies.append(time.perf_counter() - start)
            body = response.json()
            if response.status_code != 200 or body["usage"]["completion_tokens"] != NEW_TOKENS:
                raise SystemExit(f"{question!r} was not answered in full: {response.status_code} {response.text}")
            checked = body.get("rails") or {}
            in_rails.append(sum(sum(side["seconds"].values()) for side in checked.values() if side))

    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return time.perf_counter() - start, latencies, in_rails


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    levels = [int(level) for level in args.concurrency.split(",")]
    world = build_world(0)
    questions = [item.prompt.removeprefix("Question: ").removesuffix("\nAnswer:")
                 for item in world.free_answer_test()][: args.requests]
    questions = (questions * (args.requests // len(questions) + 1))[: args.requests]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        served = tiny_served_model()
        save_model(served.model, served.tokenizer, root / "tiny_llama")
        rails = {"none": None, "patterns": str(pattern_rails(root / "patterns")), "default": "default"}
        servers = {name: start_server(root / "tiny_llama", 16, 256, *(["--rails", config] if config else []))
                   for name, config in rails.items()}
        try:
            for url in (url for _, url in servers.values()):  # warm up: the first requests pay one-time costs
                asyncio.run(load(url, questions[:16], 16))
            latencies: Dict[Tuple[str, int], List[float]] = {}
            in_rails: Dict[Tuple[str, int], List[float]] = {}
            walls: Dict[Tuple[str, int], float] = {}
            others = sample()  # cores other processes kept busy just before: the servers idle
            for round_ in range(args.rounds):
                order = list(servers)[round_ % 3:] + list(servers)[: round_ % 3]
                for level in levels:
                    for name in order:
                        wall, spent, checked = asyncio.run(load(servers[name][1], questions, level))
                        latencies.setdefault((name, level), []).extend(spent)
                        in_rails.setdefault((name, level), []).extend(checked)
                        walls[(name, level)] = walls.get((name, level), 0.0) + wall
            print(f"{args.requests} chat requests x {NEW_TOKENS} tokens per server and level, {args.rounds} rounds; "
                  f"others' cores before: {describe(others)}")
            print(f"{'concurrency':>11} {'rails':>9} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>7} {'p50 added ms':>13} "
                  f"{'in rails ms':>12}")
            for level in levels:
                base = percentile(latencies[("none", level)], 50)
                for name in servers:
                    values = latencies[(name, level)]
                    p50 = percentile(values, 50)
                    added = "" if name == "none" else f"{(p50 - base) * 1000:+.1f}"
                    own = "" if name == "none" else f"{statistics.mean(in_rails[(name, level)]) * 1000:.2f}"
                    print(f"{level:>11} {name:>9} {p50 * 1000:8.1f} {percentile(values, 95) * 1000:8.1f} "
                          f"{len(values) / walls[(name, level)]:7.1f} {added:>13} {own:>12}")
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
