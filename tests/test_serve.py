"""``llmexp serve`` over real HTTP on loopback: OpenAI-schema completions and chat (streamed and not),
errors that leave the server up (400, 404, 429), disconnects that free slots, /metrics, adapters, the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from llmexp.data.instructions import prompt_ids
from llmexp.models import save_model
from llmexp.serving.app import create_app
from llmexp.serving.engine import Engine
from llmexp.serving.served_models import load_served_models
from tests.conftest import REPO
from tests.test_serving_engine import build_varied_model, generate_alone, random_prompts, save_lora_adapter

NAME = "varied"
MAX_BATCH, MAX_QUEUE = 4, 4


def wait_until(condition, timeout: float = 20.0) -> None:
    """Poll ``condition`` (an observable state, not a guess at timing) until true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free loopback port (uvicorn in a thread), serving the varied model and one LoRA adapter."""
    root = tmp_path_factory.mktemp("serve_http")
    model, tokenizer = build_varied_model()
    save_model(model, tokenizer, root / NAME)
    adapter = save_lora_adapter(root / NAME, root / "sql", seed=1)
    served = load_served_models(root / NAME, adapters={"sql": adapter})
    engine = Engine(served, max_batch_size=MAX_BATCH, max_queue=MAX_QUEUE)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    wait_until(lambda: uv.started)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield SimpleNamespace(client=client, engine=engine, served=served, root=root,
                              url=f"http://127.0.0.1:{port}")
    uv.should_exit = True
    thread.join(timeout=10)
    engine.close()


def base_tokens(served, prompt: str, max_tokens: int):
    """``generate`` of the base model alone (the served model is a PeftModel: its adapters are switched off)."""
    with served.model.disable_adapter():
        return generate_alone(served.model, served.tokenizer, prompt, max_tokens)


def reference_text(served, prompt: str, max_tokens: int) -> str:
    return served.tokenizer.decode(base_tokens(served, prompt, max_tokens), skip_special_tokens=True)


def sse_events(response: httpx.Response):
    """The JSON events of a server-sent-event stream, checking its framing, and whether it ended with [DONE]."""
    events, done = [], False
    for block in response.read().decode().split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: ") and "\n" not in block, block
        payload = block[len("data: "):]
        assert not done, "nothing may follow [DONE]"
        if payload == "[DONE]":
            done = True
        else:
            events.append(json.loads(payload))
    return events, done


def test_completion_follows_the_openai_schema_and_equals_generate(server):
    prompt = random_prompts(1, seed=11)[0]
    response = server.client.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 12,
                                                           "temperature": 0})
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == NAME
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["text"] == reference_text(server.served, prompt, 12)
    assert choice["finish_reason"] in ("stop", "length") and choice["index"] == 0
    prompt_tokens = len(server.served.tokenizer(prompt)["input_ids"])
    usage = body["usage"]
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["total_tokens"] == prompt_tokens + usage["completion_tokens"]
    assert usage["completion_tokens"] == 12 or choice["finish_reason"] == "stop"


def test_streamed_completion_is_well_formed_and_adds_up_to_the_plain_one(server):
    prompt = random_prompts(1, seed=12)[0]
    request = {"model": NAME, "prompt": prompt, "max_tokens": 10, "temperature": 0}
    plain = server.client.post("/v1/completions", json=request).json()
    with server.client.stream("POST", "/v1/completions",
                              json={**request, "stream": True, "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events, done = sse_events(response)
    assert done
    *chunks, usage_chunk = events
    assert {event["id"] for event in events} == {chunks[0]["id"]}
    assert all(event["object"] == "text_completion.chunk" for event in events)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == plain["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == plain["usage"]


def test_chat_uses_the_sft_prompt_format_and_streams_deltas(server):
    question = "what is the job of " + random_prompts(1, seed=13)[0]
    tokenizer = server.served.tokenizer
    request = {"model": NAME, "messages": [{"role": "user", "content": question}], "max_tokens": 8, "temperature": 0}
    body = server.client.post("/v1/chat/completions", json=request).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    ids = prompt_ids(question, tokenizer)  # what SFT trained on: the prompt formatted by format_prompt
    expected = base_tokens(server.served, tokenizer.decode(ids[1:]), 8)
    assert message["content"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert body["usage"]["prompt_tokens"] == len(ids)
    with server.client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as response:
        events, done = sse_events(response)
    assert done and all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == message["content"]
    assert events[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]
    assert "usage" not in events[-1]


def test_models_lists_the_base_and_its_adapter_and_each_is_served(server):
    models = server.client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["parent"]) for m in models["data"]] == [(NAME, None), ("sql", NAME)]
    prompt = random_prompts(1, seed=14)[0]
    texts = {name: server.client.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 8,
                                                               "temperature": 0}).json()["choices"][0]["text"]
             for name in (NAME, "sql")}
    assert texts[NAME] == reference_text(server.served, prompt, 8)
    assert texts["sql"] != texts[NAME]


@pytest.mark.parametrize("body, status, fragment", [
    ({"model": "gpt-4", "prompt": "hello"}, 404, f"served models: {NAME}, sql"),
    ({"model": NAME, "prompt": "hello", "n": 2}, 400, "n=2"),
    ({"model": NAME, "prompt": "hello", "max_tokens": -3}, 400, "max_tokens=-3"),
    ({"model": NAME, "prompt": "hello", "max_tokens": 10_000}, 400, "at most 256"),
    ({"model": NAME, "prompt": "hello " * 300}, 400, "context is 256 tokens"),
    ({"model": NAME, "prompt": "hello", "temperature": "hot"}, 400, "temperature"),
    ({"model": NAME, "prompt": "hello", "top_p": 0}, 400, "top_p=0"),
    ({"model": NAME, "prompt": "hello", "logprobs": 5}, 400, "logprobs=5 is not supported"),
    ({"model": NAME, "prompt": ["a", "b"]}, 400, "one prompt per request"),
    ({"prompt": "hello"}, 400, "model: Field required"),
])
def test_bad_requests_get_a_clear_error_and_the_server_stays_up(server, body, status, fragment):
    response = server.client.post("/v1/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and error["code"] == status
    assert server.client.get("/health").json() == {"status": "ok"}


def test_malformed_json_and_bad_chat_messages_are_400(server):
    response = server.client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    response = server.client.post("/v1/chat/completions", json={"model": NAME, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    assert response.status_code == 400 and "must end with a user message" in response.json()["error"]["message"]
    response = server.client.post("/v1/chat/completions", json={"model": NAME, "messages": [
        {"role": "wizard", "content": "hi"}]})
    assert response.status_code == 400 and "role='wizard'" in response.json()["error"]["message"].replace('"', "'")


def post_in_background(server, count: int, max_tokens: int = 6):
    pool = ThreadPoolExecutor(count)
    prompts = random_prompts(count, seed=15)
    futures = [pool.submit(server.client.post, "/v1/completions",
                           json={"model": NAME, "prompt": p, "max_tokens": max_tokens, "temperature": 0}) for p in prompts]
    return pool, futures


def test_a_full_queue_answers_429_at_once_then_serves_the_queued(server):
    with server.engine.paused():
        pool, futures = post_in_background(server, MAX_QUEUE)
        wait_until(lambda: server.engine.waiting_count == MAX_QUEUE)
        refused = server.client.post("/v1/completions", json={"model": NAME, "prompt": "hello", "max_tokens": 2})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert "max_queue=4" in refused.json()["error"]["message"]
    assert [future.result().status_code for future in futures] == [200] * MAX_QUEUE
    pool.shutdown()


def read_metrics(server):
    text = server.client.get("/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples, name, **labels):
    return samples.get((f"llmexp_serve_{name}", tuple(sorted(labels.items()))), 0.0)


def test_concurrent_requests_are_batched_and_metrics_count_what_happened(server):
    before = read_metrics(server)
    with server.engine.paused():  # all four queue, then run as one batch
        pool, futures = post_in_background(server, MAX_BATCH, max_tokens=12)
        wait_until(lambda: server.engine.waiting_count == MAX_BATCH)
    bodies = [future.result().json() for future in futures]
    pool.shutdown()
    server.client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    after = read_metrics(server)
    tokens = [body["usage"]["completion_tokens"] for body in bodies]
    passes = sum(metric(after, "forward_steps_total", kind=k) - metric(before, "forward_steps_total", kind=k)
                 for k in ("prefill", "decode"))
    assert passes == max(tokens) < sum(tokens)  # one prefill, then one step per token of the longest row
    assert metric(after, "requests_total", model=NAME, status="200") - metric(before, "requests_total", model=NAME,
                                                                               status="200") == MAX_BATCH
    assert metric(after, "requests_total", model="unknown", status="404") - metric(
        before, "requests_total", model="unknown", status="404") == 1
    assert metric(after, "generated_tokens_total", model=NAME) - metric(before, "generated_tokens_total",
                                                                        model=NAME) == sum(tokens)
    assert metric(after, "batch_size_count", kind="prefill") - metric(before, "batch_size_count", kind="prefill") == 1
    assert metric(after, "batch_size_sum", kind="prefill") - metric(before, "batch_size_sum", kind="prefill") == 4
    for histogram in ("time_to_first_token_seconds", "e2e_latency_seconds"):
        assert metric(after, f"{histogram}_count", model=NAME) - metric(before, f"{histogram}_count",
                                                                        model=NAME) == MAX_BATCH
    assert metric(after, "queue_depth") == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    tokenizer = server.served.tokenizer
    prompt = next(p for p in random_prompts(20, seed=16)
                  if tokenizer.eos_token_id not in base_tokens(server.served, p, 180))
    before = read_metrics(server)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 180,
                                                            "temperature": 0, "stream": True}) as response:
            next(response.iter_lines())
    wait_until(lambda: metric(read_metrics(server), "generations_total", model=NAME, finish_reason="cancelled")
               > metric(before, "generations_total", model=NAME, finish_reason="cancelled"))
    wait_until(lambda: server.engine.running_count == 0)
    after = read_metrics(server)
    assert metric(after, "generated_tokens_total", model=NAME) - metric(before, "generated_tokens_total", model=NAME) < 180
    assert server.client.get("/health").status_code == 200


def run_serve(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmexp.serve_command", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kwargs)


def test_the_command_announces_its_url_serves_and_stops_cleanly_on_ctrl_c(server):
    process = run_serve(str(server.root / NAME), "--port", "0", "--adapter", f"sql={server.root / 'sql'}")
    try:
        line = process.stdout.readline()
        assert line.startswith("llmexp serve: http://127.0.0.1:") and f"{NAME} (base), sql (adapter)" in line
        url = line.split()[2]
        models = httpx.get(f"{url}/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == [NAME, "sql"]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.communicate()


def test_the_command_refuses_bad_options_with_exit_code_2(server):
    bad = run_serve(str(server.root / NAME), "--adapter", "no-equals-sign")
    _, err = bad.communicate(timeout=60)
    assert bad.returncode == 2 and "give NAME=DIR" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = run_serve(str(server.root / NAME), "--port", str(busy.getsockname()[1]))
        _, err = taken.communicate(timeout=60)
    assert taken.returncode == 2 and "cannot listen there" in err
    missing = run_serve(str(server.root / "nothing"), "--port", "0")
    _, err = missing.communicate(timeout=120)
    assert missing.returncode == 2 and "no such directory" in err
