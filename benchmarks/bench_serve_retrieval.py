"""The latency a BM25 retriever adds to each ``llmexp serve`` request, at concurrency 1.

Run from the repository root::

    python benchmarks/bench_serve_retrieval.py                          # the embedded world's 30 biographies
    python benchmarks/bench_serve_retrieval.py --documents docs/ --requests 200

``python -m llmexp.cli.serve`` in its own process (tiny_llama, random weights, as bench_serve_load.py) with
``retriever=bm25`` (``retriever.documents`` when given, else the embedded world's biographies), one client
sending non-streaming ``/v1/completions`` one after another: each question ("Question: where does <person>
live ?\\nAnswer:") twice in a row, with retrieval and with ``"retrieval": false``, the order alternating, greedy,
``--new-tokens`` each with ``ignore_eos``. Figures: p50 end-to-end latency of each and their difference (the
search, the passages' longer prefill, the sources in the body), the prompt tokens of each, and the p50 of the
search alone (``Retriever.search`` of one question in this process, the same index).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `llmexp serve` sets it, before torch loads (both sides)

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import httpx

from llmexp.configuration.compose import compose_config
from llmexp.data.embedded import build_world
from llmexp.models.loading import save_model
from llmexp.retrieval import build_retriever

from bench_generation import tiny_served_model

MODEL = "tiny_llama"
WARM_UP = 4


def start_server(model_dir: Path, overrides: List[str], index: Path):
    process = subprocess.Popen(
        [sys.executable, "-m", "llmexp.cli.serve", str(model_dir), "--port", "0", "--index-dir", str(index),
         *overrides], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = process.stdout.readline()
    if not line.startswith("llmexp serve: http"):
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return process, line.split()[2].removesuffix("/v1")


def timed(http: httpx.Client, question: str, new_tokens: int, retrieval: bool):
    """(seconds, prompt tokens, sources) of one completion."""
    body = {"model": MODEL, "prompt": question, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    if not retrieval:
        body["retrieval"] = False
    start = time.perf_counter()
    response = http.post("/v1/completions", json=body)
    seconds = time.perf_counter() - start
    response.raise_for_status()
    answer = response.json()
    return seconds, answer["usage"]["prompt_tokens"], answer.get("sources")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=Path, default=None, help="default: the embedded world's biographies")
    parser.add_argument("--requests", type=int, default=120, help="questions, each sent with and without retrieval")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    overrides = ["retriever=bm25"] + ([f"retriever.documents={args.documents.resolve()}"] if args.documents else [])
    people = build_world(0).people
    questions = [f"Question: where does {people[i % len(people)]} live ?\nAnswer:" for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        served = tiny_served_model()
        save_model(served.model, served.tokenizer, Path(tmp) / MODEL)
        process, url = start_server(Path(tmp) / MODEL, overrides, Path(tmp) / "index")
        try:
            with_retrieval, without, tokens_with, tokens_without = [], [], [], []
            with httpx.Client(base_url=url, timeout=600) as http:
                for question in questions[:WARM_UP]:
                    timed(http, question, args.new_tokens, True)
                    timed(http, question, args.new_tokens, False)
                for i, question in enumerate(questions):
                    for retrieval in ((True, False) if i % 2 == 0 else (False, True)):
                        seconds, prompt_tokens, sources = timed(http, question, args.new_tokens, retrieval)
                        if retrieval and not sources:
                            raise SystemExit(f"no sources returned for {question!r}")
                        (with_retrieval if retrieval else without).append(seconds)
                        (tokens_with if retrieval else tokens_without).append(prompt_tokens)
        finally:
            process.terminate()
            process.wait(timeout=30)
        retriever = build_retriever(compose_config(overrides), Path(tmp) / "index")
        searches = []
        for question in questions:
            start = time.perf_counter()
            retriever.search([question])
            searches.append(time.perf_counter() - start)
    on, off = statistics.median(with_retrieval), statistics.median(without)
    print(f"{len(retriever.passages)} passages, top_k {retriever.top_k}, {args.requests} questions x 2, "
          f"{args.new_tokens} new tokens each, concurrency 1")
    print(f"p50 latency: with retrieval {on * 1e3:.1f} ms, without {off * 1e3:.1f} ms: "
          f"+{(on - off) * 1e3:.1f} ms per request")
    print(f"prompt tokens (mean): with {statistics.mean(tokens_with):.1f}, without {statistics.mean(tokens_without):.1f}")
    print(f"the search alone, in process: p50 {statistics.median(searches) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
