"""Text similarity to a reference (ROUGE, BLEU, token F1, exact match) and the ``similarity`` task type.

Summaries and free-form answers have many right wordings, so they are graded by overlap
with a reference, as NeMo Evaluator's summarisation jobs are:

* ``rouge1``, ``rouge2``, ``rougeL``: F-measure of Google's ``rouge-score`` (Porter
  stemming on), the mean over rows; in [0, 1].
* ``bleu``: ``sacrebleu.corpus_bleu`` (its default 13a tokenisation) over all rows, 0-100;
  a row's own ``bleu`` is ``sacrebleu.sentence_bleu``.
* ``f1``, ``exact_match``: SQuAD v1.1's: both texts lowercased, punctuation and the articles
  a/an/the removed, whitespace collapsed; F1 of the bags of words, the mean over rows.

``similarity_scores(predictions, references)`` and ``row_scores(prediction, reference)``
are the reusable part (text2sql adds these metrics to its own). The task reads a JSONL of
``prompt`` and ``reference`` (field names configurable); the model continues each prompt
greedily, or, with ``prediction_field``, the file's own predictions are scored and the
model is not asked. No heavy imports at module level: the planner imports this module.
Under the ``rag`` condition (``harness/conditions.py``) the passages retrieved for each prompt come before it.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from llmexp.data.jsonl import read_jsonl_numbered, require_text
from llmexp.sdk import UserError
from llmexp.sdk import Metric, MetricKind, statistics
from llmexp.sdk import TaskInputs, TaskResult, TaskType, declared
from llmexp.plugins.evaluate.harness.conditions import CLOSED_BOOK, RAG, Prompts

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
METRICS = (*ROUGE_TYPES, "bleu", "f1", "exact_match")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_squad(text: str) -> str:
    """SQuAD v1.1's answer normalisation: lowercase, no punctuation, no articles, single spaces.

    Written out because it is four lines of the official evaluation script and no installed
    library exposes it on its own.
    """
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised words of ``prediction`` and ``reference`` as bags (SQuAD's ``f1_score``).

    Two texts that normalise to nothing match (1.0); one empty and one not share nothing (0.0).
    """
    predicted, expected = normalise_squad(prediction).split(), normalise_squad(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two texts are equal after SQuAD normalisation, else 0.0."""
    return float(normalise_squad(prediction) == normalise_squad(reference))


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer, tokenizers

    # its default tokenizer given explicitly: RougeScorer logs a line when it picks it itself
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=tokenizers.DefaultTokenizer(use_stemmer=True))


def row_scores(prediction: str, reference: str) -> Dict[str, float]:
    """Every metric of one prediction against its reference (``bleu``: sentence BLEU, 0-100)."""
    import sacrebleu

    rouge = _rouge_scorer().score(reference, prediction)
    return {
        **{kind: float(rouge[kind].fmeasure) for kind in ROUGE_TYPES},
        "bleu": float(sacrebleu.sentence_bleu(prediction, [reference]).score),
        "f1": token_f1(prediction, reference),
        "exact_match": exact_match(prediction, reference),
    }


def similarity_scores(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """Corpus figures: the mean of each row's ROUGE, F1 and exact match, and corpus BLEU (0-100)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {metric: float("nan") for metric in METRICS}
    return _corpus(predictions, references, [row_scores(p, r) for p, r in zip(predictions, references)])


def _corpus(predictions: Sequence[str], references: Sequence[str], rows: Sequence[Mapping[str, float]]) -> Dict[str, float]:
    import sacrebleu

    means = {metric: statistics.mean(row[metric] for row in rows) for metric in METRICS}
    means["bleu"] = float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)
    return means


# --- the task type -------------------------------------------------------------------------

_DEFAULTS = {"prompt_field": "prompt", "reference_field": "reference", "prediction_field": None, "stop": []}


def run(spec: Mapping[str, Any], inputs: TaskInputs, scorer) -> TaskResult:
    """Generate (or read) a prediction per row and score it against the row's reference."""
    spec = {**_DEFAULTS, **spec}
    items = inputs.first(_read(spec))
    if spec["prediction_field"]:  # the file's predictions: no prompt is asked, whatever the condition
        inputs = replace(inputs, condition=CLOSED_BOOK, retrieve=None)
    asked = Prompts(inputs, [prompt for prompt, _, _ in items])
    prompts = asked([prompt for prompt, _, _ in items])
    if spec["prediction_field"]:
        predictions = [prediction for _, _, prediction in items]
    else:
        predictions = [
            text.strip()
            for text in scorer.generate(prompts, stop=list(spec["stop"]), max_new_tokens=spec.get("max_new_tokens"))
        ]
    references = [reference for _, reference, _ in items]
    scored = [row_scores(p, r) for p, r in zip(predictions, references)]
    rows = [
        {"prompt": prompt, **asked.row(index), "expected": reference, "predicted": prediction, **scores}
        for index, (prompt, (_, reference, _), prediction, scores) in enumerate(zip(prompts, items, predictions, scored))
    ]
    metrics = _corpus(predictions, references, scored) if rows else {metric: float("nan") for metric in METRICS}
    return TaskResult(metrics, rows)


def problems(spec: Mapping[str, Any], field: str) -> List[str]:
    """The spec's problems: the file present, every line with the fields it needs, numbers in range."""
    spec = {**_DEFAULTS, **spec}
    found: List[str] = []
    for key in ("prompt_field", "reference_field", "prediction_field"):
        value = spec[key]
        if not (isinstance(value, str) and value) and not (key == "prediction_field" and value is None):
            found.append(f"{field}.{key}={value!r} must be the name of a field of the JSONL lines.")
    readable = not found  # the lines can be checked once the field names are
    budget = spec.get("max_new_tokens")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        found.append(f"{field}.max_new_tokens={budget!r} must be a whole number of at least 1 (or left out).")
    stop = spec["stop"]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        found.append(f'{field}.stop={stop!r} must be a list of non-empty strings, e.g. ["\\n\\n"].')
    if not isinstance(spec.get("path"), str):
        found.append(
            f"{field}.path is {spec.get('path')!r}; give a JSONL file of "
            f'{{"{spec["prompt_field"]}": ..., "{spec["reference_field"]}": ...}} lines.'
        )
        readable = False
    if not readable:
        return found
    try:
        if not _read(spec):
            found.append(f"{field}.path={spec['path']} holds no lines; give a JSONL file with at least one.")
    except UserError as error:
        found.append(f"{field}.path: {error}")
    return found


def _read(spec: Mapping[str, Any]) -> List[Tuple[str, str, Optional[str]]]:
    """``(prompt, reference, prediction or None)`` per line; a line lacking a needed text field raises ``UserError``."""
    path = Path(spec["path"])
    needed = [spec["reference_field"]]
    needed.append(spec["prediction_field"] if spec["prediction_field"] else spec["prompt_field"])
    items = []
    for line, record in read_jsonl_numbered(path):
        require_text(
            path, line, record, needed,
            f"Every line needs text in {' and '.join(repr(k) for k in needed)}, or set the task's "
            "prompt_field / reference_field / prediction_field to the names your file uses.",
        )
        prediction = record[spec["prediction_field"]] if spec["prediction_field"] else None
        prompt = record.get(spec["prompt_field"])
        items.append((prompt if isinstance(prompt, str) else "", record[spec["reference_field"]], prediction))
    return items


SIMILARITY = TaskType(
    "similarity", run, problems, keys=("path", "prompt_field", "reference_field", "prediction_field", "max_new_tokens", "stop"),
    metrics=declared(*(Metric(name, True, name, MetricKind.QUALITY if name == "rougeL" else MetricKind.INFO)
                       for name in ("rougeL", "bleu", "f1", "rouge1", "rouge2", "exact_match"))),
    conditions=(RAG,),
)
