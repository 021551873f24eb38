"""``llmexp serve`` over real HTTP on loopback: OpenAI-schema completions and chat (streamed and not),
errors that leave the server up (400, 404, 413, 429), disconnects that free slots, /metrics, adapters, the CLI."""

from __future__ import annotations

import contextlib
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

from llmexp.cli import serve as serve_command
from llmexp.data.instructions import prompt_ids
from llmexp.errors import UserError
from llmexp.models.loading import save_model
from llmexp.serving.app import create_app
from llmexp.serving.engine import Engine
from llmexp.serving.limits import default_max_body_bytes
from llmexp.serving.served_models import load_served_models
from tests.bad_requests import bad_requests
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


@contextlib.contextmanager
def serve_in_thread(app):
    """``app`` on a free loopback port (uvicorn in a thread); yields its URL."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets TCP_NODELAY
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    wait_until(lambda: uv.started)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app serving the varied model and one LoRA adapter, without API keys."""
    root = tmp_path_factory.mktemp("serve_http")
    model, tokenizer = build_varied_model()
    save_model(model, tokenizer, root / NAME)
    adapter = save_lora_adapter(root / NAME, root / "sql", seed=1)
    served = load_served_models(root / NAME, adapters={"sql": adapter})
    engine = Engine(served, max_batch_size=MAX_BATCH, max_queue=MAX_QUEUE)
    with serve_in_thread(create_app(engine)) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield SimpleNamespace(client=client, engine=engine, served=served, root=root, url=url)
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


@pytest.mark.parametrize("bad", bad_requests(NAME, 256), ids=lambda bad: bad.label)
def test_each_bad_request_gets_its_4xx_naming_the_field_and_the_server_stays_up(server, bad):
    response = server.client.request(bad.method, bad.path, content=bad.body, headers={"content-type": bad.content_type})
    assert response.status_code == bad.status
    error = response.json()["error"]
    assert bad.fragment in error["message"] and error["code"] == bad.status
    assert server.client.get("/health").json() == {"status": "ok"}


def post_together(server, bodies):
    """POST ``bodies`` from as many threads while the engine is held, so they run as one batch; their responses."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        with server.engine.paused():
            futures = [pool.submit(server.client.post, "/v1/completions", json=body) for body in bodies]
            wait_until(lambda: server.engine.waiting_count == len(bodies))
        return [future.result() for future in futures]


def test_a_tiny_temperature_never_fails_the_batch_it_joins(server):
    prompts = random_prompts(MAX_BATCH, seed=30)
    temperatures = (0, 1e-300, 0, 5e-324)  # 1e-300 turned every row of its batch into a 500
    responses = post_together(server, [{"model": NAME, "prompt": p, "max_tokens": 6, "temperature": t, "seed": 3}
                                       for p, t in zip(prompts, temperatures)])
    assert [response.status_code for response in responses] == [200] * MAX_BATCH
    assert [r.json()["choices"][0]["text"] for r in responses] == [reference_text(server.served, p, 6) for p in prompts]


def poisoned_batch(served, where: str, max_tokens: int = 6):
    """MAX_BATCH prompts and a token that only the first request's sequence holds: in its prompt (``where="prompt"``)
    or as its third generated token, fed back at the third decoding step (``"generated"``)."""
    tokenizer = served.tokenizer
    for seed in range(100):
        prompts = random_prompts(MAX_BATCH, seed=100 + seed)
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        generated = [base_tokens(served, p, max_tokens) for p in prompts]
        elsewhere = {t for i in range(1, MAX_BATCH) for t in ids[i] + generated[i]}
        if where == "prompt":
            candidates = [t for t in ids[0] if t not in elsewhere and t not in tokenizer.all_special_ids]
        else:
            candidates = [generated[0][2]] if generated[0][2] not in elsewhere | set(ids[0] + generated[0][:2]) else []
        if candidates:
            return prompts, candidates[0]
    raise AssertionError("no batch with a token of its own found")


@contextlib.contextmanager
def model_failing_on(served, token: int, how: str):
    """The served model, made to fail on sequences holding ``token``: raising in its last layer (``"raise"``: the
    layers before it have already written this step's KV cache) or computing NaN for that row only (``"nan"``, as
    an overflowing low-precision model does)."""
    embeddings = served.model.get_input_embeddings()
    seen = {}

    def look(module, args, output):
        rows = (args[0] == token).any(-1)
        seen["poisoned"] = bool(rows.any())
        if how == "nan" and seen["poisoned"]:
            output = output.clone()
            output[rows] = float("nan")
        return output

    def fail(module, args):
        if seen["poisoned"]:
            raise RuntimeError(f"token {token} breaks this model")

    handles = [embeddings.register_forward_hook(look)]
    if how == "raise":
        handles.append(served.model.get_base_model().model.layers[-1].register_forward_pre_hook(fail))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("where, how", [("prompt", "raise"), ("generated", "raise"), ("prompt", "nan")])
def test_a_request_the_model_fails_on_ends_alone_with_422_and_its_batch_goes_on(server, where, how):
    prompts, token = poisoned_batch(server.served, where)
    bodies = [{"model": NAME, "prompt": p, "max_tokens": 6, "temperature": t} for p, t in zip(prompts, (0, 0, 0.7, 0))]
    bodies[2]["seed"] = 5
    seeded = server.client.post("/v1/completions", json=bodies[2]).json()["choices"][0]["text"]
    before = read_metrics(server)
    with model_failing_on(server.served, token, how):
        responses = post_together(server, bodies)
    failed = responses[0].json()["error"]
    assert responses[0].status_code == 422 and failed["code"] == 422
    assert "could not be generated" in failed["message"] and "went on" in failed["message"]
    assert [response.status_code for response in responses[1:]] == [200] * (MAX_BATCH - 1)
    texts = [response.json()["choices"][0]["text"] for response in responses[1:]]
    assert texts == [reference_text(server.served, prompts[1], 6), seeded, reference_text(server.served, prompts[3], 6)]
    assert metric(read_metrics(server), "generations_total", model=NAME, finish_reason="error") - metric(
        before, "generations_total", model=NAME, finish_reason="error") == 1
    again = server.client.post("/v1/completions", json=bodies[0])  # the model mended, the server never went down
    assert again.json()["choices"][0]["text"] == reference_text(server.served, prompts[0], 6)


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


def send_and_abandon(url: str, body) -> socket.socket:
    """A raw HTTP/1.1 client: the whole request sent, the socket returned for the caller to close unread."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    connection = socket.create_connection((host, int(port)))
    connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(payload), payload))
    return connection


def test_non_streaming_clients_that_disconnect_free_their_slots(server):
    before = read_metrics(server)
    body = {"model": NAME, "prompt": "hello", "max_tokens": 250, "temperature": 0, "ignore_eos": True}
    with server.engine.paused():
        connections = [send_and_abandon(server.url, body) for _ in range(MAX_BATCH)]
        wait_until(lambda: server.engine.waiting_count == MAX_BATCH)
    wait_until(lambda: server.engine.running_count == MAX_BATCH)  # every slot of the batch taken

    def abandoned() -> float:
        return metric(read_metrics(server), "requests_total", model=NAME, status="499") - metric(
            before, "requests_total", model=NAME, status="499")

    with server.engine.paused():  # the clients leave while their rows hold the batch
        for connection in connections:
            connection.close()
        wait_until(lambda: abandoned() == MAX_BATCH, timeout=10)
    wait_until(lambda: server.engine.running_count == 0, timeout=10)
    after = read_metrics(server)
    assert metric(after, "generations_total", model=NAME, finish_reason="cancelled") - metric(
        before, "generations_total", model=NAME, finish_reason="cancelled") == MAX_BATCH
    generated = metric(after, "generated_tokens_total", model=NAME) - metric(before, "generated_tokens_total", model=NAME)
    assert generated < MAX_BATCH * 250
    follow_up = server.client.post("/v1/completions", json={"model": NAME, "prompt": "hello", "max_tokens": 2})
    assert follow_up.status_code == 200


def raw_response(connection: socket.socket):
    """(status, JSON body) of the one HTTP/1.1 response read from ``connection``."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += connection.recv(65536)
    return int(head.split()[1]), json.loads(body)


def test_a_body_above_the_limit_gets_413_before_it_is_read_and_is_counted(server):
    limit = default_max_body_bytes(server.served.context_length)
    before = metric(read_metrics(server), "requests_total", model="unknown", status="413")
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as connection:  # a terabyte announced, none sent
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % (host.encode(), 10**12))
        status, body = raw_response(connection)
    assert status == 413 and body["error"]["code"] == 413
    assert body["error"]["message"] == (f"the request body declares {10**12} bytes, above this server's limit of "
                                        f"{limit} bytes; send a shorter request, or start llmexp serve with a larger "
                                        "--max-body-bytes.")
    sent = []

    def chunks():  # a body without a length (chunked), 16 pieces beyond the limit
        for _ in range(limit // 65536 + 16):
            sent.append(65536)
            yield b" " * 65536

    chunked = server.client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and f"passed {limit} bytes" in chunked.json()["error"]["message"]
    assert sum(sent) > limit and "content-length" not in chunked.request.headers
    assert metric(read_metrics(server), "requests_total", model="unknown", status="413") - before == 2
    follow_up = server.client.post("/v1/completions", json={"model": NAME, "prompt": "hello", "max_tokens": 2})
    assert follow_up.status_code == 200  # the same keep-alive connection goes on


KEYS = ("first-key-0123456789abcdef", "second-key-0123456789abcdef")


def bearer(key: str):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(server):
    """A second HTTP front on the same engine, with two API keys (one being rotated in)."""
    with serve_in_thread(create_app(server.engine, api_keys=KEYS)) as url, httpx.Client(base_url=url,
                                                                                         timeout=60) as client:
        yield SimpleNamespace(client=client, url=url)


def test_api_keys_guard_every_path_but_health_and_rejections_are_counted(keyed):
    def refusals() -> float:
        text = keyed.client.get("/metrics", headers=bearer(KEYS[1])).text
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == "llmexp_serve_requests_total" and sample.labels["status"] == "401")

    before = refusals()
    assert keyed.client.get("/health").json() == {"status": "ok"}  # open: a liveness probe that tells nothing
    body = {"model": NAME, "prompt": "hello", "max_tokens": 2, "temperature": 0}
    refused = [
        keyed.client.post("/v1/completions", json=body),
        keyed.client.post("/v1/completions", json=body, headers=bearer("wrong-key-0123456789abcdef")),
        keyed.client.post("/v1/completions", json=body, headers=bearer(KEYS[0][:-1])),
        keyed.client.post("/v1/completions", json=body, headers={"Authorization": f"Basic {KEYS[0]}"}),
        keyed.client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
        keyed.client.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "hi"}]}),
        keyed.client.get("/v1/models"),
        keyed.client.get("/metrics"),
        keyed.client.get("/docs"),
        keyed.client.get("/openapi.json"),
    ]
    for response in refused:
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert error["type"] == "authentication_error"
        assert "`Authorization: Bearer <key>`" in error["message"] or "not one of this server's keys" in error["message"]
        assert not any(key in response.text for key in (*KEYS, KEYS[0][:-1], "wrong-key"))
    assert refusals() - before == len(refused)
    for key in KEYS:
        answer = keyed.client.post("/v1/completions", json=body, headers=bearer(key))
        assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert keyed.client.get("/v1/models", headers={"Authorization": f"bearer {KEYS[0]}"}).status_code == 200
    assert keyed.client.get("/docs", headers=bearer(KEYS[0])).status_code == 404


def run_serve(*args: str, env=None, **kwargs) -> subprocess.Popen:
    environment = {name: value for name, value in os.environ.items() if name not in ("LLMEXP_API_KEY", "VLLM_API_KEY")}
    return subprocess.Popen([sys.executable, "-m", "llmexp.cli.serve", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**environment, "HF_HUB_OFFLINE": "1", **(env or {})}, **kwargs)


def test_the_command_announces_its_url_serves_and_stops_cleanly_on_ctrl_c(server):
    process = run_serve(str(server.root / NAME), "--port", "0", "--adapter", f"sql={server.root / 'sql'}",
                        "--max-body-bytes", "4096")
    try:
        line = process.stdout.readline()
        assert line.startswith("llmexp serve: http://127.0.0.1:") and f"{NAME} (base), sql (adapter)" in line
        url = line.split()[2]
        models = httpx.get(f"{url}/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == [NAME, "sql"]
        body = {"model": NAME, "prompt": "hello " * 700, "max_tokens": 2}
        refused = httpx.post(f"{url}/completions", json=body, timeout=30)
        assert refused.status_code == 413 and "limit of 4096 bytes" in refused.json()["error"]["message"]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.communicate()


def refusal(*args: str, env=None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``llmexp serve`` expected to refuse at once; one that serves instead is stopped and the test fails."""
    process = run_serve(*args, env=env)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"llmexp serve {' '.join(args)} served instead of refusing")
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def test_the_command_refuses_bad_options_with_exit_code_2(server):
    bad = refusal(str(server.root / NAME), "--adapter", "no-equals-sign")
    assert bad.returncode == 2 and "give NAME=DIR" in bad.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = refusal(str(server.root / NAME), "--port", str(busy.getsockname()[1]))
    assert taken.returncode == 2 and "cannot listen there" in taken.stderr
    missing = refusal(str(server.root / "nothing"), "--port", "0")
    assert missing.returncode == 2 and "no such directory" in missing.stderr
    no_body = refusal(str(server.root / NAME), "--port", "0", "--max-body-bytes", "0")
    assert no_body.returncode == 2 and "--max-body-bytes=0: give a whole number of at least 1" in no_body.stderr
    on_vllm = refusal(str(server.root / NAME), "--backend", "vllm", "--max-body-bytes", "4096")
    assert on_vllm.returncode == 2 and "--max-body-bytes is an option of --backend inprocess only" in on_vllm.stderr


@pytest.mark.parametrize("args, env, fragments", [
    (["--host", "0.0.0.0"], {}, ["--host 0.0.0.0: other machines can reach", "--allow-unauthenticated-remote"]),
    (["--api-key", "sk-typed-on-the-command-line"], {}, ["does not take keys on the command line", "LLMEXP_API_KEY"]),
    ([], {"LLMEXP_API_KEY": "sk-short"}, ["LLMEXP_API_KEY: key 1 has 8 characters", "at least 16"]),
    ([], {"LLMEXP_API_KEY": "first-key-0123456789abcdef,"}, ["LLMEXP_API_KEY: key 2 is empty"]),
    (["--api-key-file", "/nonexistent/keys"], {}, ["--api-key-file /nonexistent/keys: cannot read it"]),
    (["--backend", "vllm"], {"LLMEXP_API_KEY": ",".join(KEYS)}, ["2 API keys are set, and vLLM reads one"]),
])
def test_the_command_refuses_exposure_without_a_key_and_keys_where_others_can_read_them(server, args, env, fragments):
    result = refusal(str(server.root / NAME), "--port", "0", *args, env=env, timeout=60)
    message = " ".join(result.stderr.split())
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert all(fragment in message for fragment in fragments), message
    assert not any(secret in result.stdout + result.stderr  # never echoed
                   for secret in ("sk-typed", "sk-short", KEYS[0], KEYS[1]))


@pytest.mark.parametrize("host, exposed", [("127.0.0.1", False), ("localhost", False), ("::1", False),
                                           ("0.0.0.0", True), ("::", True)])
def test_loopback_needs_no_key_and_an_exposed_address_may_be_allowed_explicitly(monkeypatch, host, exposed):
    monkeypatch.delenv("LLMEXP_API_KEY", raising=False)
    if exposed:
        with pytest.raises(UserError, match="--allow-unauthenticated-remote"):
            serve_command._api_keys(serve_command.parse_args(["model", "--host", host]))
    options = ["model", "--host", host] + (["--allow-unauthenticated-remote"] if exposed else [])
    assert serve_command._api_keys(serve_command.parse_args(options)) == []


def test_vllms_own_key_counts_for_its_backend(monkeypatch):
    monkeypatch.delenv("LLMEXP_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", KEYS[0])
    assert serve_command._api_keys(serve_command.parse_args(["model", "--host", "0.0.0.0", "--backend", "vllm"])) == []
    with pytest.raises(UserError, match="other machines can reach"):
        serve_command._api_keys(serve_command.parse_args(["model", "--host", "0.0.0.0"]))


def test_the_command_serves_an_exposed_address_with_keys_from_the_environment_and_a_file(server, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text(f"# rotated in on Monday\n{KEYS[1]}\n\n")
    process = run_serve(str(server.root / NAME), "--host", "0.0.0.0", "--port", "0", "--api-key-file", str(key_file),
                        env={"LLMEXP_API_KEY": KEYS[0]})
    try:
        line = process.stdout.readline()
        assert line.startswith("llmexp serve: http://0.0.0.0:") and "API keys: 2" in line and KEYS[0] not in line
        url = line.split()[2].replace("0.0.0.0", "127.0.0.1")
        assert httpx.get(f"{url}/models", timeout=30).status_code == 401
        for key in KEYS:
            assert httpx.get(f"{url}/models", headers=bearer(key), timeout=30).json()["data"][0]["id"] == NAME
        assert httpx.get(url.removesuffix("/v1") + "/health", timeout=30).status_code == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        out, err = process.communicate()
    assert not any(key in out + err for key in KEYS)
