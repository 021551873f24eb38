"""Multiple choice by continuation (HellaSwag, ARC, PIQA style) over a JSONL file, graded as lm-eval grades it.

``{type: continuation, path: hellaswag_val.jsonl, choices_field: endings}``: each line holds
a context, its choices and the right one. Every choice is scored as the continuation
``" " + choice`` of the context (lm-eval's ``multiple_choice`` output type with its default
target delimiter); the most likely is the answer. With ``num_fewshot`` = k, the first k
lines of ``fewshot_path`` precede each context, solved (``context + " " + right choice``)
and separated by a blank line, as lm-eval's ``first_n`` sampler does.

Metrics as lm-eval names them: ``acc`` (highest log-likelihood), ``acc_norm`` (divided by
the choice's length in characters) and ``acc_bytes`` (by its length in UTF-8 bytes).

A line's ``choices`` field is a list of strings, or ARC's mapping ``{text: [...], label:
[...]}``. Its ``label`` is the right choice: an index (``2`` or ``"2"``, HellaSwag's
layout), one of the mapping's labels (ARC's ``answerKey``), a letter (``"C"``) or the
choice's text, tried in that order.

Conditions (``harness/conditions.py``): under ``few_shot`` an entry without ``num_fewshot`` takes the evaluation's
(from ``fewshot_path``); under ``rag`` the passages retrieved for the context come before the prompt above.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Mapping, Sequence

from llmexp.data.jsonl import read_jsonl_numbered
from llmexp.sdk import UserError
from llmexp.sdk import Metric, MetricKind, statistics
from llmexp.sdk import TaskInputs, TaskResult, TaskType, declared
from llmexp.plugins.evaluate.harness.conditions import FEW_SHOT, RAG, Prompts

KEYS = ("path", "context_field", "choices_field", "label_field", "num_fewshot", "fewshot_path")
DEFAULT_FIELDS = {"context_field": "context", "choices_field": "choices", "label_field": "label"}


@dataclass(frozen=True)
class Item:
    context: str
    choices: List[str]
    answer: int  # index into choices

    def solved(self) -> str:
        return f"{self.context} {self.choices[self.answer]}"


def read_items(path: Any, spec: Mapping[str, Any]) -> List[Item]:
    """The items of a JSONL file with ``spec``'s field names; a bad line is a ``UserError`` at ``file:line``."""
    fields = {key: spec.get(key) or default for key, default in DEFAULT_FIELDS.items()}
    items = []
    for number, record in read_jsonl_numbered(Path(str(path))):
        where = f"{path}:{number}"
        missing = [name for name in fields.values() if name not in record]
        if missing:
            raise UserError(
                f"{where}: no field {', '.join(map(repr, missing))} (the line has {', '.join(map(repr, record))}). "
                "Name the fields with context_field, choices_field and label_field."
            )
        context = record[fields["context_field"]]
        if not isinstance(context, str):
            raise UserError(f"{where}: the context field {fields['context_field']!r} must be a string, not {context!r}.")
        choices, labels = _choices(record[fields["choices_field"]], where, fields["choices_field"])
        answer = _answer(record[fields["label_field"]], choices, labels)
        if answer is None:
            raise UserError(
                f"{where}: the label {record[fields['label_field']]!r} names none of the {len(choices)} choices. "
                "Give its index (0-based), its letter (A, B, ...), its label or its text."
            )
        items.append(Item(context, choices, answer))
    return items


def prompt(shots: Sequence[Item], item: Item) -> str:
    return "".join(f"{shot.solved()}\n\n" for shot in shots) + item.context


def run(spec: Mapping[str, Any], inputs: TaskInputs, scorer) -> TaskResult:
    num_fewshot = int(spec.get("num_fewshot") or 0)
    shots = read_items(spec["fewshot_path"], spec)[:num_fewshot] if num_fewshot else []
    items = inputs.first(read_items(spec["path"], spec))
    asked = Prompts(inputs, [item.context for item in items])
    contexts = asked([prompt(shots, item) for item in items])
    scores = iter(scorer.loglikelihood([(text, f" {choice}") for text, item in zip(contexts, items) for choice in item.choices]))
    rows = []
    for index, (text, item) in enumerate(zip(contexts, items)):
        logprobs = [next(scores).logprob for _ in item.choices]
        picked = statistics.argmax(logprobs)  # the first of equals, as lm-eval's
        chars = [float(len(choice)) for choice in item.choices]
        utf8 = [float(len(choice.encode("utf-8"))) for choice in item.choices]
        by_chars = statistics.argmax([lp / length for lp, length in zip(logprobs, chars)])
        by_bytes = statistics.argmax([lp / length for lp, length in zip(logprobs, utf8)])
        rows.append(
            {
                "prompt": text,
                **asked.row(index),
                "choices": item.choices,
                "expected": item.choices[item.answer],
                "predicted": item.choices[picked],
                "predicted_norm": item.choices[by_chars],
                "scores": logprobs,
                "correct": picked == item.answer,
                "correct_norm": by_chars == item.answer,
                "correct_bytes": by_bytes == item.answer,
            }
        )
    metrics = {
        "acc": statistics.mean(row["correct"] for row in rows),
        "acc_norm": statistics.mean(row["correct_norm"] for row in rows),
        "acc_bytes": statistics.mean(row["correct_bytes"] for row in rows),
    }
    return TaskResult(metrics, rows)


def problems(spec: Mapping[str, Any], field: str) -> List[str]:
    messages = []
    for key in DEFAULT_FIELDS:
        value = spec.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            messages.append(f"{field}.{key}={value!r} must be the name of a JSON field.")
    num_fewshot = spec.get("num_fewshot") or 0
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        messages.append(f"{field}.num_fewshot={num_fewshot!r} must be a whole number, 0 or more.")
        num_fewshot = 0
    if num_fewshot and not spec.get("fewshot_path"):
        messages.append(
            f"{field}.num_fewshot={num_fewshot} takes solved examples from fewshot_path, which is unset; "
            "set fewshot_path to a JSONL file in the same layout (a training split)."
        )
    if messages:
        return messages
    for key, needed in (("path", None), ("fewshot_path", num_fewshot)):
        path = spec.get(key)
        if key == "path" and not path:
            messages.append(f"{field}.path is unset; give a JSONL file, one question per line.")
            continue
        if path is None or (key == "fewshot_path" and not needed):
            continue
        try:
            count = len(read_items(path, spec))
        except UserError as error:
            messages.append(f"{field}.{key}: {error}")
            continue
        if needed and count < needed:
            messages.append(f"{field}.num_fewshot={needed} but {key}={path} holds {count} lines; lower num_fewshot.")
        elif not count:
            messages.append(f"{field}.{key}={path} holds no lines; give a file with one question per line.")
    return messages


def _choices(value: Any, where: str, name: str):
    """The choice texts and, for ARC's ``{text, label}`` mapping, their labels."""
    labels: List[str] = []
    if isinstance(value, Mapping) and "text" in value:
        value, labels = value["text"], [str(label) for label in value.get("label") or []]
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(choice, str) for choice in value):
        raise UserError(
            f"{where}: the choices field {name!r} must be a list of at least two strings "
            f"(or {{text: [...], label: [...]}}), not {value!r}."
        )
    if labels and len(labels) != len(value):
        raise UserError(f"{where}: {len(labels)} labels for {len(value)} choices in {name!r}; give one label per choice.")
    return value, labels


def _answer(label: Any, choices: List[str], labels: List[str]):
    """Index of the choice ``label`` names, or None (see the module docstring for the order)."""
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label if 0 <= label < len(choices) else None
    if not isinstance(label, str):
        return None
    text = label.strip()
    if text in labels:
        return labels.index(text)
    if text.isdigit():
        return int(text) if int(text) < len(choices) else None
    if len(text) == 1 and text in string.ascii_uppercase[: len(choices)]:
        return string.ascii_uppercase.index(text)
    return choices.index(label) if label in choices else None


CONTINUATION = TaskType(
    "continuation", run, problems, keys=KEYS, headline="acc", conditions=(FEW_SHOT, RAG),
    metrics=declared(*(Metric(name, True, name, MetricKind.QUALITY if name == "acc" else MetricKind.INFO)
                       for name in ("acc", "acc_norm", "acc_bytes"))),
)
