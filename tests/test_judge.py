"""The ``judge`` task type against a real HTTP judge on 127.0.0.1 whose replies each test scripts."""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, List, Optional, Tuple
from urllib.parse import quote

import pytest

from llmexp.data.embedded import build_world
from llmexp.data.jsonl import write_jsonl
from llmexp.errors import UserError
from llmexp.sdk import TaskInputs
from llmexp.plugins.evaluate.judge.task import JUDGE, load_items
from llmexp.plugins.evaluate.judge.template import load_template

KEY_ENV = "LLMEXP_TEST_JUDGE_KEY"
SECRET = "sk-test-9f3c2e71b5d84a06"
# A reply script: (the question being judged, how many requests for it came before) -> (status, content, delay_s)
Script = Callable[[str, int], Tuple[int, Optional[str], float]]


def good(score: int, reason: str = "agrees with the reference") -> str:
    return json.dumps({"score": score, "reason": reason})


class ScriptedJudge:
    """An OpenAI-compatible ``/v1/chat/completions`` on 127.0.0.1 that counts requests and plays a script."""

    def __init__(self, script: Script):
        self.script = script
        self.requests: List[dict] = []  # {"authorization", "body", "question"}
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                question = re.search(r"Question: (.*)", user).group(1)
                with judge._lock:
                    seen = sum(r["question"] == question for r in judge.requests)
                    authorization = self.headers.get("Authorization")
                    judge.requests.append({"authorization": authorization, "body": body, "question": question})
                    judge.in_flight += 1
                    judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                try:
                    status, content, delay = judge.script(question, seen)
                    time.sleep(delay)
                    if status == 200:
                        payload = {"object": "chat.completion", "model": body["model"],
                                   "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                                "finish_reason": "stop"}]}
                    else:
                        payload = {"error": {"message": content or "scripted failure"}}
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass
                finally:
                    with judge._lock:
                        judge.in_flight -= 1

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def items_file(tmp_path: Path, items: List[dict]) -> str:
    path = tmp_path / "items.jsonl"
    write_jsonl(path, items)
    return str(path)


def spec_for(judge_url: str, path: str, tmp_path: Path, **extra) -> dict:
    spec = {"type": "judge", "url": judge_url, "model": "judge-model", "path": path, "api_key_env": KEY_ENV,
            "cache_dir": str(tmp_path / "cache"), "backoff_s": 0.01, "timeout_s": 5.0, **extra}
    return spec


def run_judge(spec: dict, tmp_path: Path, scorer=None):
    assert JUDGE.problems(spec, "technique.tasks[0]") == []
    return JUDGE.run(spec, TaskInputs(world=build_world(0), stage_dir=str(tmp_path)), scorer)


QA = [
    {"question": "Who is the pilot?", "reference": "Alice", "answer": "Alice is the pilot"},
    {"question": "Where does Bob live?", "reference": "Paris", "answer": "Lyon, I think"},
    {"question": "What is 2 + 3?", "reference": "5", "answer": "five"},
]
SCORES = {"Who is the pilot?": 5, "Where does Bob live?": 1, "What is 2 + 3?": 4}


def test_scores_come_from_the_judge_and_a_rerun_is_answered_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with ScriptedJudge(lambda question, seen: (200, good(SCORES[question]), 0.0)) as judge:
        spec = spec_for(judge.url, items_file(tmp_path, QA), tmp_path)
        first = run_judge(spec, tmp_path)
        assert len(judge.requests) == 3
        assert {r["authorization"] for r in judge.requests} == {f"Bearer {SECRET}"}
        body = judge.requests[0]["body"]
        assert body["model"] == "judge-model" and body["temperature"] == 0.0
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        sent = {r["question"]: r["body"]["messages"][-1]["content"] for r in judge.requests}
        assert "Reference answer (ground truth): Paris" in sent["Where does Bob live?"]
        assert "Answer to grade: Lyon, I think" in sent["Where does Bob live?"]

        second = run_judge(spec, tmp_path)
        assert len(judge.requests) == 3  # nothing asked twice

    assert first.metrics == {
        "score_mean": pytest.approx(10 / 3), "score_1_share": pytest.approx(1 / 3), "score_2_share": 0.0,
        "score_3_share": 0.0, "score_4_share": pytest.approx(1 / 3), "score_5_share": pytest.approx(1 / 3),
        "n_scored": 3.0, "unparsable": 0.0, "errors": 0.0, "requests": 3.0, "cached": 0.0,
    }
    assert all(isinstance(value, float) for value in first.metrics.values())
    assert [row["score"] for row in first.rows] == [5, 1, 4]
    assert [row["reason"] for row in first.rows] == ["agrees with the reference"] * 3
    assert {**first.metrics, "requests": 0.0, "cached": 3.0} == second.metrics
    assert [row["score"] for row in second.rows] == [5, 1, 4] and all(row["cached"] for row in second.rows)


def test_malformed_replies_are_retried_then_recorded_as_unparsable_never_scored(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    questions = ("good", "malformed once", "always malformed", "rate limited once", "server error once")
    items = [{"question": q, "reference": "r", "answer": "a"} for q in questions]

    def script(question: str, seen: int):
        if question == "malformed once" and seen == 0:
            return 200, "I would say it is pretty good.", 0.0
        if question == "always malformed":
            return 200, '{"score": 9, "reason": "out of range"}' if seen % 2 else "Score: excellent", 0.0
        if question == "rate limited once" and seen == 0:
            return 429, "slow down", 0.0
        if question == "server error once" and seen == 0:
            return 503, "overloaded", 0.0
        return 200, f"Sure! ```json\n{good(3 if question == 'good' else 4)}\n```", 0.0

    with ScriptedJudge(script) as judge:
        spec = spec_for(judge.url, items_file(tmp_path, items), tmp_path, retries=2)
        del spec["api_key_env"]  # the default, OPENAI_API_KEY, is unset: no Authorization header
        result = run_judge(spec, tmp_path)
        assert {r["authorization"] for r in judge.requests} == {None}
        per_question = [sum(r["question"] == q for r in judge.requests) for q in questions]
        assert per_question == [1, 2, 3, 2, 2]
        rerun = run_judge(spec, tmp_path)
        assert len(judge.requests) == 10  # the unparsable verdict is cached too

    assert [row["status"] for row in result.rows] == ["scored", "scored", "unparsable", "scored", "scored"]
    unparsable = result.rows[2]
    assert unparsable["score"] is None and unparsable["judge_reply"] == "Score: excellent"
    assert "no score" in unparsable["error"]
    assert result.metrics["score_mean"] == pytest.approx((3 + 4 + 4 + 4) / 4)  # the unparsable one left out
    assert (result.metrics["n_scored"], result.metrics["unparsable"], result.metrics["requests"]) == (4.0, 1.0, 10.0)
    assert rerun.metrics["unparsable"] == 1.0 and rerun.metrics["requests"] == 0.0


def test_a_slow_or_unreachable_judge_is_recorded_per_item_and_retried_on_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    path = items_file(tmp_path, QA[:2])
    with ScriptedJudge(lambda question, seen: (200, good(5), 1.0)) as slow:
        started = time.monotonic()
        result = run_judge(spec_for(slow.url, path, tmp_path, timeout_s=0.2, retries=1), tmp_path)
        assert time.monotonic() - started < 3.0
        assert len(slow.requests) == 4  # two attempts per item
    assert [row["status"] for row in result.rows] == ["error", "error"]
    assert "within timeout_s=0.2" in result.rows[0]["error"] and "(2 attempts)" in result.rows[0]["error"]
    assert result.metrics["errors"] == 2.0 and result.metrics["n_scored"] == 0.0
    assert result.metrics["score_mean"] != result.metrics["score_mean"]  # NaN: nothing scored

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
    result = run_judge(spec_for(dead_url, path, tmp_path, retries=2), tmp_path)
    assert [row["status"] for row in result.rows] == ["error", "error"]
    assert "cannot reach" in result.rows[0]["error"] and "ConnectError" in result.rows[0]["error"]
    assert result.metrics["errors"] == 2.0 and result.metrics["requests"] == 6.0

    # errors are not cached: once the judge answers, the same items are judged
    with ScriptedJudge(lambda question, seen: (200, good(SCORES[question]), 0.0)) as judge:
        result = run_judge(spec_for(judge.url, path, tmp_path), tmp_path)
        assert len(judge.requests) == 2
    assert [row["score"] for row in result.rows] == [5, 1]


def test_a_refusal_is_not_retried_and_concurrency_bounds_requests_in_flight(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with ScriptedJudge(lambda question, seen: (401, "bad key", 0.0)) as judge:
        result = run_judge(spec_for(judge.url, items_file(tmp_path, QA[:1]), tmp_path, retries=3), tmp_path)
        assert len(judge.requests) == 1
    assert result.rows[0]["status"] == "error" and "HTTP 401 (not retried)" in result.rows[0]["error"]

    items = [{"question": f"q{i}", "reference": "r", "answer": "a"} for i in range(8)]
    with ScriptedJudge(lambda question, seen: (200, good(2), 0.3)) as judge:
        result = run_judge(spec_for(judge.url, items_file(tmp_path, items), tmp_path, concurrency=3), tmp_path)
        assert judge.max_in_flight == 3
    assert result.metrics["score_2_share"] == 1.0 and result.metrics["n_scored"] == 8.0


def test_the_api_key_reaches_no_file_row_or_metric(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)

    def echoing_server(question: str, seen: int):  # a server that echoes the key in its error bodies
        if question == QA[0]["question"] or not seen:
            return 500, f"bad request with key {SECRET}", 0.0
        return 200, good(4, f"fine, unlike {SECRET}"), 0.0

    with ScriptedJudge(echoing_server) as judge:
        result = run_judge(spec_for(judge.url, items_file(tmp_path, QA), tmp_path, retries=1), tmp_path)
        assert len(judge.requests) == 6
    assert [row["status"] for row in result.rows] == ["error", "scored", "scored"]
    assert "HTTP 500: " in result.rows[0]["error"] and "<redacted>" in result.rows[0]["error"]
    assert result.rows[1]["reason"] == "fine, unlike <redacted>"
    write_jsonl(tmp_path / "stage" / "judge.jsonl", result.rows)
    (tmp_path / "stage" / "metrics.json").write_text(json.dumps(result.metrics))
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.parent.parent.name == "cache" for p in files)  # verdicts were cached
    assert [p for p in files if SECRET.encode() in p.read_bytes()] == []


USER, PASSWORD = "judge-user", "p@ss:w0rd/9f3c2e71"  # characters a URL must escape
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://{quote(USER, safe='')}:{quote(PASSWORD, safe='')}@")


def test_a_password_in_the_url_is_sent_as_basic_auth_and_never_logged_or_recorded(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    caplog.set_level(logging.INFO)  # httpx logs every request's URL at INFO; a run's log and console show INFO

    def echoing_server(question: str, seen: int):  # echoes the credentials it got in its error bodies
        if question == QA[0]["question"]:
            return 500, f"refused {BASIC} for {with_credentials('http://judge')}, password {PASSWORD}", 0.0
        return 200, good(SCORES[question]), 0.0

    with ScriptedJudge(echoing_server) as judge:
        spec = spec_for(with_credentials(judge.url), items_file(tmp_path, QA), tmp_path, retries=1)
        del spec["api_key_env"]
        result = run_judge(spec, tmp_path)
        assert {r["authorization"] for r in judge.requests} == {BASIC} and len(judge.requests) == 4
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
    spec.update(url=with_credentials(dead_url), retries=0)
    unreachable = run_judge(spec, tmp_path)
    assert [row["status"] for row in result.rows] == ["error", "scored", "scored"]
    assert (f"{judge.url}/chat/completions answered HTTP 500: " '{"error": {"message": "refused Basic <redacted> for '
            'http://<redacted>@judge, password <redacted>"}}') in result.rows[0]["error"]
    assert unreachable.rows[0]["error"].startswith(f"cannot reach {dead_url}/chat/completions: ConnectError")
    assert f"HTTP Request: POST {judge.url}/chat/completions" in caplog.text
    write_jsonl(tmp_path / "stage" / "judge.jsonl", result.rows + unreachable.rows)
    (tmp_path / "stage" / "metrics.json").write_text(json.dumps(result.metrics))
    (tmp_path / "stage" / "run.log").write_text(caplog.text)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.parent.parent.name == "cache" for p in files)
    secrets = (PASSWORD, quote(PASSWORD, safe=""), BASIC.split()[1])
    assert [(p, s) for p in files for s in secrets if s.encode() in p.read_bytes()] == []


def test_answers_missing_from_the_items_are_written_by_the_evaluated_model(tiny_checkpoint, tmp_path, monkeypatch):
    from llmexp.data.instructions import format_prompt
    from llmexp.models.loading import load_model
    from llmexp.plugins.evaluate.harness.scoring import Scorer

    monkeypatch.setenv(KEY_ENV, SECRET)
    model, tokenizer = load_model(tiny_checkpoint)[:2]
    scorer = Scorer(model, tokenizer, max_new_tokens=40)
    asked = "in which town is the house of Dorfen ?"  # words the embedded tokenizer knows
    items = [{"question": asked, "reference": "Berg"}, QA[1]]
    with ScriptedJudge(lambda question, seen: (200, good(5 if question == asked else 1), 0.0)) as judge:
        spec = spec_for(judge.url, items_file(tmp_path, items), tmp_path, max_new_tokens=6)
        result = run_judge(spec, tmp_path, scorer)
        sent = judge.requests[[r["question"] for r in judge.requests].index(asked)]
    expected = scorer.generate([format_prompt(asked, tokenizer)], ["\n\n"], max_new_tokens=6)[0].strip()
    assert expected
    assert [row["answer_source"] for row in result.rows] == ["generated", "given"]
    assert result.rows[0]["answer"] == expected
    assert f"Answer to grade: {expected}\n" in sent["body"]["messages"][-1]["content"]
    assert [row["score"] for row in result.rows] == [5, 1]


def test_templates_parse_json_and_regex_replies_and_refuse_bad_ones(tmp_path):
    faithfulness = load_template("faithfulness")
    assert faithfulness.placeholders == {"question", "reference", "answer"}
    assert faithfulness.parse('{"score": 4, "reason": "close"}').score == 4
    assert faithfulness.parse('Here: {"note": 1} then {"score": "5", "reason": "same"}').reason == "same"
    assert faithfulness.parse('{"score": 4.0}').score == 4
    for bad in ('{"score": 6, "reason": "x"}', '{"score": "high"}', '{"score": true}', "4", ""):
        assert faithfulness.parse(bad) is None, bad
    correctness = load_template("correctness")
    verdict = correctness.parse("The answer matches.\nReason: it names Alice.\nScore: 5")
    assert (verdict.score, verdict.reason) == (5, "it names Alice.")
    assert correctness.parse("Score: 0") is None

    custom = tmp_path / "mine.yaml"
    custom.write_text("user: 'Q: {question} A: {answer} yes or no?'\nreply: regex\nscore_regex: '(yes|no)'\n")
    assert load_template(str(custom)).parse("yes") is None  # a score is a whole number, never a word mapped to one
    custom.write_text("user: 'Q: {question} A: {answer}. 0 or 1?'\nreply: regex\nscore_regex: '([01])'\nscore_range: [0, 1]\n")
    template = load_template(str(custom))
    assert template.placeholders == {"question", "answer"} and template.parse("1").score == 1
    custom.write_text("user: 'Q: {question} {context}'\n")
    with pytest.raises(UserError, match=r"\{context\}"):
        load_template(str(custom))
    custom.write_text("user: 'reply {\"score\": 1}'\n")
    with pytest.raises(UserError, match="literal braces"):
        load_template(str(custom))
    with pytest.raises(UserError, match="faithfulness"):
        load_template("no_such_template")


def test_a_template_nested_too_deeply_or_not_text_stops_the_plan_with_exit_2_naming_the_file(tiny_checkpoint,
                                                                                             tmp_path):
    from tests.conftest import run_llmexp

    deep, binary = tmp_path / "deep.yaml", tmp_path / "binary.yaml"
    deep.write_text("user: " + "[" * 5000 + "]" * 5000 + "\n")
    binary.write_bytes(b"user: \xff\xfe judge {answer}\n")
    with pytest.raises(UserError, match=f"{deep}: nested too deeply to parse as YAML"):
        load_template(str(deep))
    with pytest.raises(UserError, match=f"{binary}: cannot be read as UTF-8 text"):
        load_template(str(binary))
    path = items_file(tmp_path, QA)
    tasks = f'technique.tasks=[{{type: judge, path: {path}, url: "http://127.0.0.1:9/v1", model: m, template: {deep}}}]'
    done = run_llmexp("plan", "technique=evaluate", f"model.path={tiny_checkpoint}", tasks, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout
    assert f"technique.tasks[0].template: {deep}: nested too deeply to parse as YAML" in " ".join(done.stdout.split())


def test_problems_name_the_field_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    path = items_file(tmp_path, QA)
    found = JUDGE.problems({"type": "judge", "path": path, "url": "127.0.0.1:8000", "api_key_env": KEY_ENV,
                            "concurrency": 0, "template": "nope"}, "technique.tasks[1]")
    assert len(found) == 5
    assert found[0].startswith("technique.tasks[1].url='127.0.0.1:8000'")
    assert "technique.tasks[1].model=None" in found[1]
    assert found[2].startswith("technique.tasks[1].template:")
    assert f"api_key_env={KEY_ENV}: that environment variable is not set" in found[3]
    assert "concurrency=0" in found[4]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(QA[0]) + "\n" + json.dumps({"question": "q", "answer": "a"}) + "\n")
    (message,) = JUDGE.problems({"type": "judge", "path": str(broken), "url": "http://x/v1", "model": "m"}, "t")
    assert f"{broken}:2: reference missing" in message
    assert len(load_items(str(broken), frozenset({"question", "answer"}))) == 2  # a template without {reference}


def test_a_judge_url_that_is_not_http_is_refused_without_its_password(tiny_checkpoint, tmp_path):
    from tests.conftest import run_llmexp

    tasks = (f'technique.tasks=[{{type: judge, path: {items_file(tmp_path, QA)}, url: "ftp://judge:pw-8d2c1f@host/v1", '
             "model: m}]")
    done = run_llmexp("plan", "technique=evaluate", f"model.path={tiny_checkpoint}", tasks, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout
    assert "technique.tasks[0].url='ftp://<redacted>@host/v1' must be the judge endpoint's base URL" in done.stdout
    assert "pw-8d2c1f" not in done.stdout + done.stderr


def test_judging_with_the_tiny_model_served_by_llmexp_serve_records_replies_as_unparsable(tiny_checkpoint, tmp_path):
    """End to end over ``llmexp serve``: random weights write no score, and that is what the rows must say."""
    import uvicorn

    from llmexp.serving.app import create_app
    from llmexp.serving.engine import Engine
    from llmexp.serving.served_models import load_served_models

    served = load_served_models(tiny_checkpoint, name="tiny-judge")
    engine = Engine(served)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        spec = {"type": "judge", "url": url, "model": "tiny-judge", "path": items_file(tmp_path, QA[:2]),
                "cache_dir": str(tmp_path / "cache"), "retries": 1, "backoff_s": 0.01, "judge_max_tokens": 12}
        result = run_judge(spec, tmp_path)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.close()
    assert [row["status"] for row in result.rows] == ["unparsable", "unparsable"], result.rows[0]["error"]
    assert all(isinstance(row["judge_reply"], str) and row["score"] is None for row in result.rows)
    assert (result.metrics["unparsable"], result.metrics["n_scored"], result.metrics["requests"]) == (2.0, 0.0, 4.0)
    assert math.isnan(result.metrics["score_mean"])


@pytest.mark.slow
@pytest.mark.parametrize("credentials", ["key", "password in the url"])
def test_an_evaluation_run_keeps_the_credentials_out_of_every_file_and_records_each_task(credentials, tiny_checkpoint,
                                                                                         tmp_path):
    """``llmexp technique=evaluate`` with a judge task (and a code task beside it), as a user runs it: with an API
    key from the environment, or a password in the judge's URL (which httpx's request log would show)."""
    from tests.conftest import read_results, run_llmexp

    code = Path(__file__).parent / "fixtures" / "humaneval_mini.jsonl"
    with ScriptedJudge(lambda question, seen: (200, good(SCORES[question]), 0.0)) as judge:
        access = f"api_key_env: {KEY_ENV}, " if credentials == "key" else ""
        url = judge.url if credentials == "key" else with_credentials(judge.url)
        tasks = (
            f'technique.tasks=[{{type: judge, name: qa_judge, path: {items_file(tmp_path, QA)}, url: "{url}", '
            f"model: judge-model, {access}backoff_s: 0.01}}, "
            f"{{type: code, path: {code}, limit: 2, max_new_tokens: 8, timeout_s: 5}}]"
        )
        env = {KEY_ENV: SECRET, "LLMEXP_CACHE": str(tmp_path / "cache")}
        done = run_llmexp("technique=evaluate", f"model.path={tiny_checkpoint}", tasks, cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        expected = f"Bearer {SECRET}" if credentials == "key" else BASIC
        assert {r["authorization"] for r in judge.requests} == {expected} and len(judge.requests) == 3
    (run_dir,) = [path.parent for path in tmp_path.glob("outputs/*/*/results.json")]
    metrics = read_results(run_dir)["stages"]["evaluate"]["metrics"]
    assert metrics["qa_judge_score_mean"] == pytest.approx(10 / 3) and metrics["qa_judge_n_scored"] == 3.0
    assert metrics["code_pass_at_1"] == 0.0 and metrics["code_n"] == 2  # random weights write no working code
    rows = [json.loads(line) for line in (run_dir / "evaluate" / "qa_judge.jsonl").read_text().splitlines()]
    assert [row["score"] for row in rows] == [5, 1, 4]
    assert list((tmp_path / "cache" / "judge").rglob("*.json"))  # the default cache: $LLMEXP_CACHE/judge
    assert f"HTTP Request: POST {judge.url}/chat/completions" in (run_dir / "llmexp.log").read_text()
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    secrets = (SECRET, PASSWORD, quote(PASSWORD, safe=""), BASIC.split()[1])
    assert [(path, secret) for path in files for secret in secrets if secret.encode() in path.read_bytes()] == []
    assert not any(secret in done.stdout + done.stderr for secret in secrets)


@pytest.mark.parametrize("technique", ["judge", "benchmark"])
def test_a_key_the_job_sets_through_env_set_counts_for_the_plan(technique, tmp_path, tiny_checkpoint):
    """Hydra exports ``hydra.job.env_set`` only when the job starts; the plan, made before, counts it as set."""
    from tests.conftest import run_llmexp

    if technique == "judge":
        chosen = ["technique=evaluate", "technique.tasks=[{type: judge, path: " + items_file(tmp_path, QA)
                  + ", url: 'http://127.0.0.1:9/v1', model: m, api_key_env: PLAN_KEY}]"]
    else:
        chosen = ["technique=benchmark", "technique.target=endpoint", "technique.url=http://127.0.0.1:9",
                  f"technique.tokenizer={tiny_checkpoint}", "technique.api_key_env=PLAN_KEY"]
    common = ["plan", *chosen, f"model.path={tiny_checkpoint}"]
    refused = run_llmexp(*common, cwd=tmp_path)
    assert refused.returncode == 2 and "api_key_env=PLAN_KEY" in refused.stdout + refused.stderr
    planned = run_llmexp(*common, "+hydra.job.env_set.PLAN_KEY=sk-set-for-the-job", cwd=tmp_path)
    assert planned.returncode == 0, planned.stdout + planned.stderr
