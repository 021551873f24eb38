"""GSM8K's format: word problems in JSONL with worked answers ending ``#### N``, and how answers are pulled out.

Each line of the real files (``test.jsonl``, ``train.jsonl``) is
``{"question": "...", "answer": "worked steps ...\\n#### 72"}``. The same extraction grades
a model's generated solution, so a problem's reference and a model's answer are read alike.
Every GSM8K-style evaluation reads its files and extracts its answers here: the embedded
``gsm8k`` and ``word_problems`` tasks, and the ``generation`` task type, whose filters are
``AnswerFilter`` values given as data.

Extraction is data: ``STRICT_MATCH`` is a tuple of ``AnswerFilter`` tried in order, the
first that matches wins: the number after the *first* ``####`` (optional spaces and ``$``
between), an optional minus sign, digits with thousands commas (``1,234`` reads as 1234),
an optional decimal part. A trailing full stop is not part of the number.
``FLEXIBLE_EXTRACT`` adds lm-eval's fallback (the last number anywhere) for callers that
want it; the framework's metrics use the strict one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Union

from llmexp.data.jsonl import PathLike, read_jsonl_numbered
from llmexp.errors import UserError

Number = Union[int, float]

_NUMBER = r"-?[0-9][0-9,]*(?:\.[0-9]+)?"
# How GSM8K asks a question (lm-evaluation-harness's gsm8k prompt); the model continues with a worked solution.
PROMPT = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class AnswerFilter:
    """A regex that pulls an answer out of a text (lm-evaluation-harness's ``regex`` filter).

    ``select`` picks the match (``first``, ``last`` or an index, as lm-eval's
    ``group_select``); ``group`` picks the capturing group (number or name). Without a
    ``group``, the first non-empty group counts, or the whole match for a regex without
    groups. ``name`` names the metric a ``generation`` task makes of it.
    """

    regex: str
    select: Union[str, int] = "first"
    group: Union[int, str, None] = None
    name: str = ""

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], index: int) -> "AnswerFilter":
        """The filter a ``filters`` entry (``name``, ``regex``, ``group``, ``select``) describes; unnamed, its place."""
        name = str(spec.get("name") or f"filter_{index + 1}")
        return cls(spec["regex"], spec.get("select", "first"), spec.get("group"), name)

    def extract(self, text: str) -> Optional[str]:
        """The selected answer in ``text``, stripped, or None when the regex does not match there."""
        pattern = re.compile(self.regex)
        matches = list(pattern.finditer(text))
        index = {"first": 0, "last": -1}.get(self.select, self.select)
        if not matches or not -len(matches) <= index < len(matches):
            return None
        match = matches[index]
        if self.group is not None:
            found = match.group(self.group)
        elif pattern.groups:
            found = next((g for g in match.groups() if g), None)
        else:
            found = match.group(0)
        return None if found is None else found.strip()


STRICT_MATCH: Sequence[AnswerFilter] = (AnswerFilter(rf"####\s*\$?\s*({_NUMBER})", "first"),)
FLEXIBLE_EXTRACT: Sequence[AnswerFilter] = (*STRICT_MATCH, AnswerFilter(rf"({_NUMBER})", "last"))


@dataclass(frozen=True)
class SolvedProblem:
    """A question and its worked answer, verbatim (a few-shot example's target; the reference's source)."""

    question: str
    solution: str

    @property
    def prompt(self) -> str:
        """The zero-shot prompt; the model continues with a worked solution ending in ``#### N``."""
        return PROMPT.format(question=self.question)

    @property
    def final_answer(self) -> str:
        """The text after the solution's last ``####``, or the whole solution without one."""
        return self.solution.rsplit("####", 1)[-1].strip()


@dataclass(frozen=True)
class GSM8KProblem(SolvedProblem):
    """A problem whose solution ends in a number: ``answer`` is its ``####`` number (``STRICT_MATCH``)."""

    answer: Number


def parse_number(text: str) -> Optional[Number]:
    """``"1,234"`` -> 1234, ``"-5"`` -> -5, ``"2.50"`` -> 2.5; None when ``text`` is not a number."""
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    return int(value) if value == value.to_integral_value() else float(value)


def extract_answer(text: str, patterns: Sequence[AnswerFilter] = STRICT_MATCH) -> Optional[Number]:
    """The answer in a worked solution (reference or generated), or None when no pattern matches."""
    for pattern in patterns:
        found = pattern.extract(text)
        if found is not None:
            return parse_number(found)
    return None


def solved_problem(
    path: PathLike, line: int, record: Mapping[str, Any], question_field: str = "question", answer_field: str = "answer"
) -> SolvedProblem:
    """Line ``line`` of ``path`` as a problem; ``UserError`` at ``file:line`` unless both fields hold text."""
    for key in (question_field, answer_field):
        if not isinstance(record.get(key), str):
            found = "missing" if key not in record else f"{json.dumps(record[key])[:40]}, not text"
            keys = ", ".join(sorted(record)) or "none"
            raise UserError(
                f"{path}:{line}: the {key!r} field is {found} (keys on that line: {keys}). GSM8K lines look like "
                f'{{"{question_field}": "...", "{answer_field}": "worked steps ...\\n#### 72"}}.'
            )
    return SolvedProblem(record[question_field], record[answer_field])


def read_solved_problems(
    path: PathLike, question_field: str = "question", answer_field: str = "answer"
) -> List[SolvedProblem]:
    """The questions and worked answers of a GSM8K-layout JSONL file, in file order (``solved_problem`` checks each)."""
    lines = read_jsonl_numbered(path)
    return [solved_problem(path, line, record, question_field, answer_field) for line, record in lines]


def load_gsm8k(path: PathLike, limit: Optional[int] = None) -> List[GSM8KProblem]:
    """The problems in a GSM8K-format JSONL file, in file order (at most ``limit``).

    A line without a string ``question`` or ``answer``, or whose answer has no ``#### N``,
    raises ``UserError`` naming ``file:line``.
    """
    path = Path(path)
    problems: List[GSM8KProblem] = []
    for line, record in read_jsonl_numbered(path):
        if limit is not None and len(problems) >= limit:
            break
        problem = solved_problem(path, line, record)
        answer = extract_answer(problem.solution)
        if answer is None:
            raise UserError(
                f"{path}:{line}: the answer does not contain '#### <number>' (it ends {problem.solution[-40:]!r}). "
                "GSM8K answers end with the final number after '####', e.g. '...\\n#### 72'."
            )
        problems.append(GSM8KProblem(problem.question, problem.solution, answer))
    return problems
