"""Evaluation conditions: closed-book, few-shot and RAG prompts, their refusals, their paired comparison and the
report's conditions table."""

import csv
import json

import pytest
import torch
from omegaconf import OmegaConf

from llmexp.configuration.compose import compose_config
from llmexp.data.embedded import LETTERS, QUESTIONS, TRAIN_TEMPLATES, build_world
from llmexp.data.tokenizer import word_level_tokenizer
from llmexp.models.loading import build_model
from llmexp.plugins.evaluate.harness.conditions import retriever_for
from llmexp.plugins.evaluate.harness.paired import paired_measures
from llmexp.plugins.evaluate.harness.registry import resolve_tasks, run_task
from llmexp.plugins.evaluate.harness.scoring import Scorer
from llmexp.results import statistics
from llmexp.results.record import read_results
from llmexp.sdk import TaskInputs, with_context
from tests.conftest import REPO, run_llmexp

LIMIT = 12


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def scorer(world):
    """A real scorer over a tiny random model: what it answers does not matter here, what it is asked does."""
    torch.manual_seed(0)
    model_cfg = OmegaConf.load(REPO / "llmexp/conf/model/tiny_llama.yaml")
    model_cfg.num_layers = 1
    tokenizer = word_level_tokenizer(world.vocabulary())
    return Scorer(build_model(model_cfg, tokenizer), tokenizer, batch_size=16, max_new_tokens=4)


def _run(name, inputs, scorer):
    return run_task(resolve_tasks([name], None, "tasks")[0][0], inputs, scorer).rows


def _solved_pairs(prefix):
    """(question, answer) of each solved example ``Question: q\\nAnswer: a`` in a few-shot prefix."""
    pairs = []
    for block in filter(None, prefix.split("\n\n")):
        question, answer = block.split("\nAnswer: ")
        pairs.append((question.removeprefix("Question: "), answer))
    return pairs


def test_closed_book_prompts_are_the_questions_alone(world, scorer):
    rows = _run("free_answer", TaskInputs(world, limit=LIMIT), scorer)
    assert [row["prompt"] for row in rows] == [item.prompt for item in world.free_answer_test()[:LIMIT]]
    assert {row["condition"] for row in rows} == {"closed_book"} and "passages" not in rows[0]


def test_few_shot_prompts_hold_other_peoples_facts_asked_with_training_templates(world, scorer):
    inputs = TaskInputs(world, limit=LIMIT, num_fewshot=3, condition="few_shot")
    rows = _run("free_answer", inputs, scorer)
    training = {template.format(p=fact.person): fact for fact in world.facts
                for template in QUESTIONS[fact.relation][:TRAIN_TEMPLATES]}
    for fact, item, row in zip(world.facts, world.free_answer_test(), rows):
        prefix, question = row["prompt"][: -len(item.prompt)], row["prompt"][-len(item.prompt):]
        assert question == item.prompt and row["question"] == QUESTIONS[fact.relation][TRAIN_TEMPLATES].format(p=fact.person)
        shots = _solved_pairs(prefix)
        assert len(shots) == 3
        for asked, answer in shots:
            shown = training[asked]  # a training template of a real fact (a KeyError otherwise), answered right
            assert answer == shown.value and shown.person != fact.person
    # multiple choice: the same facts solved in each layout, the letter one with its options and the right letter
    mc = _run("multiple_choice", inputs, scorer)
    for row, item in zip(mc, world.multiple_choice_test()):
        assert row["prompt"].endswith(item.cloze_prompt()) and row["letter_prompt"].endswith(item.letter_prompt())
        cloze_shots = _solved_pairs(row["prompt"][: -len(item.cloze_prompt())])
        letter_blocks = row["letter_prompt"][: -len(item.letter_prompt())].split("\n\n")[:-1]
        assert len(cloze_shots) == len(letter_blocks) == 3
        for (asked, answer), block in zip(cloze_shots, letter_blocks):
            options = dict(line.split(". ", 1) for line in block.split("\n")[1:-1])
            assert block.startswith(f"Question: {asked}\n") and options[block[-1]] == answer
            assert training[asked].value == answer
    # word problems: problems as training poses them, never a held-out number triple
    problems = _run("word_problems", inputs, scorer)
    trained = world.word_problems(3)
    assert problems[0]["prompt"] == "".join(f"{p.prompt} {p.solution}\n\n" for p in trained) + world.word_problem_test()[0].prompt
    triples = {(int(w[0]), int(w[2]), int(w[6])) for w in (p.solution.split() for p in trained)}  # "a + b = t . t - c"
    assert len(triples) == 3 and not triples & world.heldout_triples


@pytest.fixture(scope="module")
def bm25(tmp_path_factory):
    cfg = compose_config(["technique=evaluate", "retriever=bm25"])
    return retriever_for(cfg, tmp_path_factory.mktemp("stage"))


def test_rag_prompts_put_the_right_persons_biography_before_the_question(world, scorer, bm25):
    inputs = TaskInputs(world, limit=LIMIT, condition="rag", retrieve=bm25)
    rows = _run("free_answer", inputs, scorer)
    hits = bm25([row["question"] for row in rows])
    for fact, item, row, found in zip(world.facts, world.free_answer_test(), rows, hits):
        assert row["prompt"] == with_context(item.prompt, found)  # the contract's layout, searched with the question
        assert row["passages"] == [hit.passage.id for hit in found]
        assert row["passages"][0].split("#")[0] == fact.person  # the best passage is the person's biography
        assert f"{fact.person} " in row["prompt"].split("\n")[0] and fact.value in row["prompt"].split("\n")[0]
    mc = _run("multiple_choice", inputs, scorer)
    for row, item, found in zip(mc, world.multiple_choice_test(), hits):
        assert row["prompt"] == with_context(item.cloze_prompt(), found)
        assert row["letter_prompt"] == with_context(item.letter_prompt(), found)
        assert len(row["cloze_scores"]) == len(row["letter_scores"]) == len(LETTERS)  # options scored as before


def test_an_evaluations_passages_set_how_many_each_question_reads(tmp_path):
    cfg = compose_config(["technique=evaluate", "retriever=bm25"])
    five, one = retriever_for(cfg, tmp_path), retriever_for(cfg, tmp_path, passages=1)
    question = "what pet does Kalo have ?"
    assert len(five([question])[0]) == 5 and one([question]) == [five([question])[0][:1]]


def test_a_described_task_takes_the_evaluations_shots_unless_it_sets_its_own_and_reads_passages(
        world, scorer, bm25, tmp_path):
    lines = [{"context": f"what does {fact.person} eat ?", "choices": ["rice", fact.value], "label": 1}
             for fact in world.facts if fact.relation == "food"][:4]
    path, shots = tmp_path / "items.jsonl", tmp_path / "shots.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines[2:]))
    shots.write_text("".join(json.dumps(line) + "\n" for line in lines[:2]))
    entry = {"type": "continuation", "path": str(path), "fewshot_path": str(shots)}
    few = TaskInputs(world, num_fewshot=1, condition="few_shot")
    task = resolve_tasks([entry], None, "tasks")[0][0]
    solved = f"{lines[0]['context']} {lines[0]['choices'][1]}\n\n"
    assert [row["prompt"] for row in run_task(task, few, scorer).rows] == [solved + line["context"] for line in lines[2:]]
    own = resolve_tasks([{**entry, "num_fewshot": 0}], None, "tasks")[0][0]
    assert [row["prompt"] for row in run_task(own, few, scorer).rows] == [line["context"] for line in lines[2:]]
    rag = run_task(task, TaskInputs(world, condition="rag", retrieve=bm25), scorer).rows
    for row, line, found in zip(rag, lines[2:], bm25([line["context"] for line in lines[2:]])):
        assert row["prompt"] == with_context(line["context"], found) and row["question"] == line["context"]


def test_conditions_compare_item_by_item_and_other_questions_do_not():
    closed = [{"question": q, "condition": "closed_book", "correct": c, "predicted": p}
              for q, c, p in zip("abcd", [1, 0, 0, 1], "wxyz")]
    rag = [dict(row, condition="rag", correct=c) for row, c in zip(closed, [1, 1, 1, 0])]
    paired = paired_measures({"free_answer_em": 0.75}, {"free_answer": rag}, {"free_answer_em": 0.5},
                             {"free_answer": closed}, {"free_answer": "free_answer_em"})
    assert (paired["free_answer_em_gained"], paired["free_answer_em_lost"]) == (2, 1)
    assert paired["free_answer_em_mcnemar_p"] == statistics.mcnemar_p(2, 1)
    other = [dict(row, question=row["question"] + "?") for row in rag]
    assert "free_answer_em_gained" not in paired_measures({}, {"free_answer": other}, {}, {"free_answer": closed},
                                                          {"free_answer": "free_answer_em"})


@pytest.mark.parametrize("overrides, message", [
    (["technique.condition=rag"], "technique.condition=rag puts the passages a retriever finds before each question, "
                                  "but retriever=none finds none; choose a retriever: retriever=bm25"),
    (["technique.condition=few_shot"], "technique.condition=few_shot puts technique.num_fewshot solved examples"),
    (["technique.condition=rag", "retriever=bm25", "technique.passages=0"],
     "technique.passages=0: a rag question reads at least one passage"),
    (["technique.condition=open_book"], "technique.condition=open_book is not a condition; choose one of closed_book, "
                                        "few_shot, rag."),
])
def test_bad_conditions_are_refused_before_the_run(tmp_path, overrides, message):
    result = run_llmexp("technique=evaluate", *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in " ".join(result.stderr.split())
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_three_conditions_on_the_embedded_baseline_compared_and_reported(tmp_path):
    """Closed-book, few-shot and RAG evaluations of the embedded baseline in one pipeline, the last two compared
    with the first item by item, and `llmexp report`'s conditions table."""
    run = tmp_path / "run"
    result = run_llmexp("pipeline=conditions", "pipeline.nodes.closed_book.tasks=[free_answer,multiple_choice]",
                        "pipeline.nodes.closed_book.limit=40",
                        f"hydra.run.dir={run}", cwd=tmp_path, env={"OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    stages = read_results(run)["stages"]
    world = build_world(0)
    rows = {name: [json.loads(line) for line in (run / name / "free_answer.jsonl").read_text().splitlines()]
            for name in stages}
    for closed, few, rag, fact in zip(rows["closed_book"], rows["few_shot"], rows["rag"], world.facts):
        assert closed["question"] == few["question"] == rag["question"]
        assert (closed["condition"], few["condition"], rag["condition"]) == ("closed_book", "few_shot", "rag")
        assert rag["passages"][0].split("#")[0] == fact.person and rag["prompt"].startswith("Context: ")
    assert (run / "rag" / "retrieval_index").is_dir()
    for name in ("few_shot", "rag"):
        metrics = stages[name]["metrics"]
        differences = [int(mine["correct"]) - int(theirs["correct"])
                       for mine, theirs in zip(rows[name], rows["closed_book"])]
        assert (metrics["free_answer_em_gained"], metrics["free_answer_em_lost"]) == (
            differences.count(1), differences.count(-1))
        assert metrics["free_answer_em_delta"] == pytest.approx(
            metrics["free_answer_em"] - stages["closed_book"]["metrics"]["free_answer_em"])

    report = run_llmexp("report", str(run), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    with open(run / "conditions.csv", newline="") as handle:
        table = {row["stage"]: row for row in csv.DictReader(handle)}
    assert [table[name]["condition"] for name in ("closed_book", "few_shot", "rag")] == [
        "closed_book", "few_shot", "rag"]
    for name, row in table.items():
        metrics = stages[name]["metrics"]
        assert row["model"] == stages[name]["input_model"]
        assert float(row["free_answer_em"]) == pytest.approx(metrics["free_answer_em"])
        assert float(row["mc_cloze_acc"]) == pytest.approx(metrics["mc_cloze_acc"])
        if name == "closed_book":
            assert row["baseline"] == "" and row["free_answer_em_delta"] == ""
        else:
            assert row["baseline"] == "closed_book"
            assert float(row["free_answer_em_delta"]) == pytest.approx(metrics["free_answer_em_delta"])
            assert float(row["free_answer_em_mcnemar_p"]) == pytest.approx(metrics["free_answer_em_mcnemar_p"])
    markdown = (run / "report.md").read_text()
    section = markdown.split("## Conditions\n", 1)[1]
    assert "| stage | model | condition | baseline | " in section
    assert "| rag |" in section and "free_answer_em McNemar p" in section
