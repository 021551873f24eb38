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
  With ``num_fewshot`` = k, k solved training examples precede each prompt, in every condition.

Conditions (``harness/conditions.py``): ``multiple_choice``, ``free_answer`` and ``word_problems`` honour
``few_shot`` and ``rag``, ``gsm8k`` ``rag``. Few-shot examples are training-side, never a test item: a fact task's
are other people's facts asked with a training template (the test asks the held-out one), solved in the task's
own layout; a word problem's are problems as training poses them (number triples never held out). Under ``rag``
the retriever is searched with the question, and a multiple-choice item's cloze and letter prompts read the same
passages; the options are scored as closed-book.
"""

from __future__ import annotations

import math
import random
from typing import Any, Dict, List, Sequence

from llmexp.data.embedded import LETTERS, QUESTIONS, TRAIN_TEMPLATES, VALUES, EmbeddedWorld, Fact, MultipleChoice
from llmexp.data.gsm8k import extract_answer, load_gsm8k
from llmexp.data.instructions import format_prompt
from llmexp.data.text2sql import execute, sql_exact_match, text2sql_examples, text2sql_test
from llmexp.sdk import statistics
from llmexp.sdk import TaskInputs, TaskResult, TaskType
from llmexp.plugins.evaluate.harness.conditions import FEW_SHOT, RAG, Prompts, solved
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
    shots = fact_shots(inputs, len(items))
    asked = Prompts(inputs, [item.question for item in items])
    cloze_prompts = asked([item.cloze_prompt() for item in items], [solved(map(_answered, s)) for s in shots])
    letter_prompts = asked([item.letter_prompt() for item in items], [solved(map(_lettered, s)) for s in shots])
    requests = []
    for item, cloze_prompt, letter_prompt in zip(items, cloze_prompts, letter_prompts):
        requests += [(cloze_prompt, f" {choice}") for choice in item.choices]
        requests += [(letter_prompt, f" {letter}") for letter in LETTERS[: len(item.choices)]]
    scores = iter(scorer.loglikelihood(requests))
    rows = []
    for index, (item, cloze_prompt, letter_prompt) in enumerate(zip(items, cloze_prompts, letter_prompts)):
        cloze = [next(scores).logprob for _ in item.choices]
        letter = [next(scores).logprob for _ in item.choices]
        cloze_norm = [lp / len(choice) for lp, choice in zip(cloze, item.choices)]  # lm-eval: the choice without its delimiter
        ranked = {"cloze": cloze, "cloze_norm": cloze_norm, "letter": letter}
        picked = {name: statistics.argmax(values) for name, values in ranked.items()}
        rows.append(
            {
                "prompt": cloze_prompt,
                "letter_prompt": letter_prompt,
                **asked.row(index),
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
    # the test asks every fact in order, with the held-out template
    questions = [QUESTIONS[fact.relation][TRAIN_TEMPLATES].format(p=fact.person) for fact in inputs.world.facts]
    asked = Prompts(inputs, questions[: len(items)])
    prompts = asked([item.prompt for item in items], [solved(map(_answered, s)) for s in fact_shots(inputs, len(items))])
    generated = scorer.generate(prompts, stop=ANSWER_STOP)
    rows = [
        {
            "prompt": prompt,
            **asked.row(index),
            "expected": item.answer,
            "predicted": text.strip(),
            "correct": normalise_answer(text) == normalise_answer(item.answer),
        }
        for index, (item, prompt, text) in enumerate(zip(items, prompts, generated))
    ]
    return TaskResult({"free_answer_em": statistics.mean(row["correct"] for row in rows)}, rows)


def word_problems(inputs: TaskInputs, scorer) -> TaskResult:
    problems = inputs.first(inputs.world.word_problem_test())
    trained = inputs.world.word_problems(inputs.num_fewshot) if inputs.condition == FEW_SHOT else []
    shots = solved(f"{problem.prompt} {problem.solution}" for problem in trained)
    return _solve(problems, scorer, "word_problem_em", inputs, shots)


def gsm8k(inputs: TaskInputs, scorer) -> TaskResult:
    return _solve(load_gsm8k(inputs.gsm8k_path, limit=inputs.limit), scorer, "gsm8k_em", inputs)


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


def fact_shots(inputs: TaskInputs, count: int) -> List[List[MultipleChoice]]:
    """Under few_shot, the solved examples of each of the first ``count`` facts (the test items of the fact tasks,
    in order): ``num_fewshot`` other people's facts, each asked with a training template; else none.

    The pool is one seeded order of every fact, the same for every item; an item skips its own person's facts,
    so no example states (or hints at) its answer.
    """
    if inputs.condition != FEW_SHOT:
        return [[] for _ in range(count)]
    world = inputs.world
    rng = random.Random(f"{world.seed}/fewshot")
    pool = [_asked_in_training(rng, world, fact) for fact in rng.sample(world.facts, len(world.facts))]
    return [
        [shot for shot, person in pool if person != fact.person][: inputs.num_fewshot] for fact in world.facts[:count]
    ]


def _asked_in_training(rng: random.Random, world: EmbeddedWorld, fact: Fact):
    """``fact`` as a multiple-choice question with a training template, and its person."""
    values = world.towns if fact.relation == "town" else VALUES[fact.relation]
    choices = rng.sample([value for value in values if value != fact.value], 3)
    answer = rng.randrange(4)
    choices.insert(answer, fact.value)
    question = QUESTIONS[fact.relation][rng.randrange(TRAIN_TEMPLATES)].format(p=fact.person)
    return MultipleChoice(question, tuple(choices), answer), fact.person


def _answered(shot: MultipleChoice) -> str:
    """A solved example in the free-answer (and cloze) layout."""
    return f"{shot.cloze_prompt()} {shot.choices[shot.answer]}"


def _lettered(shot: MultipleChoice) -> str:
    """A solved example in the letter layout."""
    return f"{shot.letter_prompt()} {LETTERS[shot.answer]}"


def _solve(problems: Sequence[Any], scorer, metric: str, inputs: TaskInputs, shots: str = "") -> TaskResult:
    """Greedy worked solutions graded by the number after their first ``####``; ``shots`` precede each under
    few_shot."""
    asked = Prompts(inputs, [problem.question for problem in problems])
    prompts = asked([problem.prompt for problem in problems], [shots] * len(problems))
    generated = scorer.generate(prompts, stop=SOLUTION_STOP)
    rows = []
    for index, (problem, prompt, text) in enumerate(zip(problems, prompts, generated)):
        predicted = extract_answer(text)
        rows.append(
            {
                "prompt": prompt,
                **asked.row(index),
                "expected": problem.answer,
                "generated": text,
                "predicted": predicted,
                "correct": predicted is not None and predicted == problem.answer,
            }
        )
    return TaskResult({metric: statistics.mean(row["correct"] for row in rows)}, rows)


def _embedded(name: str, score, headline=None, conditions=()) -> TaskType:
    """The task type of an embedded task ``score(inputs, scorer)``: named bare, it takes no spec."""
    return TaskType(name, lambda spec, inputs, scorer: score(inputs, scorer), headline=headline, embedded=True,
                    conditions=conditions)


# The embedded tasks, each with the metric its rows' ``correct`` flags make (what a paired comparison tests).
TASKS: Dict[str, TaskType] = {
    task.name: task
    for task in (
        _embedded("multiple_choice", multiple_choice, "mc_cloze_acc", (FEW_SHOT, RAG)),
        _embedded("free_answer", free_answer, "free_answer_em", (FEW_SHOT, RAG)),
        _embedded("word_problems", word_problems, "word_problem_em", (FEW_SHOT, RAG)),
        _embedded("perplexity", perplexity),
        _embedded("gsm8k", gsm8k, "gsm8k_em", (RAG,)),
        _embedded("text2sql", text2sql, "text2sql_em"),
        _embedded("throughput", throughput),
    )
}
EMBEDDED_TASKS = ["multiple_choice", "free_answer", "word_problems", "perplexity"]  # an evaluation's default
