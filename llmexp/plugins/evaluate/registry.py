"""The task types ``tasks`` entries may describe, and how a ``tasks`` list becomes the tasks to run.

An entry is either the name of an embedded task (``multiple_choice``; ``tasks.TASKS``) or a
mapping describing a task over the user's data: ``{type: mmlu, path: data/mmlu,
num_fewshot: 5}``, optionally with a ``name`` (default: its type; it names the rows file
``<name>.jsonl`` and prefixes the metrics, ``<name>_acc``) and a ``limit`` of its own.
Several tasks of one type run side by side under different names. No torch here: the
planner checks every entry before a run starts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from llmexp.plugins.evaluate import (
    code_execution,
    continuation,
    generation,
    judge,
    lm_eval_task,
    mmlu,
    similarity,
    text_perplexity,
)
from llmexp.plugins.evaluate.tasks import HEADLINE, TASKS, TaskInputs, TaskResult, TaskType

TASK_TYPES: Dict[str, TaskType] = {
    **mmlu.TASK_TYPES,
    **continuation.TASK_TYPES,
    **generation.TASK_TYPES,
    **text_perplexity.TASK_TYPES,
    **similarity.TASK_TYPES,
    **code_execution.TASK_TYPES,
    **judge.TASK_TYPES,
    **lm_eval_task.TASK_TYPES,
}
_COMMON_KEYS = ("type", "name", "limit")


@dataclass(frozen=True)
class Task:
    """One task of an evaluation: an embedded one (``spec`` None) or one described as data."""

    name: str
    spec: Optional[Mapping[str, Any]] = None

    @property
    def headline(self) -> Optional[str]:
        """The metric its rows' ``correct`` flags make, as it appears in the results."""
        if self.spec is None:
            return HEADLINE.get(self.name)
        bare = TASK_TYPES[self.spec["type"]].headline
        return f"{self.name}_{bare}" if bare else None


def resolve_tasks(entries: Sequence[Any], gsm8k_path: Optional[str], field: str) -> Tuple[List[Task], List[str]]:
    """The tasks ``entries`` describe, in order (``gsm8k`` added when ``gsm8k_path`` is set), and their problems."""
    tasks: List[Task] = []
    problems: List[str] = []
    for index, entry in enumerate(entries):
        where = f"{field}[{index}]"
        if isinstance(entry, (Mapping, DictConfig)):
            spec = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else dict(entry)
            task, found = _described(spec, where)
            problems += found
        elif isinstance(entry, str) and entry in TASKS:
            task = Task(entry)
        elif isinstance(entry, str) and entry in TASK_TYPES:
            keys = ", ".join(TASK_TYPES[entry].keys)
            problems.append(
                f"{where}={entry!r} is a task type over your data, not an embedded task: describe it as a mapping, "
                f"e.g. '{{type: {entry}, ...}}' with its keys ({keys})."
            )
            continue
        else:
            problems.append(
                f"{where}={entry!r} is not a task. Give an embedded task ({', '.join(TASKS)}) or a mapping "
                f"with a type ({', '.join(TASK_TYPES)}), e.g. {{type: mmlu, path: data/mmlu, num_fewshot: 5}}."
            )
            continue
        if task is not None:
            if any(existing.name == task.name for existing in tasks):
                problems.append(
                    f"{where}: a second task named {task.name!r}; give one of them another `name` "
                    "(it names the rows file and prefixes the metrics)."
                )
            tasks.append(task)
    if gsm8k_path and not any(task.name == "gsm8k" for task in tasks):
        tasks.append(Task("gsm8k"))
    return tasks, problems


def _described(spec: Dict[str, Any], where: str) -> Tuple[Optional[Task], List[str]]:
    kind = spec.get("type")
    if kind not in TASK_TYPES:
        return None, [
            f"{where}.type={kind!r} is not a task type. Known types: {', '.join(TASK_TYPES)} "
            f"(or name an embedded task: {', '.join(TASKS)})."
        ]
    task_type = TASK_TYPES[kind]
    problems = []
    unknown = sorted(set(spec) - set(_COMMON_KEYS) - set(task_type.keys))
    if unknown:
        problems.append(
            f"{where} ({kind}) has unknown key(s) {', '.join(unknown)}; it takes "
            f"{', '.join((*_COMMON_KEYS, *task_type.keys))}."
        )
    name = spec.get("name") or kind
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        problems.append(f"{where}.name={name!r} must be letters, digits, '_' or '-' (it names a file and metrics).")
    limit = spec.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        problems.append(f"{where}.limit={limit!r} must be a whole number of at least 1 (or left out: all items).")
    if not unknown:
        problems += task_type.problems(spec, where)
    return Task(str(name), spec), problems


def run_task(task: Task, inputs: TaskInputs, scorer) -> TaskResult:
    """Score ``task``; a described task's metrics come back prefixed with its name."""
    if task.spec is None:
        return TASKS[task.name](inputs, scorer)
    if task.spec.get("limit") is not None:
        inputs = replace(inputs, limit=task.spec["limit"])
    result = TASK_TYPES[task.spec["type"]].run(task.spec, inputs, scorer)
    return TaskResult({f"{task.name}_{key}": value for key, value in result.metrics.items()}, result.rows)
