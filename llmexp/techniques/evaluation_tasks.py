"""The evaluation task contract: a ``TaskType`` says what ``tasks`` entries name it, how it scores them, what it reports.

Built-in task types and a third party's arrive the same way, through the
``llmexp_evaluation_tasks`` hook, and import this through ``llmexp.sdk``. A task type is either
*embedded* (named bare in ``tasks``, ``multiple_choice``: it reads the package's generated
data and its metric names are what it returns) or *described* (a mapping ``{type: mmlu,
path: ..., num_fewshot: 5}`` over the user's data, named by its ``name`` key or its type,
its metrics prefixed with that name, so several of one type run side by side). No torch
here: the planner checks every entry before a run starts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from llmexp.data.embedded import EmbeddedWorld
from llmexp.techniques.contract import Metric


@dataclass
class TaskInputs:
    """The data a task draws on besides its spec; ``limit`` caps the items of every task."""

    world: Optional[EmbeddedWorld]
    heldout_documents: int = 200
    limit: Optional[int] = None
    gsm8k_path: Optional[str] = None
    num_fewshot: int = 0
    stage_dir: Optional[str] = None  # where a task may keep scratch files (code execution) beside its rows
    config: Any = None  # the run's config: the retriever (cfg.retriever) and documents a retrieval task scores
    # what precedes each question (the evaluation's ``condition``): nothing (closed_book), ``num_fewshot`` solved
    # examples (few_shot) or retrieved passages (rag); a task type honours those its ``conditions`` name
    condition: str = "closed_book"
    retrieve: Optional[Callable[[Sequence[str]], List[List[Any]]]] = None  # rag: each question's hits, best first

    def first(self, items: Sequence[Any]) -> List[Any]:
        return list(items if self.limit is None else items[: self.limit])

    def shots(self, examples: Sequence[Any]) -> List[Any]:
        """``num_fewshot`` examples drawn once per world seed, the same for every item."""
        return random.Random(f"{self.world.seed}/fewshot").sample(list(examples), self.num_fewshot)


@dataclass
class TaskResult:
    metrics: Dict[str, float]
    rows: List[Dict[str, Any]] = field(default_factory=list)  # one per item, for <task>.jsonl


def no_problems(spec: Mapping[str, Any], field: str) -> List[str]:
    """The check of a task type whose entries take no settings."""
    return []


def no_metrics(spec: Mapping[str, Any]) -> Tuple[Metric, ...]:
    """The declaration of a task type that declares none (its metrics still reach results.json)."""
    return ()


def declared(*metrics: Metric) -> Callable[[Mapping[str, Any]], Tuple[Metric, ...]]:
    """The ``metrics`` of a task type whose metrics do not depend on its spec."""
    return lambda spec: metrics


@dataclass(frozen=True)
class TaskType:
    """One kind of evaluation task.

    ``run(spec, inputs, scorer)`` reads the items (the entry's ``spec``, ``inputs``) and
    scores them through ``scorer`` (the evaluation's: ``loglikelihood``, ``generate``,
    ``document_nll``, ``sliding_window_nll`` of the model it evaluates);
    ``spec`` is the entry as plain data (``{}`` for an embedded task). ``problems(spec,
    field)`` checks an entry before anything runs (files present and well-formed, values in
    range) without importing torch; ``field`` is the entry's config path for the messages.
    ``keys`` are the spec keys it takes besides ``type``, ``name`` and ``limit``. ``headline``
    is the metric its rows' ``correct`` flags make (what a paired comparison tests).
    ``metrics(spec)`` declares what it reports as ``llmexp.sdk.Metric`` values, named as
    ``run`` names them: the report takes directions and labels from them.
    """

    name: str
    run: Callable[[Mapping[str, Any], TaskInputs, Any], TaskResult]
    problems: Callable[[Mapping[str, Any], str], List[str]] = no_problems
    keys: Tuple[str, ...] = ()
    headline: Optional[str] = None
    metrics: Callable[[Mapping[str, Any]], Tuple[Metric, ...]] = no_metrics
    embedded: bool = False  # named bare in ``tasks`` over the package's data; its metric names unprefixed
    conditions: Tuple[str, ...] = ()  # the conditions besides closed_book its prompts honour (TaskInputs.condition)
