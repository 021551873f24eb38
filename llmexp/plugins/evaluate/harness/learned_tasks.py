"""The tasks an evaluation scores besides its ``tasks``: what the model it scores was trained for.

A technique names them on itself (``Technique.measured_by``: sft, lora and dpo on the package's
data learn its Text2SQL task, so ``text2sql``). An evaluation scores those of every stage in its
model's lineage (the stage that made it, the one that stage started from, ...), unless its
``add_learned_tasks`` is false. An evaluation that another names as its ``baseline`` scores the
other's additions too: a paired comparison needs the baseline's rows of every task it compares.
Decided from the config alone, the same for the plan and the run. No torch here.
"""

from __future__ import annotations

from typing import Dict, List

from llmexp.sdk import model_sources, node_path, stage_nodes
from llmexp.sdk import technique
from llmexp.plugins.evaluate.harness.registry import Task, embedded_names

EVALUATE = "evaluate"


def learned_tasks(config) -> Dict[str, List[str]]:
    """The task names each evaluate stage of ``config`` adds to its ``tasks``, by stage key, in first-seen order."""
    nodes = dict(stage_nodes(config, strict=False))
    sources = model_sources(config)
    evaluations = [key for key, node in nodes.items() if node.get("name") == EVALUATE]
    from_comparisons: Dict[str, List[str]] = {key: [] for key in evaluations}
    added: Dict[str, List[str]] = {}
    for key in reversed(evaluations):  # a comparison comes after its baseline: its additions are known first
        own = _lineage_learned(config, nodes, sources, key) if nodes[key].get("add_learned_tasks", True) else []
        added[key] = _unique(own + from_comparisons[key])
        baseline = nodes[key].get("baseline")
        if baseline in from_comparisons:
            from_comparisons[baseline] += added[key]
    return {key: added[key] for key in evaluations}


def learned_problems(learned: Dict[str, List[str]]) -> List[str]:
    """Tasks of ``learned_tasks`` the evaluation does not have: a technique's ``measured_by`` naming no embedded task."""
    return [
        f"{node_path(key)}: a technique that made its model names {name!r} as what measures its training "
        f"(measured_by), which is not an embedded evaluation task ({', '.join(embedded_names())}); set "
        f"{node_path(key)}.add_learned_tasks=false, and tell the technique's author."
        for key, names in learned.items()
        for name in names
        if name not in embedded_names()
    ]


def added_tasks(tasks: List[Task], learned: List[str]) -> List[Task]:
    """The ``learned`` tasks ``tasks`` lacks by name: a task of one's own under that name stays as it is."""
    names = {task.name for task in tasks}
    return [Task(name) for name in learned if name not in names]


def _lineage_learned(config, nodes, sources, key: str) -> List[str]:
    """What the stages that made the model ``key`` starts from learned, that stage first, then its own start."""
    found: List[str] = []
    seen = set()  # pipeline.inputs pointing backwards make a cycle: the plan reports it, this must end
    stage = sources.get(key)
    while stage in nodes and stage not in seen:
        seen.add(stage)
        found += technique(nodes[stage].name).measured_by(config)
        stage = sources.get(stage)
    return found


def _unique(names: List[str]) -> List[str]:
    return list(dict.fromkeys(names))
