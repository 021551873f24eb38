"""The knowledge study (``data=knowledge``, ``pipeline=knowledge``): a second world the base never saw, a reader that
never sees it, and one data option read in parts by the pipeline's stages."""

from __future__ import annotations

import hashlib
import json

import pytest

from llmexp.configuration.compose import compose_config
from llmexp.configuration.pipeline import with_data_fields
from llmexp.data.blocks import raw_text_blocks
from llmexp.data.embedded import CONTEXT_WORD, UNSEEN_NAMES, build_world
from llmexp.data.instructions import instruction_data
from llmexp.data.knowledge import (
    SECOND_WORLD_PEOPLE, build_second_world, context_prompt, evaluated_world, knowledge_corpus,
)
from llmexp.data.tokenizer import word_level_tokenizer
from llmexp.errors import UserError
from llmexp.planning.planner import make_plan
from llmexp.retrieval.passages import Hit, Passage
from llmexp.retrieval.prompting import with_context
from tests.conftest import read_results, run_llmexp

# sha256 of the embedded vocabulary (seed 0, 30 people) joined by spaces, before the knowledge study's words
# were appended: every one of those words keeps its token id
VOCABULARY_BEFORE = "048f4929f250853e3707432e044f81efaddcbd24fe32db07f1ee101fb41e464b"


def knowledge_data(**fields):
    return compose_config(["data=knowledge", *(f"data.{key}={value}" for key, value in fields.items())]).data


def test_existing_token_ids_stay_and_the_default_data_tokenizes_as_before():
    world = build_world(0, 30)
    words = world.vocabulary()
    before = words[:-(UNSEEN_NAMES + 1)]
    assert hashlib.sha256(" ".join(before).encode()).hexdigest() == VOCABULARY_BEFORE
    assert words[len(before):] == [CONTEXT_WORD, *world.unseen] and len(set(words)) == len(words)
    old, new = word_level_tokenizer(before), word_level_tokenizer(words)
    texts = world.training_documents(300) + [item.prompt for item in world.free_answer_test()]
    assert new(texts)["input_ids"] == old(texts)["input_ids"]
    assert old.unk_token_id not in {i for ids in new(texts)["input_ids"] for i in ids}
    assert len(new) <= 256  # tiny_llama's vocab_size still holds it


def test_the_second_world_is_new_people_with_the_first_worlds_values():
    first, second = build_world(0, 30), build_second_world(0, 30)
    assert len(second.people) == SECOND_WORLD_PEOPLE and not set(second.people) & set(first.people)
    assert set(second.people) <= set(first.vocabulary())
    first_text = " ".join(first.training_documents(2000) + first.heldout_documents(200))
    assert not set(second.people) & set(first_text.split())  # the base model never read a second-world name
    values = {f.value for f in first.facts} | set(first.towns)
    assert {f.value for f in second.facts} <= values | {v for v in first.vocabulary()}
    assert len(second.facts) == 5 * SECOND_WORLD_PEOPLE
    assert len({f.value for f in second.facts if f.relation == "pet"}) > 3  # drawn, not constant


def test_the_readers_training_never_holds_a_second_world_name_or_fact():
    data = knowledge_data()
    train, validation = instruction_data(data)
    assert len(train) + len(validation) == data.reading_examples
    second = set(build_second_world(0, 30).people)
    for example in train + validation:
        assert not second & set(f"{example.prompt} {example.response}".split())
    with_context = [e for e in train if e.prompt.startswith(f"{CONTEXT_WORD} ")]
    assert 0.7 < len(with_context) / len(train) < 0.9  # closed_book_share=0.2 asks without a context
    # every answer is in the context (the first ends the prompt's question, the rest follow further questions in the
    # response), and the context decides it: memory of the first world is often wrong
    for e in with_context:
        words = e.response.split()
        answers = [words[0]] + [words[i + 1] for i, word in enumerate(words) if word == "Answer:"]
        assert len(answers) == data.questions_per_context
        assert set(answers) <= set(e.prompt.split("\n")[0].split())
    first = build_world(0, 30)
    truth = {(f.person, f.value) for f in first.facts}
    asked = [(next((w for w in e.prompt.split("\n")[1].split() if w in first.people), None), e.response)
             for e in with_context]
    about_first = [pair for pair in asked if pair[0]]
    assert len(about_first) > 0.3 * len(asked)
    assert sum(pair not in truth for pair in about_first) > 0.8 * len(about_first)


def test_the_parts_of_data_knowledge():
    second = build_second_world(0, 30)
    train, validation = instruction_data(knowledge_data(instructions="questions"))
    assert len(train) + len(validation) == 3 * len(second.facts)  # every fact, every training template
    asked = {e.prompt for e in train + validation}
    assert not asked & {item.prompt for item in second.free_answer_test()}  # the test's template is held out
    corpus = knowledge_corpus(knowledge_data(paraphrases=3))
    assert len(corpus) == 3 * SECOND_WORLD_PEOPLE and len(set(corpus)) == len(corpus)
    docs = second.documents()
    assert list(docs) == second.people
    for person, text in docs.items():  # one biography per person, each fact stated once
        assert sum(f.value in text.split() for f in second.facts if f.person == person) == 5
    assert evaluated_world(knowledge_data()).facts == second.facts
    blocks, shuffled = raw_text_blocks(knowledge_data(seq_len=32), word_level_tokenizer(build_world().vocabulary()), 0)
    assert shuffled and blocks.shape[1] == 32 and blocks.shape[0] > 10
    hits = [Hit(Passage(f"{text}#0", text, text), 1.0) for text in ("a .", "b .")]
    assert context_prompt(["a .", "b ."], "Question: q\nAnswer:") == with_context("Question: q\nAnswer:", hits) \
        == "Context: a . b .\nQuestion: q\nAnswer:"  # the reader's training layout is the rag condition's


def test_the_pipeline_plans_and_its_stages_read_their_part_of_the_data():
    cfg = compose_config(["pipeline=knowledge"])
    plan = make_plan(cfg)
    assert not plan.problems, plan.problems
    assert with_data_fields(cfg, "reader").data.instructions == "reading"
    assert with_data_fields(cfg, "sft").data.instructions == "questions"
    assert with_data_fields(cfg, "cpt").data == cfg.data
    wrong = make_plan(compose_config(["pipeline=knowledge", "+pipeline.data_fields.sft.instruction=questions"]))
    assert any("pipeline.data_fields.sft" in problem and "instruction" in problem for problem in wrong.problems)
    stray = make_plan(compose_config(["pipeline=knowledge", "+pipeline.data_fields.nope.seed=1"]))
    assert any("pipeline.data_fields.nope: 'nope' is not a stage" in problem for problem in stray.problems)


@pytest.mark.parametrize("field", ["instructions=memories", "paraphrases=0"])
def test_bad_knowledge_settings_are_named(field):
    key, value = field.split("=")
    with pytest.raises(UserError, match=f"data.{key}={value}"):
        data = knowledge_data(**{key: value})
        instruction_data(data) if key == "instructions" else knowledge_corpus(data)


def run_pipeline(tmp_path, *overrides):
    result = run_llmexp("pipeline=knowledge", *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                        env={"LLMEXP_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return read_results(tmp_path / "run")


@pytest.mark.slow
def test_every_stage_reads_its_model_its_part_of_the_data_and_its_condition(tmp_path):
    record = run_pipeline(tmp_path, "model.baseline.max_steps=12", "model.baseline.warmup_steps=2",
                          "parallelism.global_batch=4", "parallelism.micro_batch=4", "data.reading_examples=200",
                          "pipeline.nodes.reader.max_steps=3", "pipeline.nodes.cpt.max_steps=2",
                          "pipeline.nodes.sft.max_steps=2", "pipeline.nodes.reader_closed_book.limit=10")
    stages = record["stages"]
    assert list(stages) == ["reader", "reader_closed_book", "reader_few_shot", "reader_rag", "reader_rag_top1", "cpt",
                            "cpt_closed_book", "cpt_rag", "cpt_rag_top1", "sft", "sft_closed_book", "sft_rag",
                            "sft_rag_top1"]
    assert stages["cpt"]["input_model"] == stages["sft"]["input_model"] == "reader"
    second = build_second_world(0, 30)
    for key, read in (("reader_rag", 5), ("cpt_rag", 5), ("sft_rag", 5), ("reader_rag_top1", 1), ("sft_rag_top1", 1)):
        rows = [json.loads(line) for line in open(stages[key]["artifacts"]["free_answer"])]
        assert [row["expected"] for row in rows] == [f.value for f in second.facts[:10]]
        # each question read BM25's best biographies of the second world (five, or one), its own person's first
        assert all(len(row["passages"]) == read and row["passages"][0].split("#")[0] == fact.person
                   for row, fact in zip(rows, second.facts))
    for key, baseline in (("reader_rag", "reader_closed_book"), ("cpt_closed_book", "reader_closed_book"),
                          ("sft_rag", "reader_rag"), ("cpt_rag_top1", "reader_rag_top1")):
        metrics = stages[key]["metrics"]
        gained, lost = metrics["free_answer_em_gained"], metrics["free_answer_em_lost"]
        assert metrics["free_answer_em_delta"] == pytest.approx(
            metrics["free_answer_em"] - stages[baseline]["metrics"]["free_answer_em"])
        assert metrics["free_answer_em_delta"] == pytest.approx((gained - lost) / 10)


@pytest.mark.slow
def test_the_reader_answers_new_facts_better_from_a_retrieved_biography_than_from_memory(tmp_path):
    """The default reader (from the embedded baseline, cached once like every run's); BM25's best biography is the
    asked person's for every question, and reading it beats the reader's memory of facts it never saw."""
    result = run_llmexp("pipeline=knowledge", "pipeline.stages=[reader,reader_closed_book,reader_rag_top1]",
                        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=840)  # the reader: ~5-10 min
    assert result.returncode == 0, result.stderr[-3000:]
    stages = read_results(tmp_path / "run")["stages"]
    assert stages["reader_closed_book"]["metrics"]["free_answer_em"] <= 0.15  # about chance: ten values a relation
    rag = stages["reader_rag_top1"]["metrics"]
    assert rag["free_answer_em_gained"] > 3 * rag["free_answer_em_lost"]
    assert rag["free_answer_em_mcnemar_p"] < 0.05
