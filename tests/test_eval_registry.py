"""``technique.tasks`` entries: embedded names and tasks described as data, checked before a run."""

from dataclasses import replace

import pytest
from omegaconf import OmegaConf

from llmexp.data.embedded import build_world
from llmexp.plugins.evaluate.harness import registry
from llmexp.plugins.evaluate.harness.registry import Task, resolve_tasks, run_task, task_types
from llmexp.sdk import TaskInputs, TaskResult, TaskType


def test_every_built_in_task_type_is_registered():
    assert {"mmlu", "continuation", "generation", "text_perplexity", "similarity", "code", "judge", "lm_eval"} <= set(task_types())


def test_embedded_names_and_described_tasks_resolve_in_order(tmp_path):
    data = tmp_path / "refs.jsonl"
    data.write_text('{"prompt": "a", "reference": "b"}\n')
    entries = OmegaConf.create(["multiple_choice", {"type": "similarity", "path": str(data), "name": "summaries"}])
    tasks, problems = resolve_tasks(entries, gsm8k_path="g.jsonl", field="technique.tasks")
    assert problems == []
    assert [task.name for task in tasks] == ["multiple_choice", "summaries", "gsm8k"]
    assert tasks[1].spec == {"type": "similarity", "path": str(data), "name": "summaries"}  # plain data, not OmegaConf
    assert tasks[0].headline == "mc_cloze_acc"


@pytest.mark.parametrize(
    "entries, expected",
    [
        (["nope"], "technique.tasks[0]='nope' is not a task. Give an embedded task (multiple_choice"),
        (["mmlu"], "technique.tasks[0]='mmlu' is a task type over your data, not an embedded task: describe it as a mapping"),
        ([{"type": "nope"}], "technique.tasks[0].type='nope' is not a task type. Known types: mmlu"),
        ([{"type": "similarity", "path": "x.jsonl", "colour": 1}], "technique.tasks[0] (similarity) has unknown key(s) colour"),
        ([{"type": "similarity", "path": "x.jsonl", "limit": 0}], "technique.tasks[0].limit=0 must be a whole number"),
        ([{"type": "similarity", "path": "x.jsonl", "name": "a b"}], "technique.tasks[0].name='a b' must be letters"),
        (["perplexity", "perplexity"], "technique.tasks[1]: a second task named 'perplexity'"),
    ],
)
def test_bad_entries_name_the_entry_and_the_fix(entries, expected):
    _, problems = resolve_tasks(entries, None, "technique.tasks")
    assert any(problem.startswith(expected) for problem in problems), problems


def test_a_described_task_gets_its_own_limit_and_prefixed_metrics(monkeypatch):
    seen = {}

    def run(spec, inputs, scorer):
        seen["limit"] = inputs.limit
        return TaskResult({"acc": 0.25}, [{"correct": True}])

    monkeypatch.setitem(registry.task_types(), "counting", TaskType("counting", run=run, problems=lambda spec, field: [], headline="acc"))
    task = Task("two", {"type": "counting", "limit": 3})
    inputs = TaskInputs(world=build_world(0), limit=50)
    result = run_task(task, inputs, scorer=None)
    assert result.metrics == {"two_acc": 0.25} and seen["limit"] == 3 and task.headline == "two_acc"
    run_task(replace(task, spec={"type": "counting"}), inputs, scorer=None)
    assert seen["limit"] == 50  # without its own limit, the evaluation's
