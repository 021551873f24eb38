"""The ``continuation`` task type: label forms, problems by ``file:line``, and equal numbers to lm-eval 0.4.13."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmexp.data.embedded import build_world
from llmexp.errors import UserError
from llmexp.sdk import TaskInputs
from llmexp.plugins.evaluate.tasks.continuation import CONTINUATION, Item, prompt, read_items

FIXTURE = Path(__file__).parent / "fixtures" / "lm_eval"
TEST, TRAIN = FIXTURE / "choices_test.jsonl", FIXTURE / "choices_train.jsonl"
FIELDS = {"context_field": "ctx", "choices_field": "endings"}


@pytest.fixture(scope="module")
def scorer(tiny_checkpoint):
    from llmexp.models.loading import load_model
    from llmexp.plugins.evaluate.harness.scoring import Scorer

    model, tokenizer = load_model(tiny_checkpoint)
    return Scorer(model, tokenizer, batch_size=8)


def write_lines(path: Path, *records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_labels_as_index_letter_arc_label_or_text(tmp_path):
    path = write_lines(
        tmp_path / "items.jsonl",
        {"context": "a", "choices": ["x", "y", "z"], "label": 2},
        {"context": "b", "choices": ["x", "y", "z"], "label": "1"},
        {"context": "c", "choices": ["x", "y", "z"], "label": "C"},
        {"context": "d", "choices": ["x", "y", "z"], "label": "y"},
        {"context": "e", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "label": "1"},
        {"context": "f", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}, "label": "B"},
    )
    assert [item.answer for item in read_items(path, {})] == [2, 1, 2, 1, 0, 1]


def test_bad_lines_are_reported_by_file_and_line(tmp_path):
    good = {"context": "a", "choices": ["x", "y"], "label": 0}
    cases = [
        ({"context": "a", "choices": ["x", "y"], "label": 5}, "the label 5 names none of the 2 choices"),
        ({"context": "a", "choices": ["x", "y"], "label": "Q"}, "the label 'Q' names none"),
        ({"context": "a", "choices": "x y", "label": 0}, "the choices field .choices. must be a list of at least two strings"),
        ({"context": "a", "choices": ["x", "y"]}, "no field 'label'"),
    ]
    for record, message in cases:
        path = write_lines(tmp_path / "bad.jsonl", good, record)
        with pytest.raises(UserError, match=f"bad.jsonl:2: {message}"):
            read_items(path, {})
        [problem] = CONTINUATION.problems({"type": "continuation", "path": str(path)}, "technique.tasks[1]")
        assert problem.startswith("technique.tasks[1].path: ") and re.search(f"bad.jsonl:2: {message}", problem)
    (tmp_path / "broken.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    [problem] = CONTINUATION.problems({"type": "continuation", "path": str(tmp_path / "broken.jsonl")}, "t")
    assert "broken.jsonl:2: not valid JSON" in problem


def test_problems_with_the_spec():
    def problems(**spec):
        return CONTINUATION.problems({"type": "continuation", "path": str(TEST), **FIELDS, **spec}, "t")

    assert problems() == []
    assert problems(num_fewshot=3, fewshot_path=str(TRAIN)) == []
    assert "fewshot_path, which is unset" in problems(num_fewshot=1)[0]
    assert "holds 3 lines" in problems(num_fewshot=4, fewshot_path=str(TRAIN))[0]
    assert "num_fewshot=-2" in problems(num_fewshot=-2)[0]
    assert "no field 'context'" in CONTINUATION.problems({"type": "continuation", "path": str(TEST)}, "t")[0]
    assert "does not exist" in problems(path="/nowhere.jsonl")[0]


def test_few_shot_prompt_is_solved_examples_then_the_context():
    shots = [Item("A works as a", ["baker", "doctor"], 1), Item("B likes", ["red", "blue"], 0)]
    assert prompt(shots, Item("C is", ["x"], 0)) == "A works as a doctor\n\nB likes red\n\nC is"


def test_accuracies_follow_the_scores(scorer):
    result = CONTINUATION.run({"type": "continuation", "path": str(TEST), **FIELDS}, TaskInputs(world=build_world(0)), scorer)
    assert len(result.rows) == 8
    for row in result.rows:
        scores, choices = row["scores"], row["choices"]
        assert row["predicted"] == choices[scores.index(max(scores))]
        normed = [score / len(choice) for score, choice in zip(scores, choices)]
        assert row["predicted_norm"] == choices[normed.index(max(normed))]
    assert result.metrics["acc"] == sum(row["correct"] for row in result.rows) / 8
    assert result.metrics["acc_norm"] == sum(row["correct_norm"] for row in result.rows) / 8
    direct = scorer.loglikelihood([("Gugu walks to the house of Anta and", " eats bread")])[0].logprob
    assert result.rows[0]["scores"][0] == pytest.approx(direct, rel=1e-5)  # batched vs alone: float rounding


def write_lm_eval_task(directory: Path) -> None:
    """An lm-eval multiple_choice task over the fixture (data on disk, first_n shots from the train file)."""
    (directory / "fixture_choices.yaml").write_text(
        f"""task: fixture_choices
dataset_path: json
dataset_kwargs:
  data_files:
    test: {TEST}
    train: {TRAIN}
test_split: test
fewshot_split: train
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
"""
    )


@pytest.mark.parametrize("num_fewshot", [0, 2])
def test_equal_to_lm_evaluation_harness(tmp_path, monkeypatch, scorer, num_fewshot):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    write_lm_eval_task(tmp_path)
    theirs = simple_evaluate(
        model=HFLM(pretrained=scorer.model, tokenizer=scorer.tokenizer, batch_size=8),
        tasks=["fixture_choices"],
        num_fewshot=num_fewshot,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    spec = {"type": "continuation", "path": str(TEST), "num_fewshot": num_fewshot, "fewshot_path": str(TRAIN), **FIELDS}
    ours = CONTINUATION.run(spec, TaskInputs(world=build_world(0)), scorer)
    samples = sorted(theirs["samples"]["fixture_choices"], key=lambda sample: sample["doc_id"])
    for sample, row in zip(samples, ours.rows, strict=True):
        assert sample["arguments"][0][0] == row["prompt"]
        assert [ll for ll, _ in sample["filtered_resps"]] == pytest.approx(row["scores"], abs=1e-4)
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert theirs["results"]["fixture_choices"][f"{metric},none"] == pytest.approx(ours.metrics[metric], abs=1e-12)
    # the fixture separates the metrics: length normalisation changes some answers
    assert [row["correct"] for row in ours.rows] != [row["correct_norm"] for row in ours.rows] or num_fewshot
