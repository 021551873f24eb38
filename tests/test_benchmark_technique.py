"""``llmexp technique=benchmark`` end to end: in process and against real loopback servers (``llmexp serve``,
an OpenAI-style echo server that counts requests in flight, AIPerf when installed), the coherence gate on a
broken model, the API key kept out of every file, and the planner's refusals."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi import Request  # at module level: the echo server's handlers are annotated with it (PEP 563 strings)

from llmexp.data.jsonl import read_jsonl
from tests.conftest import REPO, read_results, run_llmexp

AIPERF = os.environ.get("LLMEXP_TEST_AIPERF_BIN") or shutil.which("aiperf")


@pytest.fixture(scope="module")
def varied_checkpoint(tmp_path_factory) -> Path:
    """The tiny Llama with weights drawn wide (std 0.2) so greedy outputs vary: it passes the coherence gate.

    (At the usual init, std 0.02, the random model repeats one token: ``tiny_checkpoint`` is the broken model.)
    """
    from llmexp.models.loading import save_model
    from tests.test_serving_engine import build_varied_model

    model, tokenizer = build_varied_model()
    path = tmp_path_factory.mktemp("bench") / "varied"
    save_model(model, tokenizer, path)
    return path


def benchmark_run(tmp_path: Path, *overrides: str, env: dict | None = None):
    run_dir = tmp_path / "run"
    result = run_llmexp("technique=benchmark", f"hydra.run.dir={run_dir}", *overrides,
                        cwd=tmp_path, env={"OMP_NUM_THREADS": "1", **(env or {})})
    return result, run_dir


def rows(run_dir: Path, name: str):
    return list(read_jsonl(run_dir / "benchmark" / name))


# ------------------------------------------------------------------ in process

@pytest.mark.slow
def test_inprocess_sweep_writes_every_point_and_positive_metrics(tmp_path, varied_checkpoint):
    result, run_dir = benchmark_run(
        tmp_path, f"model.path={varied_checkpoint}", "technique.concurrency=[1,2]", "technique.input_tokens=[16]",
        "technique.output_tokens=[8]", "technique.request_count=6", "technique.warmup_requests=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(read_results(run_dir)["stages"]) == ["benchmark"]  # the benchmark alone: no evaluation after it
    metrics = read_results(run_dir)["stages"]["benchmark"]["metrics"]
    for point in ("c1_in16_out8", "c2_in16_out8"):
        assert metrics[f"{point}_valid"] == 1.0
        for name in ("ttft_p50_ms", "ttft_p99_ms", "itl_avg_ms", "e2e_p90_ms", "tpot_avg_ms", "output_tokens_per_s",
                     "request_throughput_per_s"):
            assert metrics[f"{point}_{name}"] > 0, name
        assert metrics[f"{point}_error_count"] == 0
    assert metrics["output_tokens_per_s"] == metrics["c1_in16_out8_output_tokens_per_s"]  # headline: first point
    assert metrics["valid_points"] == 2 and metrics["invalid_points"] == 0

    points = rows(run_dir, "benchmark.jsonl")
    assert [p["point"] for p in points] == ["c1_in16_out8", "c2_in16_out8"]
    for point in points:
        assert point["valid"] and point["request_count"] == 6 and point["output_tokens_source"] == ["engine"]
        assert point["ttft_min_ms"] <= point["ttft_p50_ms"] <= point["ttft_max_ms"]
        assert point["output_tokens_avg"] == 8.0  # ignore_eos: exactly output_tokens each
        assert point["input_tokens_avg"] == 16.0
        assert len(point["coherence_samples"]) == 3
    requests = rows(run_dir, "requests.jsonl")
    assert len(requests) == 12
    assert all(r["output_tokens"] == 8 and r["error"] is None and r["ttft_ms"] > 0 for r in requests)
    # output tokens / wall time, recomputed from the per-request rows
    first = [r for r in requests if r["point"] == "c1_in16_out8"]
    wall_s = (max(r["done_ms"] for r in first) - min(r["sent_ms"] for r in first)) / 1000
    assert metrics["c1_in16_out8_output_tokens_per_s"] == pytest.approx(48 / wall_s, rel=1e-6)


@pytest.mark.slow
def test_a_broken_model_is_invalid_and_reports_no_throughput(tmp_path, tiny_checkpoint):
    result, run_dir = benchmark_run(
        tmp_path, f"model.path={tiny_checkpoint}", "technique.concurrency=[2]", "technique.input_tokens=[16]",
        "technique.output_tokens=[8]", "technique.request_count=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_results(run_dir)["stages"]["benchmark"]["metrics"]
    assert metrics["c2_in16_out8_valid"] == 0.0 and metrics["invalid_points"] == 1
    assert not any(key.endswith("tokens_per_s") for key in metrics)
    (point,) = rows(run_dir, "benchmark.jsonl")
    assert not point["valid"] and "repeated" in point["invalid_reason"]
    assert "request_count" not in point  # never timed
    assert rows(run_dir, "requests.jsonl") == []


# ------------------------------------------------------------------ endpoints

def serve_in_thread(app):
    """``app`` on a free loopback port with uvicorn in a daemon thread; (server, url)."""
    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the loopback server did not start"
        time.sleep(0.01)
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def llmexp_serve(varied_checkpoint):
    """``llmexp serve``'s app over the varied checkpoint."""
    from llmexp.serving.app import create_app
    from llmexp.serving.engine import Engine
    from llmexp.serving.served_models import load_served_models

    engine = Engine(load_served_models(varied_checkpoint, name="varied"), max_batch_size=8)
    server, url = serve_in_thread(create_app(engine))
    yield url
    server.should_exit = True
    engine.close()


class EchoServer:
    """An OpenAI-compatible streaming server that answers with the prompt's own words, one per SSE chunk, after
    ``delay_s`` each; it counts the requests in flight and records the Authorization headers it was sent. It takes
    its API key as a Bearer token, or its user and password as HTTP Basic authentication."""

    API_KEY = "sk-bench-test-5e3b9a"
    USER, PASSWORD = "bench-user", "p@ss:w0rd/1c9e4b"  # characters a URL must escape
    BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    def __init__(self, delay_s: float = 0.01):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, StreamingResponse

        self.in_flight = 0
        self.max_in_flight = 0
        self.authorizations = set()
        app = FastAPI()

        @app.get("/v1/models")
        async def models(request: Request):
            self.authorizations.add(request.headers.get("authorization"))
            return {"object": "list", "data": [{"id": "echo", "object": "model"}]}

        async def answer(request: Request, chat: bool):
            self.authorizations.add(request.headers.get("authorization"))
            if request.headers.get("authorization") not in (f"Bearer {self.API_KEY}", self.BASIC):
                return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
            body = await request.json()
            prompt = body["messages"][-1]["content"] if chat else body["prompt"]
            words = prompt.split()
            count = body.get("max_tokens") or body.get("max_completion_tokens") or 16
            kind = "chat.completion.chunk" if chat else "text_completion"

            async def events():
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    for index in range(count):
                        await asyncio.sleep(delay_s)
                        word = f" {words[index % len(words)]}"
                        choice = {"index": 0, "delta": {"content": word}} if chat else {"index": 0, "text": word}
                        yield f"data: {json.dumps({'object': kind, 'model': 'echo', 'choices': [choice]})}\n\n"
                    if (body.get("stream_options") or {}).get("include_usage"):
                        usage = {"prompt_tokens": len(words), "completion_tokens": count}
                        yield f"data: {json.dumps({'object': kind, 'choices': [], 'usage': usage})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    self.in_flight -= 1

            return StreamingResponse(events(), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await answer(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await answer(request, chat=True)

        self.app = app


@pytest.fixture(scope="module")
def echo_server():
    echo = EchoServer()
    server, url = serve_in_thread(echo.app)
    echo.url = url
    yield echo
    server.should_exit = True


@pytest.mark.slow
def test_endpoint_llmexp_serve_counts_tokens_from_usage(tmp_path, varied_checkpoint, llmexp_serve):
    result, run_dir = benchmark_run(
        tmp_path, "technique.target=endpoint", f"technique.url={llmexp_serve}", f"model.path={varied_checkpoint}",
        "technique.concurrency=[2]", "technique.input_tokens=[16]", "technique.output_tokens=[6]",
        "technique.request_count=6",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (point,) = rows(run_dir, "benchmark.jsonl")
    assert point["valid"], point["invalid_reason"]
    assert point["target"] == f"{llmexp_serve} (varied, completions)"  # the name GET /v1/models gave
    assert point["output_tokens_source"] == ["usage"] and point["request_count"] == 6
    assert 0 < point["output_tokens_avg"] <= 6 and point["output_tokens_per_s"] > 0


@pytest.mark.slow
def test_endpoint_keeps_concurrency_in_flight_and_the_key_out_of_every_file(tmp_path, varied_checkpoint, echo_server):
    echo_server.max_in_flight = 0
    result, run_dir = benchmark_run(
        tmp_path, "technique.target=endpoint", f"technique.url={echo_server.url}/v1", "technique.model=echo",
        "technique.endpoint_type=chat", "technique.api_key_env=BENCH_TEST_KEY",
        f"technique.tokenizer={varied_checkpoint}",
        "technique.concurrency=[4]", "technique.input_tokens=[12]", "technique.output_tokens=[10]",
        "technique.request_count=16", "technique.warmup_requests=0", "technique.min_distinct_ratio=0.5",
        env={"BENCH_TEST_KEY": EchoServer.API_KEY},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert echo_server.max_in_flight == 4  # what the target saw, not what the client meant
    assert echo_server.authorizations == {f"Bearer {EchoServer.API_KEY}"}
    (point,) = rows(run_dir, "benchmark.jsonl")
    assert point["valid"] and point["request_count"] == 16 and point["output_tokens_avg"] == 10.0
    assert point["output_tokens_source"] == ["usage"]
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert written and not [p for p in written if EchoServer.API_KEY.encode() in p.read_bytes()]
    assert EchoServer.API_KEY not in result.stdout + result.stderr


@pytest.mark.slow
def test_a_wrong_key_fails_the_gate_with_the_servers_answer(tmp_path, varied_checkpoint, echo_server):
    result, run_dir = benchmark_run(
        tmp_path, "technique.target=endpoint", f"technique.url={echo_server.url}", f"model.path={varied_checkpoint}",
        "technique.concurrency=[1]", "technique.request_count=2", "technique.api_key_env=BENCH_TEST_KEY",
        env={"BENCH_TEST_KEY": "wrong"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (point,) = rows(run_dir, "benchmark.jsonl")
    assert not point["valid"] and "HTTP 401" in point["invalid_reason"] and "bad key" in point["invalid_reason"]


@pytest.mark.slow
def test_a_password_in_the_url_is_sent_as_basic_auth_and_kept_out_of_every_log_and_file(tmp_path, varied_checkpoint,
                                                                                       echo_server):
    echo_server.authorizations = set()
    url = echo_server.url.replace("http://", f"http://{quote(EchoServer.USER, safe='')}:"
                                             f"{quote(EchoServer.PASSWORD, safe='')}@")
    result, run_dir = benchmark_run(
        tmp_path, "technique.target=endpoint", f"technique.url={url}", f"model.path={varied_checkpoint}",
        "technique.concurrency=[2]", "technique.input_tokens=[12]", "technique.output_tokens=[4]",
        "technique.request_count=4", "technique.warmup_requests=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert echo_server.authorizations == {EchoServer.BASIC}  # GET /v1/models and every completion
    (point,) = rows(run_dir, "benchmark.jsonl")
    assert point["valid"] and point["request_count"] == 4
    assert point["target"] == f"{echo_server.url} (echo, completions)"  # the model GET /v1/models named
    log = (run_dir / "llmexp.log").read_text()
    assert f"HTTP Request: GET {echo_server.url}/v1/models" in log  # httpx's request log, without the password
    assert f"HTTP Request: POST {echo_server.url}/v1/completions" in log
    secrets = (EchoServer.PASSWORD, quote(EchoServer.PASSWORD, safe=""), EchoServer.BASIC.split()[1])
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert [(path, secret) for path in files for secret in secrets if secret.encode() in path.read_bytes()] == []
    assert [secret for secret in secrets if secret in result.stdout + result.stderr] == []


def test_a_url_that_is_not_http_is_refused_without_its_password(tmp_path, tiny_checkpoint):
    result, run_dir = benchmark_run(tmp_path, "technique.target=endpoint", "technique.url=ftp://bench:pw-4f1e9a@host:21",
                                    f"model.path={tiny_checkpoint}")
    assert result.returncode == 2 and not run_dir.exists()
    assert "technique.url=ftp://<redacted>@host:21 is not an http(s) URL" in result.stderr
    assert "pw-4f1e9a" not in result.stdout + result.stderr


def test_an_unreachable_endpoint_is_a_clear_error_after_retries(tmp_path, tiny_checkpoint):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    result, run_dir = benchmark_run(tmp_path, "technique.target=endpoint", f"technique.url=http://127.0.0.1:{port}",
                                    f"model.path={tiny_checkpoint}")
    assert result.returncode == 2
    assert f"technique.url=http://127.0.0.1:{port}" in result.stderr and "after 5 attempts" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(AIPERF is None, reason="aiperf is not installed (set LLMEXP_TEST_AIPERF_BIN=<venv>/bin/aiperf)")
def test_aiperf_client_times_a_point_against_a_loopback_server(tmp_path, varied_checkpoint, echo_server):
    echo_server.max_in_flight = 0
    result, run_dir = benchmark_run(
        tmp_path, "technique.target=endpoint", "technique.client=aiperf", f"technique.aiperf_bin={AIPERF}",
        f"technique.url={echo_server.url}", "technique.api_key_env=BENCH_TEST_KEY", f"model.path={varied_checkpoint}",
        "technique.concurrency=[2]", "technique.input_tokens=[12]", "technique.output_tokens=[8]",
        "technique.request_count=10", "technique.warmup_requests=1",
        env={"BENCH_TEST_KEY": EchoServer.API_KEY},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (point,) = rows(run_dir, "benchmark.jsonl")
    assert point["valid"], point["invalid_reason"]
    assert point["request_count"] == 10 and point["output_tokens_source"] == ["aiperf"]
    assert point["output_tokens_avg"] == 8.0 and point["input_tokens_avg"] == 12.0
    assert echo_server.max_in_flight == 2
    assert point["aiperf"]["version"] and "--api-key '<redacted>'" in point["aiperf"]["command"]
    # AIPerf's own figures and ours, from the same requests, agree (to float rounding of its ns timestamps)
    assert point["ttft_p50_ms"] == pytest.approx(point["aiperf"]["ttft_p50_ms"], rel=1e-4)
    assert point["itl_avg_ms"] == pytest.approx(point["aiperf"]["itl_avg_ms"], rel=1e-4)
    assert len(rows(run_dir, "requests.jsonl")) == 10
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert not [p for p in written if EchoServer.API_KEY.encode() in p.read_bytes()]


# ------------------------------------------------------------------ the planner

def plan_problems(*overrides: str, model_path: Path | None = None):
    from llmexp.configuration.compose import compose_config
    from llmexp.plugins.benchmark import Benchmark

    extra = [f"model.path={model_path}"] if model_path else []
    cfg = compose_config(["technique=benchmark", *extra, *overrides])
    return " ".join(Benchmark.plan_problems(cfg, "technique", cfg.technique, plan=None))


@pytest.mark.parametrize("overrides, expected", [
    (["technique.concurrency=[1,0]"], "technique.concurrency=0 is out of range: it must be at least 1"),
    (["technique.concurrency=[100000]"], "technique.concurrency=100000 is out of range"),
    (["technique.concurrency=[]"], "technique.concurrency is empty"),
    (["technique.concurrency=[4,4]"], "repeats 4"),
    (["technique.request_count=-3"], "technique.request_count=-3 is out of range"),
    (["technique.request_count=null"], "neither request_count nor duration_s is set"),
    (["technique.duration_s=0"], "technique.duration_s=0.0 is out of range: it must be more than 0"),
    (["technique.input_tokens=[2000000]"], "technique.input_tokens=2000000 is out of range"),
    (["technique.output_tokens=[0]"], "technique.output_tokens=0 is out of range"),
    (["technique.input_tokens=[200]", "technique.output_tokens=[64]"], "exceeds the model's context of 256 tokens"),
    (["technique.target=endpoint"], "technique.target=endpoint needs technique.url"),
    (["technique.target=endpoint", "technique.url=127.0.0.1:8000"], "is not an http(s) URL"),
    (["technique.target=endpoint", "technique.url=http://127.0.0.1:8000", "technique.api_key_env=NO_SUCH_VAR_X1"],
     "technique.api_key_env=NO_SUCH_VAR_X1 names an environment variable that is not set"),
    (["technique.client=aiperf"], "technique.client=aiperf drives an HTTP endpoint, and target=inprocess has none"),
    (["technique.target=endpoint", "technique.url=http://127.0.0.1:8000", "technique.client=aiperf",
      "technique.aiperf_bin=/nonexistent/aiperf"], "technique.aiperf_bin=/nonexistent/aiperf was not found"),
    (["technique.endpoint_type=embeddings"], "technique.endpoint_type=embeddings is not one of completions, chat"),
    (["technique.min_distinct_ratio=1.5"], "technique.min_distinct_ratio=1.5 must be between 0 (off) and 1"),
])
def test_planner_refuses_bad_values_naming_the_field(overrides, expected, tiny_checkpoint):
    assert expected in plan_problems(*overrides, model_path=tiny_checkpoint)


def test_planner_accepts_the_defaults_and_an_endpoint_without_a_local_model():
    from llmexp.configuration.compose import compose_config
    from llmexp.plugins.benchmark import Benchmark

    assert "model.path is unset" in plan_problems()  # in process needs a model
    endpoint = compose_config(["technique=benchmark", "technique.target=endpoint", "technique.url=http://127.0.0.1:9",
                               "technique.tokenizer=/some/tokenizer"])
    assert Benchmark.plan_problems(endpoint, "technique", endpoint.technique, plan=None) == []


def test_cli_refuses_before_anything_is_written(tmp_path, tiny_checkpoint):
    result, run_dir = benchmark_run(tmp_path, f"model.path={tiny_checkpoint}", "technique.concurrency=[0]",
                                    "technique.target=endpoint")
    assert result.returncode == 2
    assert "technique.concurrency=0" in result.stderr and "technique.url" in result.stderr
    assert not run_dir.exists()


def test_the_plugin_and_its_plan_check_import_no_torch():
    code = (
        "import sys; from llmexp.configuration.compose import compose_config; from llmexp.plugins.benchmark import "
        "Benchmark; cfg = compose_config(['technique=benchmark', 'technique.concurrency=[0]']); "
        "assert Benchmark.plan_problems(cfg, 'technique', cfg.technique, None); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
