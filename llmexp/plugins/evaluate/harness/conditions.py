"""Evaluation conditions: what a model reads before each question of a generation or multiple-choice task.

* ``closed_book`` (the default): the question alone, the prompts every task has always had;
* ``few_shot``: ``num_fewshot`` solved examples first, from the task's own training-side pool (never a test item);
* ``rag``: the passages the run's ``retriever`` finds for the question, as ``llmexp.sdk.with_context`` writes
  them (``Context: ...`` then the prompt: the format a reader model is trained on and ``llmexp serve`` prompts with).

The retriever is searched with the question, never with a whole prompt (shots or option letters would only add
noise). A task type honours the conditions its ``conditions`` name; under another it is scored closed-book, and the
stage says so. The items are the same in every condition, so two evaluations of one model in different conditions
compare item by item (``paired.py``: each row's ``question`` pairs it).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from llmexp.sdk import INDEX_DIRECTORY, TaskInputs, build_retriever, with_context

CLOSED_BOOK, FEW_SHOT, RAG = "closed_book", "few_shot", "rag"
CONDITIONS = (CLOSED_BOOK, FEW_SHOT, RAG)


def condition_problems(node, prefix: str, retriever: str) -> List[str]:
    """Problems with an evaluate node's ``condition`` (``retriever``: the run's retriever option)."""
    condition = node.condition
    if condition not in CONDITIONS:
        return [f"{prefix}.condition={condition} is not a condition; choose one of {', '.join(CONDITIONS)}."]
    if condition == FEW_SHOT and node.num_fewshot < 1:
        return [
            f"{prefix}.condition=few_shot puts {prefix}.num_fewshot solved examples before each question, and "
            f"{prefix}.num_fewshot={node.num_fewshot}; set {prefix}.num_fewshot=3 (or any number from 1)."
        ]
    if node.get("passages") is not None and node.passages < 1:
        return [f"{prefix}.passages={node.passages}: a rag question reads at least one passage; set it to 1 or more, "
                "or null for retriever.top_k."]
    if condition == RAG and retriever == "none":
        return [
            f"{prefix}.condition=rag puts the passages a retriever finds before each question, but retriever=none "
            "finds none; choose a retriever: retriever=bm25 (or retriever=dense, retriever=hybrid)."
        ]
    return []


def task_inputs(task, inputs: TaskInputs) -> TaskInputs:
    """``inputs`` for ``task`` (``registry.Task``): closed-book where its type does not honour the condition."""
    if inputs.condition == CLOSED_BOOK or inputs.condition in task.type.conditions:
        return inputs
    return replace(inputs, condition=CLOSED_BOOK, retrieve=None)


def unconditioned(tasks: Sequence, condition: str) -> List[str]:
    """Names of the ``tasks`` scored closed-book under ``condition`` (their types do not honour it)."""
    if condition == CLOSED_BOOK:
        return []
    return [task.name for task in tasks if condition not in task.type.conditions]


def with_shots(spec: Mapping[str, Any], task_type, condition: str, num_fewshot: int) -> Dict[str, Any]:
    """A described task's spec under ``condition``: a type with solved examples of its own (``num_fewshot`` among
    its keys) takes the evaluation's ``num_fewshot`` under few_shot, unless its entry sets one itself."""
    spec = dict(spec)
    if condition == FEW_SHOT and "num_fewshot" in task_type.keys and spec.get("num_fewshot") is None:
        spec["num_fewshot"] = num_fewshot
    return spec


def retriever_for(cfg, stage_dir: Path, passages: Optional[int] = None):
    """The rag condition's search: the run's retriever over its index in ``<stage dir>/retrieval_index``, finding
    ``passages`` per question (None: ``retriever.top_k``), so one pipeline can ask with one passage and with five."""
    retriever = build_retriever(cfg, Path(stage_dir) / INDEX_DIRECTORY)
    return lambda questions: retriever.search(questions, passages)


class Prompts:
    """One task's items under its condition: their prompts, and what each row records of how it was asked.

    ``questions`` are the items' questions (the retriever's queries); retrieval happens once, here, and every
    prompt of an item (a multiple-choice item has two) gets the same passages.
    """

    def __init__(self, inputs: TaskInputs, questions: Sequence[str]):
        self.condition = inputs.condition
        self.questions = list(questions)
        self.hits: Optional[List[List[Any]]] = inputs.retrieve(self.questions) if self.condition == RAG else None

    def __call__(self, prompts: Sequence[str], shots: Optional[Sequence[str]] = None) -> List[str]:
        """``prompts`` (one per item) as the condition asks; ``shots``: each item's solved examples under few_shot
        (None: the prompts hold their task's own)."""
        if self.condition == FEW_SHOT and shots is not None:
            return [shot + prompt for shot, prompt in zip(shots, prompts)]
        if self.condition == RAG:
            return [with_context(prompt, hits) for prompt, hits in zip(prompts, self.hits)]
        return list(prompts)

    def row(self, index: int) -> Dict[str, Any]:
        """What item ``index``'s row records: its question, the condition and, under rag, the passages it read."""
        row: Dict[str, Any] = {"question": self.questions[index], "condition": self.condition}
        if self.hits is not None:
            row["passages"] = [hit.passage.id for hit in self.hits[index]]
        return row


def solved(examples: Sequence[str], delimiter: str = "\n\n") -> str:
    """Solved examples as one prefix, each followed by ``delimiter`` (lm-eval's fewshot_delimiter)."""
    return "".join(example + delimiter for example in examples)
