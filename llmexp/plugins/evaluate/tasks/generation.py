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

Conditions (``harness/conditions.py``): under ``few_shot`` an entry without ``num_fewshot`` takes the evaluation's
(from ``fewshot_path``); under ``rag`` the passages retrieved for the question come before the prompt (shots included).
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from llmexp.data.gsm8k import AnswerFilter, Number, SolvedProblem, parse_number, read_solved_problems
from llmexp.sdk import Metric, MetricKind, statistics
from llmexp.sdk import TaskInputs, TaskResult, TaskType
from llmexp.plugins.evaluate.harness.conditions import FEW_SHOT, RAG, Prompts
from llmexp.plugins.evaluate.tasks.generation_spec import DEFAULTS, problems


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


def run(spec: Mapping[str, Any], inputs: TaskInputs, scorer) -> TaskResult:
    from llmexp.plugins.evaluate.harness.scoring import Sampling

    spec = {**DEFAULTS, **spec}
    items = inputs.first(read_solved_problems(spec["path"], spec["question_field"], spec["answer_field"]))
    prefix = _fewshot_prefix(spec)
    asked = Prompts(inputs, [problem.question for problem in items])
    prompts = asked([prefix + spec["template"].format(question=problem.question) for problem in items])
    samples: List[List[str]] = [[] for _ in prompts]
    for repeat in range(spec["repeats"]):
        sampling = Sampling(spec["temperature"], spec["top_p"], spec["seed"] + repeat) if spec["do_sample"] else None
        texts = scorer.generate(prompts, stop=list(spec["stop"]), max_new_tokens=spec["max_new_tokens"], sampling=sampling)
        for item, text in zip(samples, texts):
            item.append(text)
    filters = [AnswerFilter.from_spec(f, i) for i, f in enumerate(spec["filters"])]
    normaliser = AnswerNormaliser(tuple(spec["regexes_to_ignore"]), spec["ignore_case"], spec["ignore_punctuation"])
    rows = [
        {**_graded(problem, prompt, texts, filters, normaliser), **asked.row(index)}
        for index, (problem, prompt, texts) in enumerate(zip(items, prompts, samples))
    ]
    return TaskResult(_metrics(rows, filters, spec["repeats"]), rows)


def _graded(problem: SolvedProblem, prompt: str, texts: Sequence[str], filters, normaliser: AnswerNormaliser) -> dict:
    expected = normaliser.key(problem.final_answer)
    extracted = {f.name: [f.extract(text) for text in texts] for f in filters}
    right = {name: [normaliser.key(a) == expected for a in answers] for name, answers in extracted.items()}
    row = {
        "prompt": prompt,
        "expected": problem.final_answer,
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
        row["correct_fraction"] = {name: statistics.mean(flags) for name, flags in right.items()}
    return row


def _majority(keys: Sequence[Any]) -> Any:
    """The most common answer (a failed extraction votes too, as lm-eval's majority vote); ties go to the earliest."""
    return Counter(keys).most_common(1)[0][0]


def _metrics(rows: Sequence[dict], filters: Sequence[AnswerFilter], repeats: int) -> Dict[str, float]:
    mean = statistics.mean
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
    pool = read_solved_problems(spec["fewshot_path"], spec["question_field"], spec["answer_field"])
    shots = pool[:k] if spec["fewshot_sampling"] == "first" else random.Random(spec["fewshot_seed"]).sample(pool, k)
    return "".join(
        spec["template"].format(question=shot.question)
        + spec["target_delimiter"]
        + shot.solution
        + spec["fewshot_delimiter"]
        for shot in shots
    )


def metrics(spec: Mapping[str, Any]) -> Tuple[Metric, ...]:
    """``exact_match`` (the first filter's), then each filter's, as ``run`` names them (of a spec ``problems``
    refuses, what it can)."""
    filters = {**DEFAULTS, **spec}["filters"]
    filters = [f for f in filters if isinstance(f, Mapping) and "regex" in f] if isinstance(filters, (list, tuple)) else []
    names = ("exact_match", *(f"exact_match_{AnswerFilter.from_spec(f, i).name}" for i, f in enumerate(filters)))
    return tuple(Metric(name, True, name, MetricKind.QUALITY if i == 0 else MetricKind.INFO) for i, name in enumerate(names))


GENERATION = TaskType("generation", run, problems, keys=("path", *DEFAULTS), headline="exact_match", metrics=metrics,
                      conditions=(FEW_SHOT, RAG))
