"""Retrieval: documents, chunking, BM25 / dense / hybrid / re-ranked search, the cached index, metrics, plan checks,
and the ``retrieval`` evaluation task. Encoders and cross-encoders are tiny ones built here (no download)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmexp.configuration.compose import compose_config
from llmexp.configuration.retrieval import retriever_problems
from llmexp.data.embedded import RELATIONS, STATEMENTS, build_world
from llmexp.errors import UserError
from llmexp.plugins.evaluate.harness.registry import resolve_tasks, run_task
from llmexp.plugins.evaluate.tasks.retrieval import embedded_questions, problems as task_problems
from llmexp.retrieval import Document, Hit, Passage, build_retriever, chunk, documents_for, read_documents, \
    retrieval_metrics, with_context
from llmexp.retrieval.dense import DenseRanking
from llmexp.retrieval.fusion import reciprocal_rank_fusion
from llmexp.retrieval.reranking import Reranker
from llmexp.retrieval.retriever import Retriever
from llmexp.sdk import TaskInputs

WORLD = build_world()


def _config(*overrides):
    return compose_config(["technique=evaluate", *overrides])


@pytest.fixture
def corpus(tmp_path):
    """A folder of each format: a text file, a Markdown file in a subfolder, and JSONL documents."""
    (tmp_path / "docs" / "guides").mkdir(parents=True)
    (tmp_path / "docs" / "llamas.txt").write_text("Llamas are domesticated camelids from the Andes.\n")
    (tmp_path / "docs" / "guides" / "tea.md").write_text("# Tea\n\nGreen tea is steamed, black tea oxidised.\n")
    lines = [{"id": "volcano", "text": "Volcanoes erupt magma and ash.", "title": "Geology"},
             {"id": 7, "text": "Seven is a prime number."}]
    (tmp_path / "docs" / "facts.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    return tmp_path / "docs"


# -- documents and passages ----------------------------------------------------------------------------

def test_documents_of_every_format_with_ids_relative_to_the_folder(corpus):
    documents = read_documents(corpus)
    assert [d.id for d in documents] == ["volcano", "7", "guides/tea.md", "llamas.txt"]
    assert documents[0] == Document("volcano", "Volcanoes erupt magma and ash.", "Geology")
    assert read_documents(corpus / "llamas.txt") == [Document("llamas.txt", "Llamas are domesticated camelids from the Andes.")]


def test_bad_documents_are_user_errors_naming_the_field(tmp_path, corpus):
    with pytest.raises(UserError, match=r"retriever.documents=.*nope does not exist"):
        read_documents(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    with pytest.raises(UserError, match=r"retriever.documents=.*empty holds no documents"):
        read_documents(tmp_path / "empty")
    (corpus / "facts.jsonl").write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": \n')
    with pytest.raises(UserError, match=r"retriever.documents: .*facts.jsonl:2: not valid JSON"):
        read_documents(corpus)
    (corpus / "facts.jsonl").write_text('{"id": "a", "text": "fine"}\n{"id": "b", "body": "x"}\n')
    with pytest.raises(UserError, match=r"facts.jsonl:2: a document needs a string \"id\" and \"text\""):
        read_documents(corpus)
    (corpus / "facts.jsonl").write_text('{"id": "llamas.txt", "text": "again"}\n')
    with pytest.raises(UserError, match="two documents have the id 'llamas.txt'"):
        read_documents(corpus)


def test_chunking_windows_overlap_and_cover_the_last_word():
    words = " ".join(f"w{i}" for i in range(10))
    passages = chunk([Document("d", words)], chunk_words=4, chunk_overlap=1)
    assert [p.text for p in passages] == ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]
    assert [p.id for p in passages] == ["d#0", "d#1", "d#2"] and {p.document for p in passages} == {"d"}
    assert [p.text for p in chunk([Document("d", words)], 4, 0)] == ["w0 w1 w2 w3", "w4 w5 w6 w7", "w8 w9"]
    assert [p.text for p in chunk([Document("d", "a b c", "T")], 4, 2)] == ["T. a b c"]
    with pytest.raises(UserError, match="chunk_overlap=4"):
        chunk([Document("d", words)], 4, 4)


def test_embedded_documents_state_each_fact_once_with_the_first_template():
    documents = WORLD.documents()
    assert list(documents) == WORLD.people and documents == build_world().documents()
    for fact in WORLD.facts:
        statement = STATEMENTS[fact.relation][0].format(p=fact.person, v=fact.value)
        assert documents[fact.person].count(statement) == 1
    assert all(len(text.split(" . ")) == len(RELATIONS) for text in documents.values())
    assert [d.id for d in documents_for(_config("retriever=bm25"))] == WORLD.people


def test_with_context_is_the_fixed_reader_format():
    hits = [Hit(Passage("a#0", "a", "one ."), 2.0), Hit(Passage("b#0", "b", "two ."), 1.0)]
    assert with_context("Question: q ?\nAnswer:", hits) == "Context: one . two .\nQuestion: q ?\nAnswer:"


# -- metrics and fusion ----------------------------------------------------------------------------------

def test_metrics_by_hand_and_against_sklearn():
    ranked = [["a", "b", "c"], ["x", "a", "a", "y"], ["q", "r"]]
    relevant = [{"a"}, {"a", "y"}, {"z"}]
    metrics = retrieval_metrics(ranked, relevant, ks=(1, 2))
    assert metrics["recall_at_1"] == pytest.approx((1 + 0 + 0) / 3)
    assert metrics["recall_at_2"] == pytest.approx((1 + 0.5 + 0) / 3)  # "a" counted once: y is third, not fourth
    assert metrics["mrr"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    ndcg_2 = (1 + (1 / math.log2(3)) / (1 + 1 / math.log2(3)) + 0) / 3
    assert metrics["ndcg_at_2"] == pytest.approx(ndcg_2)

    from sklearn.metrics import ndcg_score

    rng = np.random.default_rng(0)
    documents = [f"d{i}" for i in range(12)]
    rankings = [list(rng.permutation(documents)) for _ in range(20)]
    wanted = [set(rng.choice(documents, size=int(rng.integers(1, 4)), replace=False)) for _ in range(20)]
    truth = np.array([[d in w for d in documents] for w in wanted], dtype=float)
    scores = np.array([[len(documents) - r.index(d) for d in documents] for r in rankings], dtype=float)
    for k in (1, 5, 10):
        assert retrieval_metrics(rankings, wanted, ks=(k,))[f"ndcg_at_{k}"] == pytest.approx(ndcg_score(truth, scores, k=k))


def test_reciprocal_rank_fusion_by_hand():
    fused = reciprocal_rank_fusion([[3, 1, 2], [1, 4]], rrf_k=60)
    assert [item for item, _ in fused] == [1, 3, 4, 2]
    assert dict(fused)[1] == pytest.approx(1 / 62 + 1 / 61) and dict(fused)[4] == pytest.approx(1 / 62)


# -- BM25, the cached index --------------------------------------------------------------------------------

def test_bm25_finds_the_embedded_questions_sources(tmp_path):
    cfg = _config("retriever=bm25")
    retriever = build_retriever(cfg, tmp_path / "index")
    questions = embedded_questions(WORLD)
    hits = retriever.search([q for q, _ in questions], k=10)
    assert all(len(row) == 10 for row in hits) and len(retriever.search(["where does Kalo live ?"])[0]) == 5
    assert retriever.search([]) == []
    metrics = retrieval_metrics([[h.passage.document for h in row] for row in hits], [set(s) for _, s in questions])
    assert metrics["recall_at_5"] >= 0.9
    index = retriever.rankings[0].index
    assert (index.k1, index.b) == (1.5, 0.75)


def test_the_index_is_reused_while_its_lineage_matches(tmp_path, corpus):
    cfg = _config("retriever=bm25", f"retriever.documents={corpus}", "retriever.chunk_words=4", "retriever.chunk_overlap=1")
    directory = tmp_path / "index"
    first = build_retriever(cfg, directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["passages"] == len(first.passages) and manifest["retriever"]["name"] == "bm25"
    inode = directory.stat().st_ino
    top = [h.passage.id for h in first.search(["green tea"])[0]]
    assert top[0].startswith("guides/tea.md#")

    again = build_retriever(_config(*cfg_overrides(cfg), "retriever.top_k=2"), directory)  # a search setting: kept
    assert directory.stat().st_ino == inode and [h.passage.id for h in again.search(["green tea"])[0]] == top[:2]

    (corpus / "llamas.txt").write_text("Llamas hum; green tea is their favourite drink, green tea always.\n")
    changed = build_retriever(cfg, directory)
    assert directory.stat().st_ino != inode
    assert json.loads((directory / "manifest.json").read_text())["documents"] != manifest["documents"]
    assert "Llamas hum; green tea" in [p.text for p in changed.passages]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def cfg_overrides(cfg):
    return [f"retriever.documents={cfg.retriever.documents}", "retriever=bm25", "retriever.chunk_words=4",
            "retriever.chunk_overlap=1"]


# -- dense, hybrid, re-ranking with tiny local models -------------------------------------------------------

def _tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *sorted(set(words))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]"), len(vocab)


def _bert(directory: Path, num_labels=None):
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    tokenizer, size = _tokenizer(" ".join([*WORLD.documents().values(), *(q for q, _ in embedded_questions(WORLD))]).split())
    config = BertConfig(vocab_size=size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=num_labels or 2)
    torch.manual_seed(0)
    (BertForSequenceClassification(config) if num_labels else BertModel(config)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny sentence-transformers encoder (one BERT layer, mean pooling) saved as a directory."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    root = tmp_path_factory.mktemp("encoder")
    word = Transformer(str(_bert(root / "bert")))
    SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), "mean")]).save(str(root / "st"))
    return root / "st"


def test_dense_ranking_is_exact_cosine_search(encoder_dir):
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(str(encoder_dir), local_files_only=True)
    texts = list(WORLD.documents().values())
    queries = [q for q, _ in embedded_questions(WORLD)[:12]]
    ranked = DenseRanking.build(encoder, texts, batch_size=8).rank(queries, depth=5)
    passages, asked = encoder.encode(texts), encoder.encode(queries)
    cosine = (asked / np.linalg.norm(asked, axis=1, keepdims=True)) @ (passages / np.linalg.norm(passages, axis=1, keepdims=True)).T
    for row, expected in zip(ranked, cosine):
        assert [i for i, _ in row] == list(np.argsort(-expected)[:5])
        assert [s for _, s in row] == pytest.approx(sorted(expected, reverse=True)[:5], abs=1e-5)


def test_dense_and_hybrid_retrievers_from_an_encoder_directory(tmp_path, encoder_dir):
    questions = [q for q, _ in embedded_questions(WORLD)[:20]]
    dense = build_retriever(_config("retriever=dense", f"retriever.encoder={encoder_dir}"), tmp_path / "dense")
    bm25 = build_retriever(_config("retriever=bm25"), tmp_path / "bm25")
    hybrid_cfg = _config("retriever=hybrid", f"retriever.encoder={encoder_dir}", "retriever.rrf_k=10")
    hybrid = build_retriever(hybrid_cfg, tmp_path / "hybrid")
    assert json.loads((tmp_path / "hybrid" / "manifest.json").read_text())["encoder"]["spec"] == str(encoder_dir)
    index = {p.id: i for i, p in enumerate(hybrid.passages)}
    both = [[[index[h.passage.id] for h in row if r is dense or h.score > 0] for row in r.search(questions, k=30)]
            for r in (bm25, dense)]  # fusion takes BM25's matching passages only
    for got, sparse, near in zip(hybrid.search(questions, k=5), *both):
        assert [index[h.passage.id] for h in got] == [i for i, _ in reciprocal_rank_fusion([sparse, near], 10)[:5]]
    again = build_retriever(hybrid_cfg, tmp_path / "hybrid")  # loaded: same answers
    assert [[h.passage.id for h in row] for row in again.search(questions)] == \
        [[h.passage.id for h in row] for row in hybrid.search(questions)]


def test_a_cross_encoder_reorders_the_first_candidates(tmp_path):
    from sentence_transformers import CrossEncoder

    directory = _bert(tmp_path / "cross", num_labels=1)
    cfg = _config("retriever=bm25", f"retriever.reranker={directory}", "retriever.rerank_candidates=8", "retriever.top_k=3")
    reranked = build_retriever(cfg, tmp_path / "index")
    plain = Retriever(reranked.passages, reranked.rankings, top_k=8)
    query = embedded_questions(WORLD)[0][0]
    candidates = plain.search([query])[0]
    scores = CrossEncoder(str(directory), local_files_only=True).predict([(query, h.passage.text) for h in candidates])
    expected = [candidates[i].passage.id for i in np.argsort(-scores, kind="stable")[:3]]
    got = reranked.search([query])[0]
    assert [h.passage.id for h in got] == expected
    assert [h.score for h in got] == pytest.approx(sorted(scores, reverse=True)[:3], abs=1e-6)
    assert isinstance(reranked.reranker, Reranker)


# -- plan-time checks ----------------------------------------------------------------------------------------

def test_plan_refuses_bad_retriever_settings(tmp_path):
    assert retriever_problems(_config("retriever=bm25")) == []
    assert retriever_problems(_config("retriever=none", "technique.limit=1")) == []
    found = " ".join(retriever_problems(_config(
        "retriever=hybrid", "retriever.chunk_words=8", "retriever.chunk_overlap=8", "retriever.top_k=0",
        f"retriever.reranker={tmp_path}/no-reranker", f"retriever.encoder={tmp_path}/no-encoder")))
    for expected in ("retriever.chunk_overlap=8 with retriever.chunk_words=8", "retriever.top_k=0 must be at least 1",
                     "retriever.reranker=", "retriever.encoder="):
        assert expected in found


def test_plan_names_the_rag_extra_when_a_retrievers_library_is_missing(monkeypatch, tmp_path):
    from llmexp.configuration import retrieval

    monkeypatch.setattr(retrieval, "importable", lambda module: module not in {"faiss", "sentence_transformers"})
    assert retriever_problems(_config("retriever=bm25")) == []
    assert retriever_problems(_config("retriever=bm25", f"retriever.reranker={tmp_path}")) == [
        "retriever=bm25 needs sentence_transformers, which this environment lacks: pip install 'llmexp[rag]', "
        "or retriever=none."]
    assert "needs faiss, sentence_transformers" in retriever_problems(_config("retriever=dense"))[0]


def test_llmexp_plan_names_a_missing_documents_path():
    done = subprocess.run([sys.executable, "-m", "llmexp", "plan", "retriever=bm25", "retriever.documents=/nope"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "retriever.documents=/nope does not exist" in done.stdout + done.stderr
    assert "retriever.documents=null" in done.stdout + done.stderr


# -- the retrieval evaluation task ------------------------------------------------------------------------------

def test_the_retrieval_task_on_the_embedded_questions(tmp_path):
    tasks, found = resolve_tasks(["retrieval"], None, "technique.tasks")
    assert not found
    inputs = TaskInputs(world=WORLD, stage_dir=str(tmp_path), config=_config("retriever=bm25"))
    result = run_task(tasks[0], inputs, scorer=None)
    assert set(result.metrics) == {"recall_at_1", "recall_at_5", "recall_at_10", "mrr", "ndcg_at_10"}
    assert result.metrics["recall_at_5"] >= 0.9 and len(result.rows) == len(WORLD.facts)
    row = result.rows[0]
    assert row["sources"] == [WORLD.facts[0].person] and row["retrieved"][0] == WORLD.facts[0].person
    assert sum(r["correct"] for r in result.rows) / len(result.rows) == pytest.approx(result.metrics["recall_at_5"])
    assert (tmp_path / "retrieval_index" / "manifest.json").is_file()
    with pytest.raises(UserError, match="retriever=none has no index to search; choose retriever=bm25"):
        run_task(tasks[0], TaskInputs(world=WORLD, stage_dir=str(tmp_path), config=_config()), scorer=None)


def test_the_retrieval_task_without_a_retriever_is_refused_at_plan_time():
    from llmexp.planning.planner import make_plan

    assert make_plan(_config("retriever=none", "technique.tasks=[retrieval]")).problems == [
        "technique.tasks: retrieval scores the run's retriever, and retriever=none has none; choose retriever=bm25 "
        "(or retriever=dense, retriever=hybrid), or drop the task."]
    assert make_plan(_config("retriever=bm25", "technique.tasks=[retrieval]")).problems == []


def test_the_retrieval_task_over_your_questions(tmp_path, corpus):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "how is green tea made ?", "sources": ["guides/tea.md"]}) + "\n"
                         + json.dumps({"question": "which number is prime ?", "sources": ["7"]}) + "\n")
    tasks, found = resolve_tasks([{"type": "retrieval", "path": str(questions), "name": "mine"}], None, "technique.tasks")
    assert not found
    inputs = TaskInputs(world=WORLD, stage_dir=str(tmp_path), config=_config("retriever=bm25", f"retriever.documents={corpus}"))
    result = run_task(tasks[0], inputs, scorer=None)
    assert result.metrics["mine_recall_at_1"] == 1.0 and result.metrics["mine_mrr"] == 1.0
    assert [row["retrieved"][0] for row in result.rows] == ["guides/tea.md", "7"]

    questions.write_text(json.dumps({"question": "q", "sources": ["nowhere"]}) + "\n")
    with pytest.raises(UserError, match="'nowhere', which retriever.documents does not hold"):
        run_task(tasks[0], inputs, scorer=None)
    questions.write_text(json.dumps({"question": "q", "sources": ["7"]}) + "\n" + json.dumps({"question": "q"}) + "\n")
    assert "q.jsonl:2: a retrieval question is" in " ".join(task_problems({"path": str(questions)}, "technique.tasks[0]"))
