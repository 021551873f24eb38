"""The ``mmlu`` task type: reading the release's CSVs, lm-eval's prompt, and equal numbers to lm-eval 0.4.13."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llmexp.data.embedded import build_world
from llmexp.errors import UserError
from llmexp.sdk import TaskInputs
from llmexp.plugins.evaluate.tasks.mmlu import MMLU, Question, prompt, read_questions

FIXTURE = Path(__file__).parent / "fixtures" / "mmlu"
DATA = FIXTURE / "data"


@pytest.fixture(scope="module")
def scorer(tiny_checkpoint):
    from llmexp.models.loading import load_model
    from llmexp.plugins.evaluate.harness.scoring import Scorer

    model, tokenizer = load_model(tiny_checkpoint)
    return Scorer(model, tokenizer, batch_size=8)


def test_csv_fields_keep_commas_quotes_newlines_and_none_as_text():
    questions = read_questions(DATA / "test" / "pets_test.csv")
    assert len(questions) == 5
    assert questions[1].question == "Question: what animal , of these , is the pet of Kaan ?"
    assert questions[1].choices[1] == "lizard, green"
    assert questions[2].question == 'Question: what animal is the pet of Loka ?\nAnswer with a "pet" .'
    assert questions[2].choices[2] == "None" and questions[4].choices[0] == "None"
    assert [q.answer for q in questions] == ["C", "A", "D", "B", "C"]


def test_prompt_is_lm_evals_mmlu_prompt():
    shot = Question("  Who ? ", ("a", "b", "c", "d"), "B")
    asked = Question("What ?\n", ("w", "x", "y", "None"), "D")
    assert prompt("high_school_biology", [shot, shot], asked) == (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "Who ?\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
        "Who ?\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
        "What ?\nA. w\nB. x\nC. y\nD. None\nAnswer:"
    )
    assert prompt("x", [], asked) == (
        "The following are multiple choice questions (with answers) about x.\n\nWhat ?\nA. w\nB. x\nC. y\nD. None\nAnswer:"
    )


def test_the_fixture_and_the_data_folder_layout_have_no_problems():
    assert MMLU.problems({"type": "mmlu", "path": str(FIXTURE), "num_fewshot": 3}, "t") == []
    assert MMLU.problems({"type": "mmlu", "path": str(DATA), "subjects": ["pets"]}, "t") == []


def test_problems_name_the_field_file_and_line(tmp_path):
    def problems(**spec):
        return MMLU.problems({"type": "mmlu", **spec}, "technique.tasks[0]")

    assert "is not a directory" in problems(path=str(tmp_path / "absent"))[0]
    assert "holds no test/<subject>_test.csv" in problems(path=str(tmp_path))[0]
    assert "num_fewshot=-1" in problems(path=str(DATA), num_fewshot=-1)[0]
    [few] = problems(path=str(DATA), subjects=["pets"], num_fewshot=4)
    assert few.startswith("technique.tasks[0].num_fewshot=4") and "holds 3 rows" in few
    assert "names chemistry" in problems(path=str(DATA), subjects=["chemistry"])[0]

    shutil.copytree(DATA, tmp_path / "mmlu")
    (tmp_path / "mmlu" / "dev" / "pets_dev.csv").unlink()
    assert problems(path=str(tmp_path / "mmlu"), subjects=["pets"]) == []  # zero-shot needs no dev file
    [missing] = problems(path=str(tmp_path / "mmlu"), subjects=["pets"], num_fewshot=1)
    assert "pets_dev.csv, which does not exist" in missing

    bad = tmp_path / "mmlu" / "test" / "world_facts_test.csv"
    lines = bad.read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + ["Question: why ?,a,b,c,d,E"] + lines[2:]) + "\n")
    [answer] = problems(path=str(tmp_path / "mmlu"), subjects=["world_facts"])
    assert f"{bad}:3: the answer 'E' is not one of A, B, C, D" in answer
    # a quoted field spanning two lines: the next row is reported at its own first line
    broken = tmp_path / "mmlu" / "test" / "pets_test.csv"
    broken.write_text(broken.read_text() + "Question: five ?,a,b,c,d,e,A\n")
    [columns] = problems(path=str(tmp_path / "mmlu"), subjects=["pets"])
    assert f"{broken}:7: 7 fields, MMLU rows have 6" in columns
    with pytest.raises(UserError, match=r"pets_test\.csv:7"):
        read_questions(broken)


def test_metrics_are_micro_macro_and_per_subject(scorer):
    result = MMLU.run({"type": "mmlu", "path": str(FIXTURE), "num_fewshot": 1}, TaskInputs(world=build_world(0)), scorer)
    rows = result.rows
    assert [row["subject"] for row in rows] == ["pets"] * 5 + ["world_facts"] * 4
    for row in rows:
        assert row["predicted"] == "ABCD"[row["scores"].index(max(row["scores"]))]
        assert row["correct"] == (row["predicted"] == row["expected"])
        assert row["prompt"].startswith("The following are multiple choice questions (with answers) about ")
    pets = sum(row["correct"] for row in rows[:5]) / 5
    facts = sum(row["correct"] for row in rows[5:]) / 4
    assert result.metrics == pytest.approx(
        {
            "acc": sum(row["correct"] for row in rows) / 9,
            "acc_macro": (pets + facts) / 2,
            "acc_pets": pets,
            "acc_world_facts": facts,
        }
    )
    assert all(isinstance(value, float) for value in result.metrics.values())
    # the letter scores are the scorer's log-likelihoods of " A".." D" after the prompt
    direct = scorer.loglikelihood([(rows[6]["prompt"], f" {letter}") for letter in "ABCD"])
    assert rows[6]["scores"] == [score.logprob for score in direct]
    # a limit applies per subject, as lm-eval's --limit per subtask
    limited = MMLU.run({"type": "mmlu", "path": str(DATA)}, TaskInputs(world=build_world(0), limit=2), scorer)
    assert [row["subject"] for row in limited.rows] == ["pets", "pets", "world_facts", "world_facts"]


# -- parity with lm-evaluation-harness 0.4.13 -------------------------------------------------


def write_lm_eval_mmlu_tasks(directory: Path, data: Path, subjects) -> None:
    """lm-eval task YAMLs reading the fixture CSVs with its own mmlu prompt, and their micro-averaged group."""
    for subject in subjects:
        (directory / f"fixture_mmlu_{subject}.yaml").write_text(
            f"""task: fixture_mmlu_{subject}
dataset_path: csv
dataset_kwargs:
  data_files:
    test: {data / "test" / f"{subject}_test.csv"}
    dev: {data / "dev" / f"{subject}_dev.csv"}
  column_names: [question, A, B, C, D, answer]
  keep_default_na: false
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {subject.replace("_", " ")}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer.strip())}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
        )
    (directory / "fixture_mmlu.yaml").write_text(
        "group: fixture_mmlu\ntask:\n"
        + "".join(f"  - fixture_mmlu_{subject}\n" for subject in subjects)
        + "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
    )


@pytest.mark.parametrize("num_fewshot", [0, 2])
def test_equal_to_lm_evaluation_harness(tmp_path, monkeypatch, scorer, num_fewshot):
    """Same model, same files: lm-eval's HFLM gives the same log-likelihood for every letter and the same accuracies."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    subjects = ["pets", "world_facts"]
    write_lm_eval_mmlu_tasks(tmp_path, DATA, subjects)
    theirs = simple_evaluate(
        model=HFLM(pretrained=scorer.model, tokenizer=scorer.tokenizer, batch_size=8),
        tasks=["fixture_mmlu"],
        num_fewshot=num_fewshot,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    ours = MMLU.run(
        {"type": "mmlu", "path": str(FIXTURE), "num_fewshot": num_fewshot}, TaskInputs(world=build_world(0)), scorer
    )
    for subject in subjects:
        samples = sorted(theirs["samples"][f"fixture_mmlu_{subject}"], key=lambda sample: sample["doc_id"])
        rows = [row for row in ours.rows if row["subject"] == subject]
        assert len(samples) == len(rows)
        for sample, row in zip(samples, rows):
            assert sample["arguments"][0][0] == row["prompt"]
            assert [ll for ll, _ in sample["filtered_resps"]] == pytest.approx(row["scores"], abs=1e-4)
            assert sample["acc"] == float(row["correct"])
        assert theirs["results"][f"fixture_mmlu_{subject}"]["acc,none"] == ours.metrics[f"acc_{subject}"]
    assert theirs["results"]["fixture_mmlu"]["acc,none"] == pytest.approx(ours.metrics["acc"], abs=1e-12)
