"""The evaluation tasks: what each asks the model and how the answers are graded.

A task is a function ``(TaskInputs, Scorer) -> TaskResult`` registered in ``TASKS`` by the
name users put in ``tasks``. This module does not import torch (the planner reads
``TASKS`` to check names); the numbers come from the ``Scorer`` in ``scoring.py``.

Metrics, all in [0, 1] except perplexity:

* ``multiple_choice``: ``mc_cloze_acc`` (each option's text scored as the continuation of
  the bare question, OLMES "CF"), ``mc_cloze_acc_norm`` (the same divided by the
  option's length in characters without the space before it, lm-eval's ``acc_norm``), ``mc_letter_acc`` (MMLU
  style: `` A``..`` D`` after the lettered options).
* ``free_answer``: ``free_answer_em``, exact match of the greedy answer (whitespace and
  case ignored) up to EOS, a newline or a new ``Question:``.
* ``word_problems`` / ``gsm8k``: ``word_problem_em`` / ``gsm8k_em``, the number after the
  first ``####`` in the greedy solution (``llmexp.data.gsm8k.extract_answer``) equals the
  reference.
* ``perplexity``: exp of the token-weighted mean NLL over held-out documents.
* ``throughput``: ``tokens_per_s`` of batched forward passes over the held-out documents
  (``scoring.forward_throughput``); for a fake-quantized model, the simulation's speed.
* ``text2sql``: the embedded instruction task (``llmexp.data.text2sql``), prompted as the
  sft/lora techniques train it; ``text2sql_em`` (exact match of the greedy SQL, whitespace
  normalised), ``text2sql_exec_acc`` (the SQL returns the gold query's rows on sqlite3) and
  the similarity measures of the seeds' customization comparison: ``text2sql_rouge1``,
  ``_rouge2``, ``_rougeL``, ``_bleu`` (corpus, 0-100) and ``_f1`` (token F1), from ``similarity.py``.
  With ``num_fewshot`` = k, k solved training examples precede each prompt.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from llmexp.data.embedded import LETTERS, EmbeddedWorld
from llmexp.data.gsm8k import extract_answer, load_gsm8k
from llmexp.data.instructions import format_prompt
from llmexp.data.text2sql import execute, sql_exact_match, text2sql_examples, text2sql_test

# Where a generated answer ends besides EOS. lm-eval's gsm8k stops at "Question:"; a worked
# solution spans lines, a short answer does not.
ANSWER_STOP = ("\n", "Question:")
SOLUTION_STOP = ("Question:",)


@dataclass
class TaskInputs:
    """The data a task draws on; ``limit`` caps the items of every task."""

    world: EmbeddedWorld
    heldout_documents: int = 200
    limit: Optional[int] = None
    gsm8k_path: Optional[str] = None
    num_fewshot: int = 0
    stage_dir: Optional[str] = None  # where a task may keep scratch files (code execution) beside its rows

    def first(self, items: Sequence[Any]) -> List[Any]:
        return list(items if self.limit is None else items[: self.limit])

    def shots(self, examples: Sequence[Any]) -> List[Any]:
        """``num_fewshot`` examples drawn once per world seed, the same for every item."""
        return random.Random(f"{self.world.seed}/fewshot").sample(list(examples), self.num_fewshot)


@dataclass
class TaskResult:
    metrics: Dict[str, float]
    rows: List[Dict[str, Any]] = field(default_factory=list)  # one per item, for <task>.jsonl


@dataclass(frozen=True)
class TaskType:
    """A kind of task users describe as data in ``tasks``: ``{type: mmlu, path: data/mmlu, num_fewshot: 5}``.

    ``run(spec, inputs, scorer)`` scores one described task; its metric names are bare
    (``acc``) and the evaluation prefixes them with the task's name (``mmlu_acc``), so
    several tasks of one type can run together. ``problems(spec, field)`` checks a spec
    before anything runs (files present and well-formed, values in range) without
    importing torch; ``field`` is the spec's config path for the messages. ``keys`` are the
    spec keys it takes besides ``type``, ``name`` and ``limit``.
    """

    run: Callable[[Mapping[str, Any], TaskInputs, Any], TaskResult]
    problems: Callable[[Mapping[str, Any], str], List[str]]
    keys: Tuple[str, ...] = ()
    headline: Optional[str] = None  # the bare metric its rows' ``correct`` flags make (paired comparison)


def normalise_answer(text: str) -> str:
    """Case-folded, whitespace collapsed: how free answers are compared."""
    return " ".join(text.split()).lower()


def multiple_choice(inputs: TaskInputs, scorer) -> TaskResult:
    items = inputs.first(inputs.world.multiple_choice_test())
    requests = []
    for item in items:
        requests += [(item.cloze_prompt(), f" {choice}") for choice in item.choices]
        requests += [(item.letter_prompt(), f" {letter}") for letter in LETTERS[: len(item.choices)]]
    scores = iter(scorer.loglikelihood(requests))
    rows = []
    for item in items:
        cloze = [next(scores).logprob for _ in item.choices]
        letter = [next(scores).logprob for _ in item.choices]
        cloze_norm = [lp / len(choice) for lp, choice in zip(cloze, item.choices)]  # lm-eval: the choice without its delimiter
        picked = {"cloze": _argmax(cloze), "cloze_norm": _argmax(cloze_norm), "letter": _argmax(letter)}
        rows.append(
            {
                "prompt": item.cloze_prompt(),
                "letter_prompt": item.letter_prompt(),
                "choices": list(item.choices),
                "expected": item.choices[item.answer],
                "expected_letter": LETTERS[item.answer],
                "cloze_scores": cloze,
                "letter_scores": letter,
                "predicted": item.choices[picked["cloze"]],
                "predicted_norm": item.choices[picked["cloze_norm"]],
                "predicted_letter": LETTERS[picked["letter"]],
                "correct": picked["cloze"] == item.answer,
                "correct_norm": picked["cloze_norm"] == item.answer,
                "correct_letter": picked["letter"] == item.answer,
            }
        )
    return TaskResult(
        {
            "mc_cloze_acc": _mean(row["correct"] for row in rows),
            "mc_cloze_acc_norm": _mean(row["correct_norm"] for row in rows),
            "mc_letter_acc": _mean(row["correct_letter"] for row in rows),
        },
        rows,
    )


def free_answer(inputs: TaskInputs, scorer) -> TaskResult:
    items = inputs.first(inputs.world.free_answer_test())
    generated = scorer.generate([item.prompt for item in items], stop=ANSWER_STOP)
    rows = [
        {
            "prompt": item.prompt,
            "expected": item.answer,
            "predicted": text.strip(),
            "correct": normalise_answer(text) == normalise_answer(item.answer),
        }
        for item, text in zip(items, generated)
    ]
    return TaskResult({"free_answer_em": _mean(row["correct"] for row in rows)}, rows)


def word_problems(inputs: TaskInputs, scorer) -> TaskResult:
    return _solve(inputs.first(inputs.world.word_problem_test()), scorer, "word_problem_em")


def gsm8k(inputs: TaskInputs, scorer) -> TaskResult:
    return _solve(load_gsm8k(inputs.gsm8k_path, limit=inputs.limit), scorer, "gsm8k_em")


def perplexity(inputs: TaskInputs, scorer) -> TaskResult:
    documents = inputs.first(inputs.world.heldout_documents(inputs.heldout_documents))
    scored = scorer.document_nll(documents)
    rows = [
        {"document": doc, "tokens": count, "nll": nll, "perplexity": math.exp(nll / count) if count else float("nan")}
        for doc, (nll, count) in zip(documents, scored)
    ]
    tokens = sum(count for _, count in scored)
    value = math.exp(sum(nll for nll, _ in scored) / tokens) if tokens else float("nan")
    return TaskResult({"perplexity": value, "perplexity_tokens": float(tokens)}, rows)


def throughput(inputs: TaskInputs, scorer) -> TaskResult:
    documents = inputs.first(inputs.world.heldout_documents(inputs.heldout_documents))
    value = scorer.forward_throughput(documents)
    return TaskResult({"tokens_per_s": value}, [{"documents": len(documents), "tokens_per_s": value}])


def text2sql(inputs: TaskInputs, scorer) -> TaskResult:
    items = inputs.first(text2sql_test(inputs.world))
    tokenizer = scorer.tokenizer
    prefix = "".join(
        f"{format_prompt(shot.prompt, tokenizer)}{shot.response}\n\n" for shot in inputs.shots(text2sql_examples(inputs.world))
    )
    generated = scorer.generate([prefix + format_prompt(item.prompt, tokenizer) for item in items], stop=ANSWER_STOP)
    rows = []
    for item, text in zip(items, generated):
        gold_rows, predicted_rows = execute(item.sql, inputs.world), execute(text, inputs.world)
        rows.append(
            {
                "prompt": item.prompt,
                "expected": item.sql,
                "predicted": text.strip(),
                "correct": sql_exact_match(text, item.sql),
                "executes": predicted_rows is not None,
                "correct_execution": predicted_rows is not None and predicted_rows == gold_rows,
            }
        )
    metrics = {
        "text2sql_em": _mean(row["correct"] for row in rows),
        "text2sql_exec_acc": _mean(row["correct_execution"] for row in rows),
    }
    from llmexp.plugins.evaluate.similarity import similarity_scores  # imports this module: here, not at the top

    overlap = similarity_scores([row["predicted"] for row in rows], [row["expected"] for row in rows])
    metrics.update({f"text2sql_{name}": value for name, value in overlap.items() if name != "exact_match"})
    return TaskResult(metrics, rows)


def _solve(problems: Sequence[Any], scorer, metric: str) -> TaskResult:
    """Greedy worked solutions graded by the number after their first ``####``."""
    generated = scorer.generate([problem.prompt for problem in problems], stop=SOLUTION_STOP)
    rows = []
    for problem, text in zip(problems, generated):
        predicted = extract_answer(text)
        rows.append(
            {
                "prompt": problem.prompt,
                "expected": problem.answer,
                "generated": text,
                "predicted": predicted,
                "correct": predicted is not None and predicted == problem.answer,
            }
        )
    return TaskResult({metric: _mean(row["correct"] for row in rows)}, rows)


TASKS: Dict[str, Callable[[TaskInputs, Any], TaskResult]] = {
    "multiple_choice": multiple_choice,
    "free_answer": free_answer,
    "word_problems": word_problems,
    "perplexity": perplexity,
    "gsm8k": gsm8k,
    "text2sql": text2sql,
    "throughput": throughput,
}
EMBEDDED_TASKS = ["multiple_choice", "free_answer", "word_problems", "perplexity"]
# The metric each graded task's rows' ``correct`` flags make: what a paired comparison tests.
HEADLINE = {
    "multiple_choice": "mc_cloze_acc",
    "free_answer": "free_answer_em",
    "word_problems": "word_problem_em",
    "gsm8k": "gsm8k_em",
    "text2sql": "text2sql_em",
}


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first on ties, as numpy's argmax."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _mean(flags) -> float:
    flags = list(flags)
    return sum(map(float, flags)) / len(flags) if flags else float("nan")
