"""Free generation graded by regex answer filters: the ``generation`` task type (GSM8K and its kin).

A JSONL of questions and worked answers ending ``#### N`` (GSM8K's layout; field names
configurable) is prompted as lm-evaluation-harness's ``gsm8k`` task does, the model writes
a solution, and each *filter* (a regex given as data) pulls an answer out of it; each
filter gives its own metric, so a strict format check and a lenient extraction are read
side by side. Defaults are lm-eval's gsm8k:

* prompt ``Question: {question}\\nAnswer:``; ``num_fewshot`` solved examples from
  ``fewshot_path`` come first, each ``Question: ...\\nAnswer: <full solution>``, joined by
  a blank line. Shots are the file's first k (``fewshot_sampling: first``) or one seeded
  sample of k (``random``, ``fewshot_seed``), the same for every question.
* decoding stops at ``Question:``, ``</s>``, ``<|im_end|>`` (and EOS); greedy unless
  ``do_sample`` (then ``temperature``, ``top_p``, ``seed``; ``repeats`` samples per question).
* filters ``strict-match`` (the number after ``#### ``, first match) and
  ``flexible-extract`` (the last number anywhere).
* both the extracted answer and the reference (the text after the reference's last
  ``####``, or all of it when it has none) are normalised as lm-eval's ``exact_match``:
  ``regexes_to_ignore`` (commas, ``$``, a trailing full stop) removed, case ignored; then
  two numbers are compared as numbers (``1,000`` = ``1000``, ``7.0`` = ``7``).

Metrics: ``exact_match_<filter>`` for each filter and ``exact_match``, the first filter's
(the headline its rows' ``correct`` flags make). With ``repeats`` k > 1 these grade the
first sample, as lm-eval's ``take_first``; ``maj_at_<k>_<filter>`` grades the most common
answer of the k (maj@k, ties to the earliest) and ``mean_at_<k>_<filter>`` is the mean
over all k samples.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from llmexp.data.gsm8k import Number, parse_number
from llmexp.data.jsonl import read_jsonl_numbered, require_text
from llmexp.sdk import UserError
from llmexp.plugins.evaluate.tasks import TaskInputs, TaskResult, TaskType

DEFAULT_FILTERS = (
    {"name": "strict-match", "regex": r"#### (\-?[0-9\.\,]+)", "group": 1, "select": "first"},
    {"name": "flexible-extract", "regex": r"(-?[$0-9.,]{2,})|(-?[0-9]+)", "select": "last"},
)
DEFAULTS: Dict[str, Any] = {
    "question_field": "question",
    "answer_field": "answer",
    "fewshot_path": None,
    "num_fewshot": 0,
    "fewshot_sampling": "first",
    "fewshot_seed": 1234,
    "template": "Question: {question}\nAnswer:",
    "target_delimiter": " ",
    "fewshot_delimiter": "\n\n",
    "stop": ["Question:", "</s>", "<|im_end|>"],
    "max_new_tokens": None,  # None: the evaluation's max_new_tokens
    "do_sample": False,
    "temperature": 1.0,
    "top_p": 1.0,
    "seed": 0,
    "repeats": 1,
    "filters": [dict(f) for f in DEFAULT_FILTERS],
    "ignore_case": True,
    "ignore_punctuation": False,
    "regexes_to_ignore": [",", r"\$", r"(?s).*#### ", r"\.$"],
}
_FILTER_KEYS = ("name", "regex", "group", "select")
_SELECTS = ("first", "last")


@dataclass(frozen=True)
class AnswerFilter:
    """A regex that pulls an answer out of a generated text.

    ``select`` picks the match (``first``, ``last`` or an index as lm-eval's
    ``group_select``); ``group`` picks the capturing group (number or name). Without a
    ``group``, the first non-empty group counts, or the whole match for a regex without
    groups: lm-eval's ``regex`` filter.
    """

    name: str
    regex: "re.Pattern[str]"
    group: Union[int, str, None] = None
    select: Union[str, int] = "first"

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], index: int) -> "AnswerFilter":
        return cls(
            str(spec.get("name") or f"filter_{index + 1}"),
            re.compile(spec["regex"]),
            spec.get("group"),
            spec.get("select", "first"),
        )

    def extract(self, text: str) -> Optional[str]:
        """The selected answer in ``text``, stripped, or None when the regex does not match there."""
        matches = list(self.regex.finditer(text))
        index = {"first": 0, "last": -1}.get(self.select, self.select)
        if not matches or not -len(matches) <= index < len(matches):
            return None
        match = matches[index]
        if self.group is not None:
            found = match.group(self.group)
        elif self.regex.groups:
            found = next((g for g in match.groups() if g), None)
        else:
            found = match.group(0)
        return None if found is None else found.strip()


@dataclass(frozen=True)
class AnswerNormaliser:
    """lm-eval's ``exact_match`` options; ``key`` turns an answer into what is compared."""

    regexes_to_ignore: Tuple[str, ...]
    ignore_case: bool
    ignore_punctuation: bool

    def key(self, answer: Optional[str]) -> Union[Number, str, None]:
        """The answer after the ignored patterns, case and punctuation are removed; a number when it is one."""
        if answer is None:
            return None
        for pattern in self.regexes_to_ignore:
            answer = re.sub(pattern, "", answer)
        if self.ignore_case:
            answer = answer.lower()
        if self.ignore_punctuation:
            answer = answer.translate(str.maketrans("", "", string.punctuation))
        answer = answer.strip()
        number = parse_number(answer) if answer else None
        return answer if number is None else number


@dataclass(frozen=True)
class WordProblem:
    """One line of the data: the question, and its worked answer (a shot's target; the reference's source)."""

    question: str
    solution: str  # the answer field verbatim: a shot's target

    @property
    def reference(self) -> str:
        """The final answer: the text after the solution's last ``####``, or the whole field without one."""
        return self.solution.rsplit("####", 1)[-1].strip()


def run(spec: Mapping[str, Any], inputs: TaskInputs, scorer) -> TaskResult:
    from llmexp.plugins.evaluate.scoring import Sampling

    spec = {**DEFAULTS, **spec}
    items = inputs.first(_read(spec["path"], spec["question_field"], spec["answer_field"]))
    prefix = _fewshot_prefix(spec)
    prompts = [prefix + spec["template"].format(question=problem.question) for problem in items]
    samples: List[List[str]] = [[] for _ in prompts]
    for repeat in range(spec["repeats"]):
        sampling = Sampling(spec["temperature"], spec["top_p"], spec["seed"] + repeat) if spec["do_sample"] else None
        texts = scorer.generate(prompts, stop=list(spec["stop"]), max_new_tokens=spec["max_new_tokens"], sampling=sampling)
        for item, text in zip(samples, texts):
            item.append(text)
    filters = [AnswerFilter.from_spec(f, i) for i, f in enumerate(spec["filters"])]
    normaliser = AnswerNormaliser(tuple(spec["regexes_to_ignore"]), spec["ignore_case"], spec["ignore_punctuation"])
    rows = [
        _graded(problem, prompt, texts, filters, normaliser)
        for problem, prompt, texts in zip(items, prompts, samples)
    ]
    return TaskResult(_metrics(rows, filters, spec["repeats"]), rows)


def _graded(problem: WordProblem, prompt: str, texts: Sequence[str], filters, normaliser: AnswerNormaliser) -> dict:
    expected = normaliser.key(problem.reference)
    extracted = {f.name: [f.extract(text) for text in texts] for f in filters}
    right = {name: [normaliser.key(a) == expected for a in answers] for name, answers in extracted.items()}
    row = {
        "prompt": prompt,
        "expected": problem.reference,
        "generated": texts[0],
        "predicted": extracted[filters[0].name][0],
        "correct": right[filters[0].name][0],
        "extracted": {name: answers[0] for name, answers in extracted.items()},
        "correct_by_filter": {name: flags[0] for name, flags in right.items()},
    }
    if len(texts) > 1:
        majority = {name: _majority([normaliser.key(a) for a in answers]) for name, answers in extracted.items()}
        row["samples"] = list(texts)
        row["majority"] = majority
        row["correct_majority"] = {name: answer is not None and answer == expected for name, answer in majority.items()}
        row["correct_fraction"] = {name: sum(flags) / len(flags) for name, flags in right.items()}
    return row


def _majority(keys: Sequence[Any]) -> Any:
    """The most common answer (a failed extraction votes too, as lm-eval's majority vote); ties go to the earliest."""
    return Counter(keys).most_common(1)[0][0]


def _metrics(rows: Sequence[dict], filters: Sequence[AnswerFilter], repeats: int) -> Dict[str, float]:
    def mean(values) -> float:
        values = [float(v) for v in values]
        return sum(values) / len(values) if values else float("nan")

    metrics = {"exact_match": mean(row["correct"] for row in rows)}
    for f in filters:
        metrics[f"exact_match_{f.name}"] = mean(row["correct_by_filter"][f.name] for row in rows)
        if repeats > 1:
            metrics[f"maj_at_{repeats}_{f.name}"] = mean(row["correct_majority"][f.name] for row in rows)
            metrics[f"mean_at_{repeats}_{f.name}"] = mean(row["correct_fraction"][f.name] for row in rows)
    return metrics


def _fewshot_prefix(spec: Mapping[str, Any]) -> str:
    """The solved examples before every prompt, each ending with ``fewshot_delimiter``; empty without shots."""
    k = spec["num_fewshot"]
    if not k:
        return ""
    pool = _read(spec["fewshot_path"], spec["question_field"], spec["answer_field"])
    shots = pool[:k] if spec["fewshot_sampling"] == "first" else random.Random(spec["fewshot_seed"]).sample(pool, k)
    return "".join(
        spec["template"].format(question=shot.question)
        + spec["target_delimiter"]
        + shot.solution
        + spec["fewshot_delimiter"]
        for shot in shots
    )


def _read(path: str, question_field: str, answer_field: str) -> List[WordProblem]:
    """Every line's question and answer, in file order; a line lacking either as text raises ``UserError`` (file:line)."""
    items: List[WordProblem] = []
    for line, record in read_jsonl_numbered(Path(path)):
        require_text(
            path, line, record, (question_field, answer_field),
            f"Each line needs text in {question_field!r} and {answer_field!r} (GSM8K: "
            '{"question": "...", "answer": "worked steps ...\\n#### 72"}), or set question_field / answer_field.',
        )
        items.append(WordProblem(record[question_field], record[answer_field]))
    return items


# --- checks before the run ---------------------------------------------------------------


def problems(spec: Mapping[str, Any], field: str) -> List[str]:
    """Everything wrong with a ``generation`` spec, each naming its key (and file:line for the data)."""
    spec = {**DEFAULTS, **spec}
    found: List[str] = []
    found += _text_keys(spec, field)
    found += _decoding(spec, field)
    found += _filter_problems(spec["filters"], f"{field}.filters")
    found += _normaliser_problems(spec, field)
    found += _data_problems(spec, field)
    return found


def _text_keys(spec: Mapping[str, Any], field: str) -> List[str]:
    found = []
    for key in ("question_field", "answer_field", "target_delimiter", "fewshot_delimiter"):
        if not isinstance(spec[key], str) or (key.endswith("_field") and not spec[key]):
            found.append(f"{field}.{key}={spec[key]!r} must be text.")
    template = spec["template"]
    if not isinstance(template, str):
        found.append(f"{field}.template={template!r} must be text with a {{question}} placeholder.")
    else:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as error:
            names = None
            found.append(
                f"{field}.template={template!r} is not a format string ({error}); write literal braces as {{{{ and }}}}."
            )
        if names is not None and names != {"question"}:
            found.append(
                f"{field}.template={template!r} must use exactly the placeholder {{question}} (found "
                f"{', '.join(sorted(names)) or 'none'}), e.g. 'Question: {{question}}\\nAnswer:'."
            )
    stop = spec["stop"]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        found.append(f'{field}.stop={stop!r} must be a list of non-empty strings, e.g. ["Question:", "</s>"].')
    if spec["fewshot_sampling"] not in ("first", "random"):
        found.append(f"{field}.fewshot_sampling={spec['fewshot_sampling']!r} must be 'first' or 'random'.")
    if not _is_int(spec["fewshot_seed"]):
        found.append(f"{field}.fewshot_seed={spec['fewshot_seed']!r} must be a whole number.")
    return found


def _decoding(spec: Mapping[str, Any], field: str) -> List[str]:
    found = []
    budget = spec["max_new_tokens"]
    if budget is not None and not (_is_int(budget) and budget >= 1):
        found.append(f"{field}.max_new_tokens={budget!r} must be a whole number of at least 1 (GSM8K wants ~256).")
    if not isinstance(spec["do_sample"], bool):
        found.append(f"{field}.do_sample={spec['do_sample']!r} must be true or false.")
    temperature, top_p = spec["temperature"], spec["top_p"]
    if not _is_number(temperature) or (spec["do_sample"] is True and temperature <= 0):
        found.append(f"{field}.temperature={temperature!r} must be a number above 0 (use do_sample: false for greedy).")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        found.append(f"{field}.top_p={top_p!r} must be a number in (0, 1]; 1 turns nucleus sampling off.")
    if not _is_int(spec["seed"]):
        found.append(f"{field}.seed={spec['seed']!r} must be a whole number.")
    repeats = spec["repeats"]
    if not (_is_int(repeats) and repeats >= 1):
        found.append(f"{field}.repeats={repeats!r} must be a whole number of at least 1.")
    elif repeats > 1 and spec["do_sample"] is False:
        found.append(
            f"{field}.repeats={repeats} with do_sample: false repeats one greedy answer; set do_sample: true "
            "(with temperature / top_p) for maj@k, or repeats: 1."
        )
    return found


def _filter_problems(filters: Any, where: str) -> List[str]:
    if not isinstance(filters, (list, tuple)) or not filters:
        return [
            f"{where}={filters!r} must be a non-empty list of filters, e.g. "
            '[{name: strict-match, regex: "#### (\\\\-?[0-9\\\\.\\\\,]+)", group: 1, select: first}].'
        ]
    found: List[str] = []
    names: List[str] = []
    for index, spec in enumerate(filters):
        at = f"{where}[{index}]"
        if not isinstance(spec, Mapping):
            found.append(
                f"{at}={spec!r} must be a mapping with a regex, e.g. {{name: answer, regex: 'The answer is (\\d+)'}}."
            )
            continue
        unknown = sorted(set(spec) - set(_FILTER_KEYS))
        if unknown:
            found.append(
                f"{at} has unknown key(s) {', '.join(map(str, unknown))}; a filter takes {', '.join(_FILTER_KEYS)}."
            )
        name = spec.get("name") or f"filter_{index + 1}"
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            found.append(f"{at}.name={name!r} must be letters, digits, '_' or '-' (it names the metric exact_match_<name>).")
        elif name in names:
            found.append(f"{at}.name={name!r} is used by an earlier filter; give each filter its own name.")
        names.append(name)
        regex = spec.get("regex")
        if not isinstance(regex, str):
            found.append(f"{at}.regex={regex!r} must be a regular expression (text).")
            continue
        try:
            compiled = re.compile(regex)
        except re.error as error:
            found.append(f"{at}.regex={regex!r} is not a valid regular expression: {error}.")
            continue
        group = spec.get("group")
        if group is not None:
            if isinstance(group, str):
                if group not in compiled.groupindex:
                    names = ", ".join(compiled.groupindex) or "none"
                    found.append(f"{at}.group={group!r} is not a named group of its regex ({names}).")
            elif not (_is_int(group) and 0 <= group <= compiled.groups):
                found.append(
                    f"{at}.group={group!r} must be a group of its regex: 0 (the whole match) to {compiled.groups}, "
                    "or a group's name."
                )
        select = spec.get("select", "first")
        if select not in _SELECTS and not _is_int(select):
            found.append(f"{at}.select={select!r} must be first, last or a match index (0, 1, -1 ...).")
    return found


def _normaliser_problems(spec: Mapping[str, Any], field: str) -> List[str]:
    found = []
    for key in ("ignore_case", "ignore_punctuation"):
        if not isinstance(spec[key], bool):
            found.append(f"{field}.{key}={spec[key]!r} must be true or false.")
    patterns = spec["regexes_to_ignore"]
    if not isinstance(patterns, (list, tuple)):
        example = '[",", "\\\\$"]'
        return found + [f"{field}.regexes_to_ignore={patterns!r} must be a list of regular expressions, e.g. {example}."]
    for index, pattern in enumerate(patterns):
        try:
            re.compile(pattern)
        except (re.error, TypeError) as error:
            found.append(f"{field}.regexes_to_ignore[{index}]={pattern!r} is not a valid regular expression: {error}.")
    return found


def _data_problems(spec: Mapping[str, Any], field: str) -> List[str]:
    """The files: present, every line with text in the question and answer fields, enough shots."""
    found = []
    path, fewshot_path, k = spec.get("path"), spec["fewshot_path"], spec["num_fewshot"]
    if not isinstance(path, str):
        found.append(f"{field}.path={path!r}: give a GSM8K-format JSONL test file.")
    if fewshot_path is not None and not isinstance(fewshot_path, str):
        found.append(f"{field}.fewshot_path={fewshot_path!r} must be the path of a JSONL file of solved examples.")
    if not (_is_int(k) and k >= 0):
        found.append(f"{field}.num_fewshot={k!r} must be a whole number, 0 or more.")
    elif k and fewshot_path is None:
        found.append(f"{field}.num_fewshot={k} needs fewshot_path: a JSONL of solved examples (GSM8K's train.jsonl).")
    fields = (spec["question_field"], spec["answer_field"])
    if not all(isinstance(name, str) and name for name in fields):
        return found  # the lines cannot be checked without the field names (reported by _text_keys)
    if isinstance(path, str):
        try:
            if not _read(path, *fields):
                found.append(f"{field}.path={path} holds no problems; point it at a test file.")
        except UserError as error:
            found.append(f"{field}.path: {error}")
    if _is_int(k) and k > 0 and isinstance(fewshot_path, str):
        try:
            pool = _read(fewshot_path, *fields)
            if len(pool) < k:
                found.append(f"{field}.num_fewshot={k} but {fewshot_path} holds {len(pool)} examples; lower it.")
        except UserError as error:
            found.append(f"{field}.fewshot_path: {error}")
    return found


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


TASK_TYPES: Dict[str, TaskType] = {
    "generation": TaskType(
        run=run,
        problems=problems,
        keys=("path", *DEFAULTS),
        headline="exact_match",
    )
}
