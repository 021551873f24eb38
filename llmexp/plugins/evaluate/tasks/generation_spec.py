"""The ``generation`` task's spec: its keys with their defaults (lm-eval's gsm8k), and what can be wrong with one.

``problems`` checks every key, not the first wrong one only, and the data files line by
line (``file:line``), so one plan shows all there is to fix; each problem names its key.
No torch here.
"""

from __future__ import annotations

import re
import string
from typing import Any, Dict, List, Mapping

from llmexp.data.gsm8k import PROMPT, read_solved_problems
from llmexp.sdk import UserError

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
    "template": PROMPT,
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
            if not read_solved_problems(path, *fields):
                found.append(f"{field}.path={path} holds no problems; point it at a test file.")
        except UserError as error:
            found.append(f"{field}.path: {error}")
    if _is_int(k) and k > 0 and isinstance(fewshot_path, str):
        try:
            pool = read_solved_problems(fewshot_path, *fields)
            if len(pool) < k:
                found.append(f"{field}.num_fewshot={k} but {fewshot_path} holds {len(pool)} examples; lower it.")
        except UserError as error:
            found.append(f"{field}.fewshot_path: {error}")
    return found


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


