"""data=word_problems: the embedded world's trained word problems, or a GSM8K-layout file, for sft and grpo."""

import json
import re

import pytest

from llmexp.configuration.compose import compose_config
from llmexp.data.embedded import build_world
from llmexp.data.instructions import instruction_data
from llmexp.data.preference import preference_data
from llmexp.data.word_problems import word_problem_data
from llmexp.errors import UserError
from llmexp.models import embedded_baseline
from tests.conftest import run_llmexp


def numbers(question):
    return tuple(int(n) for n in re.findall(r"\d+", question)[:3])


def test_generated_problems_never_pose_a_held_out_triple_and_end_in_their_answer():
    data = compose_config(["data=word_problems", "data.problems=500"]).data
    train, validation = word_problem_data(data)
    assert (len(train), len(validation)) == (450, 50)
    held_out = build_world(0).heldout_triples
    assert not any(numbers(p.question) in held_out for p in train + validation)
    for problem in train[:50]:
        a, b, c = numbers(problem.question)
        assert problem.answer == a + b - c and problem.solution.endswith(f"#### {a + b - c}")
        assert problem.prompt == f"Question: {problem.question}\nAnswer:"  # as the evaluation asks
    assert word_problem_data(data) == (train, validation)
    assert word_problem_data(compose_config(["data=word_problems", "data.problems=500", "data.seed=1"]).data) != (
        train, validation)


def test_sft_reads_them_as_prompt_and_worked_solution():
    data = compose_config(["data=word_problems", "data.problems=20"]).data
    examples, _ = instruction_data(data)
    problems, _ = word_problem_data(data)
    assert [(e.prompt, e.response) for e in examples] == [(p.prompt, p.solution) for p in problems]


def test_a_gsm8k_file_is_read_and_a_line_without_its_number_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [{"question": f"What is {n} + 1?", "answer": f"{n} + 1 = {n + 1}\n#### {n + 1}"} for n in range(10)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    data = compose_config(["data=word_problems", f"data.path={path}"]).data
    train, validation = word_problem_data(data)
    assert sorted(p.answer for p in train + validation) == list(range(1, 11)) and len(validation) == 1
    path.write_text(path.read_text() + json.dumps({"question": "q", "answer": "no number"}) + "\n")
    with pytest.raises(UserError, match=r"train.jsonl:11: the answer does not contain '#### <number>'"):
        word_problem_data(data)


def test_data_embedded_holds_its_worlds_word_problems_and_data_preference_its_chosen_responses():
    assert word_problem_data(compose_config([]).data) == word_problem_data(compose_config(["data=word_problems"]).data)
    pairs = compose_config(["data=preference"]).data
    examples, validation = instruction_data(pairs)
    train_pairs, validation_pairs = preference_data(pairs)
    assert [(e.prompt, e.response) for e in examples] == [(p.prompt, p.chosen) for p in train_pairs]
    assert len(validation) == len(validation_pairs) > 0


def test_other_data_holds_no_word_problems():
    with pytest.raises(UserError, match="data=preference holds no word problems"):
        word_problem_data(compose_config(["data=preference"]).data)


def test_too_few_problems_are_refused_before_the_run(tmp_path):
    result = run_llmexp("plan", "technique=sft", "data=word_problems", "data.problems=1", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "data.problems=1: generate at least 2 word problems" in result.stdout + result.stderr
    ok = run_llmexp("plan", "technique=sft", "data=word_problems", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_stages_on_the_worlds_word_problems_adapt_the_same_cached_baseline_as_data_embedded():
    directory = embedded_baseline.directory
    assert directory(compose_config(["data=word_problems"])) == directory(compose_config([]))
    assert directory(compose_config(["data=word_problems", "data.seed=1"])) == directory(compose_config(["data.seed=1"]))
    assert not embedded_baseline.available(compose_config(["data=word_problems", "data.path=train.jsonl"]))
