"""The embedded evaluation tasks: what each asks the model about the package's generated data, and how it grades.

Each is a function ``(TaskInputs, Scorer) -> TaskResult`` and a ``TaskType`` in ``TASKS``
under the name users put in ``tasks``. This module does not import torch (the planner
checks names); the numbers come from the ``Scorer`` (``harness/scoring.py``).

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
  (``harness/scoring.py``: ``forward_throughput``); for a fake-quantized model, the simulation's speed.
* ``text2sql``: the embedded instruction task (``llmexp.data.text2sql``), prompted as the
  sft/lora techniques train it; ``text2sql_em`` (exact match of the greedy SQL, whitespace
  normalised), ``text2sql_exec_acc`` (the SQL returns the gold query's rows on sqlite3) and
  the similarity measures of the seeds' customization comparison: ``text2sql_rouge1``,
  ``_rouge2``, ``_rougeL``, ``_bleu`` (corpus, 0-100) and ``_f1`` (token F1), from ``similarity.py``.
  With ``num_fewshot`` = k, k solved training examples precede each prompt.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence

from llmexp.data.embedded import LETTERS
from llmexp.data.gsm8k import extract_answer, load_gsm8k
from llmexp.data.instructions import format_prompt
from llmexp.data.text2sql import execute, sql_exact_match, text2sql_examples, text2sql_test
from llmexp.sdk import statistics
from llmexp.sdk import TaskInputs, TaskResult, TaskType
from llmexp.plugins.evaluate.tasks.similarity import similarity_scores

# Where a generated answer ends besides EOS. lm-eval's gsm8k stops at "Question:"; a worked
# solution spans lines, a short answer does not.
ANSWER_STOP = ("\n", "Question:")
SOLUTION_STOP = ("Question:",)


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
        ranked = {"cloze": cloze, "cloze_norm": cloze_norm, "letter": letter}
        picked = {name: statistics.argmax(values) for name, values in ranked.items()}
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
            "mc_cloze_acc": statistics.mean(row["correct"] for row in rows),
            "mc_cloze_acc_norm": statistics.mean(row["correct_norm"] for row in rows),
            "mc_letter_acc": statistics.mean(row["correct_letter"] for row in rows),
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
    return TaskResult({"free_answer_em": statistics.mean(row["correct"] for row in rows)}, rows)


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
        "text2sql_em": statistics.mean(row["correct"] for row in rows),
        "text2sql_exec_acc": statistics.mean(row["correct_execution"] for row in rows),
    }
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
    return TaskResult({metric: statistics.mean(row["correct"] for row in rows)}, rows)


def _embedded(name: str, score, headline=None) -> TaskType:
    """The task type of an embedded task ``score(inputs, scorer)``: named bare, it takes no spec."""
    return TaskType(name, lambda spec, inputs, scorer: score(inputs, scorer), headline=headline, embedded=True)


# The embedded tasks, each with the metric its rows' ``correct`` flags make (what a paired comparison tests).
TASKS: Dict[str, TaskType] = {
    task.name: task
    for task in (
        _embedded("multiple_choice", multiple_choice, "mc_cloze_acc"),
        _embedded("free_answer", free_answer, "free_answer_em"),
        _embedded("word_problems", word_problems, "word_problem_em"),
        _embedded("perplexity", perplexity),
        _embedded("gsm8k", gsm8k, "gsm8k_em"),
        _embedded("text2sql", text2sql, "text2sql_em"),
        _embedded("throughput", throughput),
    )
}
EMBEDDED_TASKS = ["multiple_choice", "free_answer", "word_problems", "perplexity"]  # an evaluation's default
