"""The latency a BM25 retriever adds to each ``llmexp serve`` request, at concurrency 1, and what it does to answers.

Run from the repository root::

    python benchmarks/bench_serve_retrieval.py                          # the embedded world's 30 biographies
    python benchmarks/bench_serve_retrieval.py --documents docs/ --requests 200
    python benchmarks/bench_serve_retrieval.py --model <run>/reader data=knowledge   # a trained reader, the second world

``python -m llmexp.cli.serve`` in its own process (``--model``, else tiny_llama with random weights, as
bench_serve_load.py) with ``retriever=bm25`` (``retriever.documents`` when given, else the documents of the data
option, ``data=...`` among the trailing overrides: the embedded world's biographies by default), one client
sending non-streaming ``/v1/completions`` one after another: the data's free-answer questions ("Question: ...
\\nAnswer:", cycled to ``--requests``), each twice in a row, with retrieval and with ``"retrieval": false``, the
order alternating, greedy, ``--new-tokens`` at most, stopping at a newline or "Question:" as evaluation does.
Figures: p50 end-to-end latency of each and their difference (the search, the passages' longer prefill, the
sources in the body), the prompt and completion tokens of each, the share answered exactly (case and spacing
aside) with and without retrieval, and the p50 of the search alone (``Retriever.search`` of one question in this
process, the same index).
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
from llmexp.data.knowledge import evaluated_world
from llmexp.models.loading import save_model
from llmexp.retrieval import build_retriever

from bench_generation import tiny_served_model

MODEL = "tiny_llama"
WARM_UP = 4
ANSWER_STOP = ["\n", "Question:"]  # where evaluation's free answers stop


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


def timed(http: httpx.Client, model: str, question: str, new_tokens: int, retrieval: bool):
    """(seconds, the response) of one completion."""
    body = {"model": model, "prompt": question, "max_tokens": new_tokens, "temperature": 0, "stop": ANSWER_STOP}
    if not retrieval:
        body["retrieval"] = False
    start = time.perf_counter()
    response = http.post("/v1/completions", json=body)
    seconds = time.perf_counter() - start
    response.raise_for_status()
    return seconds, response.json()


def exact(text: str, answer: str) -> bool:
    return " ".join(text.split()).lower() == " ".join(answer.split()).lower()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=Path, default=None, help="default: the embedded world's biographies")
    parser.add_argument("--requests", type=int, default=120, help="questions, each sent with and without retrieval")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--model", type=Path, default=None, help="a model or stage directory to serve (default: "
                        "tiny_llama with random weights)")
    parser.add_argument("overrides", nargs="*", help="more retriever=... / data=... overrides, e.g. data=knowledge")
    args = parser.parse_args(argv)
    overrides = ["retriever=bm25", *([f"retriever.documents={args.documents.resolve()}"] if args.documents else []),
                 *args.overrides]
    facts = evaluated_world(compose_config(overrides).data).free_answer_test()
    items = [facts[i % len(facts)] for i in range(args.requests)]
    runs = {True: [], False: []}  # retrieval -> (seconds, response, answer) of each request
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            served = tiny_served_model()
            model_dir = Path(tmp) / MODEL
            save_model(served.model, served.tokenizer, model_dir)
        process, url = start_server(model_dir, overrides, Path(tmp) / "index")
        try:
            with httpx.Client(base_url=url, timeout=600) as http:
                model = http.get("/v1/models").json()["data"][0]["id"]
                for item in items[:WARM_UP]:
                    timed(http, model, item.prompt, args.new_tokens, True)
                    timed(http, model, item.prompt, args.new_tokens, False)
                for i, item in enumerate(items):
                    for retrieval in ((True, False) if i % 2 == 0 else (False, True)):
                        seconds, response = timed(http, model, item.prompt, args.new_tokens, retrieval)
                        if retrieval != bool(response.get("sources")):
                            raise SystemExit(f"sources {'missing' if retrieval else 'returned'} for {item.prompt!r}")
                        runs[retrieval].append((seconds, response, item.answer))
        finally:
            process.terminate()
            process.wait(timeout=30)
        retriever = build_retriever(compose_config(overrides), Path(tmp) / "index")
        searches = []
        for item in items:
            start = time.perf_counter()
            retriever.search([item.prompt])
            searches.append(time.perf_counter() - start)

    def p50(retrieval: bool) -> float:
        return statistics.median(seconds for seconds, _, _ in runs[retrieval])

    def mean_usage(retrieval: bool, key: str) -> float:
        return statistics.mean(response["usage"][key] for _, response, _ in runs[retrieval])

    def answered(retrieval: bool) -> float:
        return statistics.mean(exact(response["choices"][0]["text"], answer) for _, response, answer in runs[retrieval])

    print(f"{model_dir.name}, {' '.join(overrides)}: {len(retriever.passages)} passages, top_k {retriever.top_k}, "
          f"{args.requests} questions x 2, at most {args.new_tokens} new tokens each, concurrency 1")
    print(f"p50 latency: with retrieval {p50(True) * 1e3:.1f} ms, without {p50(False) * 1e3:.1f} ms: "
          f"{(p50(True) - p50(False)) * 1e3:+.1f} ms per request")
    print(f"tokens (mean): prompt {mean_usage(True, 'prompt_tokens'):.1f} with, {mean_usage(False, 'prompt_tokens'):.1f}"
          f" without; completion {mean_usage(True, 'completion_tokens'):.1f} with, "
          f"{mean_usage(False, 'completion_tokens'):.1f} without")
    print(f"answered exactly: with retrieval {answered(True):.3f}, without {answered(False):.3f}")
    print(f"the search alone, in process: p50 {statistics.median(searches) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
