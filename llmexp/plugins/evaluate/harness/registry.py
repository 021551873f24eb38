"""The task types ``tasks`` entries may name, and how a ``tasks`` list becomes the tasks to run.

Task types come from the ``llmexp_evaluation_tasks`` hook: the built-in ones (``tasks/``,
registered by this plugin) and any a third-party package registers the same way. An entry
is the name of an embedded task type (``multiple_choice``) or a mapping describing a task
over the user's data: ``{type: mmlu, path: data/mmlu, num_fewshot: 5}``, optionally with a
``name`` (default: its type; it names the rows file ``<name>.jsonl`` and prefixes the
metrics, ``<name>_acc``) and a ``limit`` of its own. Several tasks of one type run side by
side under different names. No torch here: the planner checks every entry before a run starts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from llmexp.sdk import Metric, TaskInputs, TaskResult, TaskType, UserError, plugin_manager
from llmexp.plugins.evaluate.harness.conditions import task_inputs, with_shots

_COMMON_KEYS = ("type", "name", "limit")


@functools.lru_cache(maxsize=None)
def task_types() -> Dict[str, TaskType]:
    """Every registered task type by name; two plugins registering one name is an error."""
    found: Dict[str, TaskType] = {}
    owners: Dict[str, str] = {}
    for impl in plugin_manager().hook.llmexp_evaluation_tasks.get_hookimpls():
        for task_type in impl.function() or ():
            if task_type.name in found:
                raise UserError(
                    f"Two plugins register the evaluation task type {task_type.name!r}: {owners[task_type.name]} and "
                    f"{impl.plugin_name}. Uninstall one of them or rename its task type."
                )
            found[task_type.name], owners[task_type.name] = task_type, impl.plugin_name
    return found


def embedded_names() -> List[str]:
    """The task types ``tasks`` may name bare."""
    return [name for name, task_type in task_types().items() if task_type.embedded]


def described_names() -> List[str]:
    """The task types ``tasks`` describes as mappings: those over the user's data, and an embedded one that takes keys
    (``retrieval``: bare over the embedded questions, ``{type: retrieval, path: ...}`` over the user's)."""
    return [name for name, task_type in task_types().items() if not task_type.embedded or task_type.keys]


@dataclass(frozen=True)
class Task:
    """One task of an evaluation: an embedded one (``spec`` None) or one described as data."""

    name: str
    spec: Optional[Mapping[str, Any]] = None

    @property
    def type(self) -> TaskType:
        return task_types()[self.name if self.spec is None else self.spec["type"]]

    def metric_name(self, bare: str) -> str:
        """How the results name the task type's metric ``bare``: a described task prefixes its own name."""
        return bare if self.spec is None else f"{self.name}_{bare}"

    @property
    def headline(self) -> Optional[str]:
        """The metric its rows' ``correct`` flags make, as it appears in the results."""
        bare = self.type.headline
        return self.metric_name(bare) if bare else None

    def metrics(self) -> Tuple[Metric, ...]:
        """What it reports (``llmexp.sdk.Metric``), named and labelled as the results name them."""
        declared = self.type.metrics(self.spec or {})
        return tuple(replace(m, name=self.metric_name(m.name), label=self.metric_name(m.label)) for m in declared)


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
        elif isinstance(entry, str) and entry in embedded_names():
            task = Task(entry)
        elif isinstance(entry, str) and entry in task_types():
            keys = ", ".join(task_types()[entry].keys)
            problems.append(
                f"{where}={entry!r} is a task type over your data, not an embedded task: describe it as a mapping, "
                f"e.g. '{{type: {entry}, ...}}' with its keys ({keys})."
            )
            continue
        else:
            problems.append(
                f"{where}={entry!r} is not a task. Give an embedded task ({', '.join(embedded_names())}) or a "
                f"mapping with a type ({', '.join(described_names())}), e.g. {{type: mmlu, path: data/mmlu, num_fewshot: 5}}."
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
    if kind not in described_names():
        return None, [
            f"{where}.type={kind!r} is not a task type. Known types: {', '.join(described_names())} "
            f"(or name an embedded task: {', '.join(embedded_names())})."
        ]
    task_type = task_types()[kind]
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
    """Score ``task`` in the evaluation's condition (closed-book where its type does not honour it); a described
    task's metrics come back prefixed with its name."""
    if task.spec is not None and task.spec.get("limit") is not None:
        inputs = replace(inputs, limit=task.spec["limit"])
    inputs = task_inputs(task, inputs)
    result = task.type.run(with_shots(task.spec or {}, task.type, inputs.condition, inputs.num_fewshot), inputs, scorer)
    return TaskResult({task.metric_name(key): value for key, value in result.metrics.items()}, result.rows)
