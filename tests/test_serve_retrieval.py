"""``llmexp serve`` with a retriever, over real HTTP on loopback: answers generated from the retrieved passages put in
front of the question, the passages returned as ``sources`` (plain and streamed), per-request ``retrieval``
settings and their 4xx, searching off the event loop, and the command's retriever options."""

from __future__ import annotations

import json
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

from llmexp.configuration.compose import compose_config
from llmexp.models.loading import save_model
from llmexp.retrieval import build_retriever
from llmexp.serving.app import create_app
from llmexp.serving.chat import chat_prompt_ids
from llmexp.serving.engine import Engine
from llmexp.serving.retrieval_augmented import MAX_TOP_K, RetrievalAugmentation
from llmexp.serving.served_models import load_served_models
from tests.test_serve import refusal, run_serve, serve_in_thread, sse_events
from tests.test_serving_engine import build_varied_model, generate_alone

NAME = "varied"
TOP_K = 2
# one person per document, in the three formats documents come in; written with the served tokenizer's words
DOCUMENTS = {
    "rika_tador.txt": "Rika Tador lives in Solanville . Rika Tador works as a baker and loves honey .",
    "towns/gugu_fenta.md": "Gugu Fenta lives in Karenmouth . Gugu Fenta works as a pilot and owns a parrot .",
    "more.jsonl": "\n".join(json.dumps(line) for line in (
        {"id": "loka_mibel", "text": "Loka Mibel lives in Tevoville . Loka Mibel works as a sailor and eats rice ."},
        {"id": "yaan_belan", "text": "Yaan Belan lives in Kateford . Yaan Belan works as a judge and wears silver ."},
    )),
}
QUESTION = "Question: where does Gugu Fenta live ?\nAnswer:"


def write_documents(root):
    for name, text in DOCUMENTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n", encoding="utf-8")
    return root


def reference_text(served, prompt: str, max_tokens: int) -> str:
    """What plain ``generate`` continues ``prompt`` with, greedy."""
    tokens = generate_alone(served.model, served.tokenizer, prompt, max_tokens)
    return served.tokenizer.decode(tokens, skip_special_tokens=True)


def in_context(prompt: str, sources) -> str:
    """The prompt the model must have been given: the contract's ``with_context`` format, from the response's sources."""
    return "Context: " + " ".join(source["text"] for source in sources) + "\n" + prompt


@pytest.fixture(scope="module")
def rag(tmp_path_factory):
    """The varied model served with a BM25 retriever over DOCUMENTS (and, on the same engine, without one)."""
    root = tmp_path_factory.mktemp("serve_retrieval")
    documents = write_documents(root / "documents")
    model, tokenizer = build_varied_model()
    save_model(model, tokenizer, root / NAME)
    cfg = compose_config(["retriever=bm25", f"retriever.documents={documents}", f"retriever.top_k={TOP_K}"])
    retriever = build_retriever(cfg, root / "index")
    served = load_served_models(root / NAME)
    engine = Engine(served, max_batch_size=4, max_queue=8)
    retrieval = RetrievalAugmentation(retriever, TOP_K)
    with serve_in_thread(create_app(engine, retrieval=retrieval)) as url, \
            serve_in_thread(create_app(engine)) as plain_url, \
            httpx.Client(base_url=url, timeout=60) as client, httpx.Client(base_url=plain_url, timeout=60) as plain:
        yield SimpleNamespace(client=client, plain=plain, engine=engine, served=served, retriever=retriever,
                              root=root, documents=documents)
    retrieval.close()
    engine.close()


def complete(client, **fields):
    response = client.post("/v1/completions", json={"model": NAME, "prompt": QUESTION, "max_tokens": 8,
                                                    "temperature": 0, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_completion_is_generated_from_the_passages_of_the_person_asked_about(rag):
    body = complete(rag.client)
    sources = body["sources"]
    assert [source["document"] for source in sources][0] == "towns/gugu_fenta.md"
    assert len(sources) == TOP_K and sources[0]["score"] > sources[1]["score"]
    assert sources[0]["text"] == DOCUMENTS["towns/gugu_fenta.md"] and sources[0]["id"].startswith("towns/gugu_fenta.md#")
    [expected] = rag.retriever.search([QUESTION], TOP_K)
    assert [source["id"] for source in sources] == [hit.passage.id for hit in expected]
    prompt = in_context(QUESTION, sources)
    # what the model was given: the passages in front of the question, token for token (usage and the greedy text)
    assert body["usage"]["prompt_tokens"] == len(rag.served.tokenizer(prompt)["input_ids"])
    assert body["choices"][0]["text"] == reference_text(rag.served, prompt, 8)
    assert body["choices"][0]["text"] != reference_text(rag.served, QUESTION, 8)


def test_a_streamed_completion_carries_the_sources_in_its_first_event(rag):
    plain = complete(rag.client)
    with rag.client.stream("POST", "/v1/completions", json={
            "model": NAME, "prompt": QUESTION, "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        events, done = sse_events(response)
    assert done
    *chunks, usage = events
    assert chunks[0]["sources"] == plain["sources"]
    assert all("sources" not in event for event in events[1:])
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == plain["choices"][0]["text"]
    assert usage["usage"] == plain["usage"]


def test_chat_puts_the_passages_in_the_last_user_message_and_streams_them_first(rag):
    messages = [{"role": "user", "content": "where does Rika Tador live ?"}, {"role": "assistant", "content": "Solanville"},
                {"role": "user", "content": "what is the job of Loka Mibel ?"}]
    request = {"model": NAME, "messages": messages, "max_tokens": 6, "temperature": 0}
    body = rag.client.post("/v1/chat/completions", json=request).json()
    sources = body["sources"]
    assert sources[0]["document"] == "loka_mibel"  # searched with the last user message, not the first
    given = [*messages[:2], {"role": "user", "content": in_context(messages[2]["content"], sources)}]
    assert body["usage"]["prompt_tokens"] == len(chat_prompt_ids(given, rag.served.tokenizer))
    with rag.client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as response:
        events, done = sse_events(response)
    assert done and events[0]["sources"] == sources and all("sources" not in event for event in events[1:])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == body["choices"][0]["message"]["content"]


def test_a_request_sets_its_own_top_k_or_turns_retrieval_off(rag):
    default = complete(rag.client)
    one = complete(rag.client, retrieval={"top_k": 1})
    assert one["sources"] == default["sources"][:1]
    assert one["usage"]["prompt_tokens"] == len(rag.served.tokenizer(in_context(QUESTION, one["sources"]))["input_ids"])
    off = complete(rag.client, retrieval=False)
    assert "sources" not in off
    assert off["usage"]["prompt_tokens"] == len(rag.served.tokenizer(QUESTION)["input_ids"])
    assert off["choices"][0]["text"] == reference_text(rag.served, QUESTION, 8)
    assert complete(rag.client, retrieval=True)["sources"] == default["sources"]


@pytest.mark.parametrize("value, fragment", [
    ({"top_k": 0}, "retrieval.top_k=0: give a whole number from 1"),
    ({"top_k": MAX_TOP_K + 1}, f"retrieval.top_k={MAX_TOP_K + 1}"),
    ({"top_k": "3"}, "retrieval.top_k=\"3\""),
    ({"top_k": 2.0}, "retrieval.top_k=2.0"),
    ({"top_k": True}, "retrieval.top_k=true"),
    ({"k": 3}, "retrieval={\"k\": 3}: give {\"top_k\": N}"),
    ("yes", "retrieval=\"yes\""),
    (None, "retrieval=null"),
])
def test_a_bad_retrieval_field_gets_400_naming_it(rag, value, fragment):
    response = rag.client.post("/v1/completions", json={"model": NAME, "prompt": QUESTION, "retrieval": value})
    assert response.status_code == 400
    error = response.json()["error"]
    assert fragment in error["message"] and error["param"].startswith("retrieval")
    assert rag.client.get("/health").status_code == 200


def test_requests_retrieval_cannot_serve_get_400_and_a_server_without_a_retriever_refuses_one(rag):
    ids = rag.client.post("/v1/completions", json={"model": NAME, "prompt": [5, 6, 7], "max_tokens": 2})
    assert ids.status_code == 400 and "token ids" in ids.json()["error"]["message"]
    assert complete(rag.client, prompt=[5, 6, 7], retrieval=False)["choices"][0]["text"] is not None
    no_user = rag.client.post("/v1/chat/completions", json={"model": NAME, "messages": [
        {"role": "system", "content": "be brief"}]})
    assert no_user.status_code == 400 and "no user message" in no_user.json()["error"]["message"]
    asked = rag.plain.post("/v1/completions", json={"model": NAME, "prompt": QUESTION, "retrieval": {"top_k": 2}})
    assert asked.status_code == 400 and "no retriever attached" in asked.json()["error"]["message"]
    assert "sources" not in complete(rag.plain) and "sources" not in complete(rag.plain, retrieval=False)


def test_passages_that_push_the_prompt_past_the_context_get_a_400_saying_so(rag):
    room = rag.served.context_length - len(rag.served.tokenizer(QUESTION)["input_ids"])  # fits without passages
    response = rag.client.post("/v1/completions", json={"model": NAME, "prompt": QUESTION, "max_tokens": room})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "max_tokens" and f"holds {TOP_K} retrieved passages" in error["message"]


class HeldRetriever:
    """The real retriever, waiting at each search until released: what the server does meanwhile is observable."""

    def __init__(self, retriever) -> None:
        self.retriever = retriever
        self.searching = threading.Event()
        self.release = threading.Event()

    def search(self, queries, k=None):
        self.searching.set()
        assert self.release.wait(60)
        return self.retriever.search(queries, k)


def test_a_search_in_progress_blocks_no_other_request(rag):
    held = HeldRetriever(rag.retriever)
    retrieval = RetrievalAugmentation(held, TOP_K)
    with serve_in_thread(create_app(rag.engine, retrieval=retrieval)) as url, \
            httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(complete, client)
        assert held.searching.wait(30)
        assert client.get("/health").json() == {"status": "ok"}
        assert "sources" not in complete(client, retrieval=False)  # generated while the search is held
        assert not waiting.done()
        held.release.set()
        assert waiting.result(timeout=60)["sources"] == complete(rag.client)["sources"]
    retrieval.close()


def test_the_command_serves_with_a_retriever_and_keeps_its_index_in_index_dir(rag, tmp_path):
    index = tmp_path / "index"
    process = run_serve(str(rag.root / NAME), "--port", "0", "retriever=bm25", f"retriever.documents={rag.documents}",
                        "--index-dir", str(index), "retriever.top_k=1")
    try:
        line = process.stdout.readline()
        assert line.startswith("llmexp serve: http://127.0.0.1:") and "retriever: bm25 top_k 1" in line, line
        url = line.split()[2]
        body = httpx.post(f"{url}/chat/completions", timeout=60, json={
            "model": NAME, "messages": [{"role": "user", "content": "what does Yaan Belan wear ?"}], "max_tokens": 4})
        assert [source["document"] for source in body.json()["sources"]] == ["yaan_belan"]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.communicate()
    assert json.loads((index / "manifest.json").read_text())["passages"] == len(rag.retriever.passages)


def test_the_command_refuses_bad_retriever_settings_before_it_binds(rag):
    with socket.socket() as busy:  # a taken port: a refusal naming the retriever was given before binding
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        missing = refusal(str(rag.root / NAME), "--port", port, "retriever=bm25",
                          f"retriever.documents={rag.root / 'no_such_documents'}")
        typo = refusal(str(rag.root / NAME), "--port", port, "retriever=bm25", "retriever.topk=3")
        without = refusal(str(rag.root / NAME), "--port", port, "--index-dir", str(rag.root / "index"))
    assert missing.returncode == 2 and "retriever.documents=" in missing.stderr and "does not exist" in missing.stderr
    assert typo.returncode == 2 and "retriever.topk" in typo.stderr
    assert without.returncode == 2 and "no retriever is given" in without.stderr
    for result in (missing, typo, without):
        assert "cannot listen there" not in result.stderr and "Traceback" not in result.stderr
