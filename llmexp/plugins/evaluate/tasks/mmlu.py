"""MMLU from the files of its original release, scored exactly as lm-evaluation-harness 0.4.13 scores it.

``{type: mmlu, path: data/mmlu, num_fewshot: 5}`` reads the layout the release unpacks to
(``<path>/test/<subject>_test.csv`` and ``<path>/dev/<subject>_dev.csv``, or the same under
``<path>/data/``): header-less CSV rows of question, four choices and the answer letter.
Each question is asked with lm-eval's ``mmlu`` prompt (its description, the first
``num_fewshot`` dev rows of the subject in file order as solved examples, then the
question ending ``Answer:``) and the letter whose continuation `` A``..`` D`` is most
likely is the model's answer. Same prompts, same log-likelihood convention
(``harness/scoring.py``), so ``acc`` equals lm-eval's group score on the same model
(``tests/test_mmlu.py`` runs both).

Metrics: ``acc`` (all questions: lm-eval's micro-averaged group score), ``acc_macro``
(the mean of the subjects' accuracies) and ``acc_<subject>``. A ``limit`` applies per
subject, as lm-eval's ``--limit`` does per subtask.

Conditions (``harness/conditions.py``): under ``few_shot`` an entry without ``num_fewshot`` takes the evaluation's;
under ``rag`` the passages retrieved for the question come first (``Context: ...``), then the prompt above.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from llmexp.sdk import UserError
from llmexp.sdk import Metric, MetricKind, statistics
from llmexp.sdk import TaskInputs, TaskResult, TaskType, declared
from llmexp.plugins.evaluate.harness.conditions import FEW_SHOT, RAG, Prompts

LETTERS = ("A", "B", "C", "D")
_TEST_SUFFIX, _DEV_SUFFIX = "_test.csv", "_dev.csv"
_ROW_LAYOUT = "question, A, B, C, D, answer letter (no header)"


@dataclass(frozen=True)
class Question:
    question: str
    choices: Tuple[str, str, str, str]
    answer: str  # a letter of LETTERS

    def shown(self) -> str:
        """The question as lm-eval's ``doc_to_text`` renders it, up to ``Answer:``."""
        options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, self.choices))
        return f"{self.question.strip()}{options}\nAnswer:"


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def prompt(subject: str, shots: Sequence[Question], question: Question) -> str:
    """lm-eval's mmlu context: description, solved shots joined by a blank line, the question."""
    solved = "".join(f"{shot.shown()} {shot.answer}\n\n" for shot in shots)
    return description(subject) + solved + question.shown()


def data_root(path: Any) -> Path:
    """The directory holding ``test/`` (``path`` itself or ``path/data``, as the release unpacks)."""
    root = Path(str(path))
    return root / "data" if not (root / "test").is_dir() and (root / "data" / "test").is_dir() else root


def subjects_in(root: Path) -> List[str]:
    """Subjects with a test file, sorted (lm-eval's order)."""
    return sorted(p.name[: -len(_TEST_SUFFIX)] for p in (root / "test").glob(f"*{_TEST_SUFFIX}") if p.is_file())


def read_questions(path: Path) -> List[Question]:
    """The questions of one MMLU CSV, in file order; a malformed row is a ``UserError`` at ``file:line``.

    Fields may be quoted and hold commas, quotes and newlines (the csv module's dialect is
    the release's); blank lines are skipped, as pandas does when lm-eval reads the files.
    """
    questions: List[Question] = []
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as error:
        raise UserError(f"{path} cannot be read ({error.strerror}); give a readable MMLU CSV file.") from None
    with handle:
        reader = csv.reader(handle)
        while True:
            line = reader.line_num + 1  # where the next row starts (a quoted field may span lines)
            try:
                row = next(reader)
            except StopIteration:
                break
            except (csv.Error, UnicodeDecodeError) as error:
                raise UserError(f"{path}:{line}: not readable as CSV ({error}). Fix the quoting or save as UTF-8.") from None
            if not row:
                continue
            if len(row) != 6:
                raise UserError(
                    f"{path}:{line}: {len(row)} fields, MMLU rows have 6 ({_ROW_LAYOUT}). "
                    "Quote fields that contain commas, and double quotes inside them (\"\")."
                )
            answer = row[5].strip()
            if answer not in LETTERS:
                raise UserError(f"{path}:{line}: the answer {row[5]!r} is not one of A, B, C, D; correct that field.")
            questions.append(Question(row[0], (row[1], row[2], row[3], row[4]), answer))
    return questions


def run(spec: Mapping[str, Any], inputs: TaskInputs, scorer) -> TaskResult:
    root = data_root(spec["path"])
    num_fewshot = int(spec.get("num_fewshot") or 0)
    subjects = list(spec.get("subjects") or subjects_in(root))
    asked: List[Tuple[str, str, Question]] = []
    for subject in subjects:
        shots = read_questions(root / "dev" / f"{subject}{_DEV_SUFFIX}")[:num_fewshot] if num_fewshot else []
        for question in inputs.first(read_questions(root / "test" / f"{subject}{_TEST_SUFFIX}")):
            asked.append((subject, prompt(subject, shots, question), question))
    conditioned = Prompts(inputs, [question.question for _, _, question in asked])
    texts = conditioned([text for _, text, _ in asked])
    scores = scorer.loglikelihood([(text, f" {letter}") for text in texts for letter in LETTERS])
    rows = []
    for index, ((subject, _, question), text) in enumerate(zip(asked, texts)):
        letter_scores = [score.logprob for score in scores[4 * index : 4 * index + 4]]
        predicted = LETTERS[statistics.argmax(letter_scores)]  # the first of equals, as lm-eval
        rows.append(
            {
                "subject": subject,
                "prompt": text,
                **conditioned.row(index),
                "choices": list(question.choices),
                "expected": question.answer,
                "predicted": predicted,
                "scores": letter_scores,
                "correct": predicted == question.answer,
            }
        )
    per_subject = {subject: _accuracy(row for row in rows if row["subject"] == subject) for subject in subjects}
    metrics = {"acc": _accuracy(rows), "acc_macro": statistics.mean(per_subject.values())}
    metrics.update({f"acc_{subject}": value for subject, value in per_subject.items()})
    return TaskResult(metrics, rows)


def problems(spec: Mapping[str, Any], field: str) -> List[str]:
    path = spec.get("path")
    if not isinstance(path, str) or not path:
        return [f"{field}.path={path!r}: give the MMLU data directory (holding test/<subject>_test.csv and dev/)."]
    root = data_root(path)
    if not root.is_dir():
        return [f"{field}.path={path} is not a directory; give the directory the MMLU release unpacks to (data/)."]
    found = subjects_in(root)
    if not found:
        return [
            f"{field}.path={path} holds no test/<subject>_test.csv files (nor data/test/); give the directory "
            "the MMLU release unpacks to, with test/ and dev/ inside."
        ]
    messages: List[str] = []
    num_fewshot = spec.get("num_fewshot", 0)
    if num_fewshot is None:
        num_fewshot = 0
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        messages.append(f"{field}.num_fewshot={num_fewshot!r} must be a whole number, 0 or more (MMLU's usual: 5).")
        num_fewshot = 0
    subjects = spec.get("subjects")
    if subjects is None:
        subjects = found
    elif not isinstance(subjects, list) or not subjects or not all(isinstance(s, str) for s in subjects):
        return messages + [f"{field}.subjects={subjects!r} must be a list of subject names, e.g. [anatomy, astronomy]."]
    unknown = [s for s in subjects if s not in found]
    if unknown:
        messages.append(
            f"{field}.subjects names {', '.join(unknown)}, with no test file in {root / 'test'}; "
            f"subjects there: {', '.join(found)}."
        )
    for subject in (s for s in subjects if s in found):
        messages += _file_problems(root / "test" / f"{subject}{_TEST_SUFFIX}", field, None)
        if num_fewshot:
            messages += _file_problems(root / "dev" / f"{subject}{_DEV_SUFFIX}", field, num_fewshot)
    return messages


def _file_problems(path: Path, field: str, shots_needed: Optional[int]) -> List[str]:
    if shots_needed and not path.is_file():
        return [
            f"{field}.num_fewshot={shots_needed} takes solved examples from {path}, which does not exist; "
            "add the subject's dev file or set num_fewshot: 0."
        ]
    try:
        count = len(read_questions(path))
    except UserError as error:
        return [f"{field}: {error}"]
    if not shots_needed and count == 0:
        return [f"{field}: {path} holds no questions; remove it or add rows ({_ROW_LAYOUT})."]
    if shots_needed and count < shots_needed:
        return [f"{field}.num_fewshot={shots_needed} but {path} holds {count} rows; lower num_fewshot to {count} or less."]
    return []


def _accuracy(rows) -> float:
    return statistics.mean(row["correct"] for row in rows)


MMLU = TaskType(
    "mmlu", run, problems, keys=("path", "num_fewshot", "subjects"), headline="acc", conditions=(FEW_SHOT, RAG),
    metrics=declared(Metric("acc", True, "acc", MetricKind.QUALITY), Metric("acc_macro", True, "acc_macro", MetricKind.INFO)),
)
