"""``llmexp serve`` under load on loopback: output tokens/s and p99 time to first token, against the engine alone
and against the same requests sent one at a time to plain ``model.generate``.

Run from the repository root::

    python benchmarks/bench_serve_load.py                              # concurrency 1, 4, 16; 32 requests x 64 tokens
    python benchmarks/bench_serve_load.py --concurrency 1,8,32 --requests 64

What is compared, per concurrency level C
-----------------------------------------
*server*: ``python -m llmexp.cli.serve`` in its own process (tiny_llama from
llmexp/conf/model/tiny_llama.yaml, 8 layers, random weights, saved to a temporary directory;
``--max-batch-size 16``), driven by C asyncio clients (httpx) that each send streaming
``/v1/completions`` requests back to back until ``--requests`` are done. Each asks for
``--new-tokens`` tokens, greedy, with ``ignore_eos`` so every request yields exactly that many.
TTFT is from sending the request to receiving its first token's event.

*engine*: the same requests through ``llmexp.serving.engine.Engine`` in this process, C
threads each submitting and reading one stream at a time: what the server costs is then
HTTP, JSON, SSE and the event loop. TTFT is from ``submit`` to the first chunk.

*one at a time*: the same requests through plain ``model.generate`` in this process, one after
another, batch 1, greedy, ``--new-tokens`` each (``min_new_tokens`` too): what serving them
costs without a server. Timed once before the levels and once after; the figure is the
mean throughput of the two.

All use the same number of torch threads (the default), server first then engine at each
level; the client shares the machine with the server, as a load generator on the same host
does. Figures: output tokens/s of each, server / engine, server / one at a time (the headline
at concurrency 16: target >= 4), and p99 TTFT. "others' cores" is the CPU that processes other
than this one and the server took meanwhile. Exit 1 if a request fails or returns another
number of tokens.

*abandoned*: then ``--abandoned`` times, one non-streaming request for the whole context is sent
on a raw socket, and the socket closed once ``/metrics`` shows it running; the figure is the time
from the close until ``/metrics`` shows no running row (the slot given back), median and max.
``OMP_WAIT_POLICY=PASSIVE`` (unless set) for both sides, as ``llmexp serve`` runs: see
``llmexp.machine.cpu_threads.prefer_passive_waiting``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `llmexp serve` sets it, before torch loads (both sides)

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple

import httpx
import torch

from llmexp.models.loading import save_model
from llmexp.serving.engine import Engine
from llmexp.serving.generation import GenerationRequest

from bench_generation import make_prompts, tiny_served_model
from machine_load import OtherLoad, describe

MODEL = "tiny_llama"
WARM_UP = 4  # requests sent at once before measuring
TARGET_VS_ONE_AT_A_TIME = 4.0


def p99(values: List[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]


async def load_server(url: str, prompts: List[List[int]], concurrency: int, new_tokens: int):
    """(wall seconds, tokens per request, TTFTs) of ``prompts`` sent by ``concurrency`` streaming clients."""
    pending = list(enumerate(prompts))
    tokens, ttfts = [0] * len(prompts), []

    async def client(http: httpx.AsyncClient) -> None:
        while pending:
            index, prompt = pending.pop()
            body = {"model": MODEL, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            sent = time.perf_counter()
            async with http.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if event["choices"] and tokens[index] == 0:
                        ttfts.append(time.perf_counter() - sent)
                        tokens[index] = -1
                    if event.get("usage"):
                        tokens[index] = event["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return time.perf_counter() - start, tokens, ttfts


def load_engine(engine: Engine, prompts: List[List[int]], concurrency: int, new_tokens: int):
    """The same as ``load_server``, through the engine in this process, from ``concurrency`` threads."""
    pending = list(enumerate(prompts))
    lock = threading.Lock()
    tokens, ttfts = [0] * len(prompts), []

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                index, prompt = pending.pop()
            sent = time.perf_counter()
            stream = engine.submit(GenerationRequest(MODEL, prompt_ids=prompt, max_tokens=new_tokens, temperature=0.0,
                                                     ignore_eos=True))
            for chunk in stream:
                if tokens[index] == 0:
                    ttfts.append(time.perf_counter() - sent)
                tokens[index] += len(chunk.token_ids)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, tokens, ttfts


def one_at_a_time(served, prompts: List[List[int]], new_tokens: int) -> Tuple[float, List[int]]:
    """(wall seconds, tokens per request) of ``prompts`` run one after another through ``model.generate``, batch 1."""
    tokens = []
    start = time.perf_counter()
    for prompt in prompts:
        with torch.inference_mode():
            out = served.model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                        dtype=torch.long), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        do_sample=False, pad_token_id=served.tokenizer.pad_token_id)
        tokens.append(out.shape[1] - len(prompt))
    return time.perf_counter() - start, tokens


def cpu_seconds(pid: int) -> float:
    """CPU seconds process ``pid`` has used so far (user + system, from ``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def running_rows(http: httpx.Client) -> float:
    text = http.get("/metrics").text
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith("llmexp_serve_running "))


def slot_release_seconds(url: str, prompt: List[int], times: int) -> List[float]:
    """Seconds from closing a non-streaming request's connection mid-generation to its slot being free."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 200, "temperature": 0,
                          "ignore_eos": True}).encode()
    seconds = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for _ in range(times):
            connection = socket.create_connection((host, int(port)))
            connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(payload), payload))
            while running_rows(http) == 0:
                time.sleep(0.001)
            closed = time.perf_counter()
            connection.close()
            while running_rows(http) > 0:
                time.sleep(0.001)
            seconds.append(time.perf_counter() - closed)
    return seconds


def start_server(model_dir: Path, batch: int, queue: int, *options: str) -> Tuple[subprocess.Popen, str]:
    """``llmexp serve`` on a free port, with ``options`` added; (the process, its URL) once it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "llmexp.cli.serve", str(model_dir), "--port", "0", "--max-batch-size", str(batch),
         "--max-queue", str(queue), *options],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = process.stdout.readline()
    if not line.startswith("llmexp serve: http"):
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return process, line.split()[2].removesuffix("/v1")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--abandoned", type=int, default=20)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    served = tiny_served_model()
    prompts = make_prompts(served.tokenizer, args.requests)
    queue = max(*levels, WARM_UP)
    engine = Engine(served, max_batch_size=args.batch, max_queue=queue)
    ok = True
    with tempfile.TemporaryDirectory(prefix="llmexp-bench-serve-") as tmp:
        save_model(served.model, served.tokenizer, Path(tmp) / MODEL)
        process, url = start_server(Path(tmp) / MODEL, args.batch, queue)
        try:
            asyncio.run(load_server(url, prompts[:WARM_UP], WARM_UP, 4))
            load_engine(engine, prompts[:WARM_UP], WARM_UP, 4)
            one_at_a_time(served, prompts[:WARM_UP], 4)
            total = args.requests * args.new_tokens
            alone_s, alone_tokens = one_at_a_time(served, prompts, args.new_tokens)
            print(f"{args.requests} streaming requests x {args.new_tokens} tokens, greedy, EOS ignored; server "
                  f"--max-batch-size {args.batch}; torch threads {torch.get_num_threads()}")
            print(f"{'C':>3s} {'server tok/s':>13s} {'engine tok/s':>13s} {'server/engine':>13s} "
                  f"{'server/one-at-a-time':>20s} {'server p99 TTFT':>16s} {'engine p99 TTFT':>16s}  others' cores")
            rows = []
            for concurrency in levels:
                meter, server_cpu = OtherLoad().start(), cpu_seconds(process.pid)
                server_s, server_tokens, server_ttft = asyncio.run(
                    load_server(url, prompts, concurrency, args.new_tokens))
                engine_s, engine_tokens, engine_ttft = load_engine(engine, prompts, concurrency, args.new_tokens)
                others = meter.cores()
                if others is not None:
                    others = max(0.0, others - (cpu_seconds(process.pid) - server_cpu) / (server_s + engine_s))
                ok &= all(t == args.new_tokens for t in server_tokens + engine_tokens)
                rows.append((concurrency, server_s, engine_s, server_ttft, engine_ttft, describe(others)))
            again_s, again_tokens = one_at_a_time(served, prompts, args.new_tokens)
            ok &= all(t == args.new_tokens for t in alone_tokens + again_tokens)
            alone_rate = (total / alone_s + total / again_s) / 2
            for concurrency, server_s, engine_s, server_ttft, engine_ttft, others in rows:
                print(f"{concurrency:3d} {total / server_s:13.0f} {total / engine_s:13.0f} {engine_s / server_s:13.3f} "
                      f"{total / server_s / alone_rate:20.2f} {1000 * p99(server_ttft):13.1f} ms "
                      f"{1000 * p99(engine_ttft):13.1f} ms  {others}")
            print(f"one at a time through model.generate: {total / alone_s:.0f} and {total / again_s:.0f} tok/s "
                  f"(before and after the levels)")
            headline = [total / server_s / alone_rate for concurrency, server_s, *_ in rows if concurrency == 16]
            if headline:
                print(f"server at concurrency 16 / one at a time: {headline[0]:.2f}x (target >= {TARGET_VS_ONE_AT_A_TIME}x)")
            if args.abandoned:
                released = slot_release_seconds(url, prompts[0][:32], args.abandoned)
                print(f"\nabandoned non-streaming requests ({args.abandoned}): slot free "
                      f"{1000 * statistics.median(released):.1f} ms after the client closed (median), "
                      f"{1000 * max(released):.1f} ms at most")
        finally:
            process.terminate()
            process.wait(timeout=30)
            engine.close()
    print(f"\nevery request returned {args.new_tokens} tokens: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
