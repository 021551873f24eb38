"""GSM8K: grade-school word problems in JSONL, graded by the number after ``####``.

Each line of the real files (``test.jsonl``, ``train.jsonl``) is
``{"question": "...", "answer": "worked steps ...\\n#### 72"}``. The same extraction grades
a model's generated solution, so a problem's reference and a model's answer are read alike.

Extraction is data: ``STRICT_MATCH`` is a tuple of ``AnswerPattern`` tried in order, the
first that matches wins. It is lm-evaluation-harness's ``strict-match``: the number after
the *first* ``####`` (optional spaces and ``$`` between), an optional minus sign, digits
with thousands commas (``1,234`` reads as 1234), an optional decimal part. A trailing
full stop is not part of the number. ``FLEXIBLE_EXTRACT`` adds lm-eval's fallback (the
last number anywhere) for callers that want it; the framework's metrics use the strict one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import List, Optional, Sequence, Union

from llmexp.data.jsonl import PathLike, read_jsonl_numbered
from llmexp.errors import UserError

Number = Union[int, float]

_NUMBER = r"-?[0-9][0-9,]*(?:\.[0-9]+)?"


@dataclass(frozen=True)
class AnswerPattern:
    """A regex whose group 1 is the number; ``which`` match counts when there are several."""

    regex: str
    which: str = "first"  # "first" | "last"


STRICT_MATCH: Sequence[AnswerPattern] = (AnswerPattern(rf"####\s*\$?\s*({_NUMBER})", "first"),)
FLEXIBLE_EXTRACT: Sequence[AnswerPattern] = (*STRICT_MATCH, AnswerPattern(rf"({_NUMBER})", "last"))


@dataclass(frozen=True)
class GSM8KProblem:
    """One problem: ``solution`` is the reference text verbatim, ``answer`` its ``####`` number."""

    question: str
    solution: str
    answer: Number

    @property
    def prompt(self) -> str:
        """The zero-shot prompt; the model continues with a worked solution ending in ``#### N``."""
        return f"Question: {self.question}\nAnswer:"


def parse_number(text: str) -> Optional[Number]:
    """``"1,234"`` -> 1234, ``"-5"`` -> -5, ``"2.50"`` -> 2.5; None when ``text`` is not a number."""
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    return int(value) if value == value.to_integral_value() else float(value)


def extract_answer(text: str, patterns: Sequence[AnswerPattern] = STRICT_MATCH) -> Optional[Number]:
    """The answer in a worked solution (reference or generated), or None when no pattern matches."""
    for pattern in patterns:
        matches = re.findall(pattern.regex, text)
        if matches:
            found = matches[0] if pattern.which == "first" else matches[-1]
            return parse_number(found if isinstance(found, str) else found[0])
    return None


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
        for key in ("question", "answer"):
            if not isinstance(record.get(key), str):
                found = "missing" if key not in record else f"{json.dumps(record[key])[:40]}, not text"
                keys = ", ".join(sorted(record)) or "none"
                raise UserError(
                    f"{path}:{line}: the {key!r} field is {found} (keys on that line: {keys}). "
                    'GSM8K lines look like {"question": "...", "answer": "worked steps ...\\n#### 72"}.'
                )
        answer = extract_answer(record["answer"])
        if answer is None:
            raise UserError(
                f"{path}:{line}: the answer does not contain '#### <number>' (it ends {record['answer'][-40:]!r}). "
                "GSM8K answers end with the final number after '####', e.g. '...\\n#### 72'."
            )
        problems.append(GSM8KProblem(record["question"], record["answer"], answer))
    return problems
