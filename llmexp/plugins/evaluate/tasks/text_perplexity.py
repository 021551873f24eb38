"""Perplexity of a text corpus by a sliding window: the ``text_perplexity`` task type.

The definition is the Hugging Face guide's (https://huggingface.co/docs/transformers/perplexity):
the documents are joined (``join``, default a blank line) into one text, tokenized once,
and read by windows of ``max_length`` tokens (default: the model's context) that start
every ``stride`` tokens (default: ``max_length``, disjoint windows as lm-eval's rolling
log-likelihood); each window scores only the tokens the previous one did not, so every
token is scored once, with at least ``max_length - stride`` tokens of context once the
first window is past. A smaller stride gives more context (a lower, truer perplexity) for
more compute. The guide's own loop counts one token too few per window when
``stride < max_length`` (it multiplies the window's mean loss by the targets less one); the
sums here are exact.

Metrics: ``perplexity`` = exp(``nll_per_token``), the summed NLL in nats over the scored
``tokens``; ``bits_per_byte`` = summed NLL / ln 2 / the UTF-8 bytes of the joined text,
comparable across tokenizers (with disjoint windows the first token of every window is
not scored but its bytes count, so it reads a little low; a stride below ``max_length``
removes that). Rows: one per window.

``path`` is a plain UTF-8 text file (one document), or a ``.jsonl`` file whose lines hold
the documents in ``text_field`` (default ``text``); ``limit`` keeps the first documents.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping

from llmexp.data.jsonl import read_jsonl_numbered
from llmexp.sdk import UserError
from llmexp.sdk import Metric, MetricKind
from llmexp.sdk import TaskInputs, TaskResult, TaskType, declared

DEFAULTS: Dict[str, Any] = {"text_field": "text", "stride": None, "max_length": None, "join": "\n\n"}


def run(spec: Mapping[str, Any], inputs: TaskInputs, scorer) -> TaskResult:
    from llmexp.plugins.evaluate.harness.scoring import max_length as model_context

    spec = {**DEFAULTS, **spec}
    text = spec["join"].join(inputs.first(read_documents(spec["path"], spec["text_field"])))
    context = model_context(scorer.model, scorer.tokenizer)
    found = window_problems(spec, context)
    if found:
        raise UserError(" ".join(found))
    window = spec["max_length"] or context
    stride = spec["stride"] or window
    windows = scorer.sliding_window_nll(text, window, stride)
    nll = sum(w.nll for w in windows)
    tokens = sum(w.tokens for w in windows)
    per_token = nll / tokens if tokens else float("nan")
    size = len(text.encode("utf-8"))
    metrics = {
        "perplexity": math.exp(per_token) if tokens else float("nan"),
        "nll_per_token": per_token,
        "tokens": float(tokens),
        "bits_per_byte": nll / math.log(2) / size if size else float("nan"),
    }
    rows = [
        {"begin": w.begin, "end": w.end, "scored_from": w.scored_from, "tokens": w.tokens, "nll": w.nll}
        for w in windows
    ]
    return TaskResult(metrics, rows)


def read_documents(path: str, text_field: str = "text") -> List[str]:
    """The documents of ``path``: a ``.jsonl`` file's ``text_field`` per line, else the whole file as one.

    A missing file, a file that is not UTF-8, or a JSONL line without text in ``text_field``
    raises ``UserError`` naming ``file`` or ``file:line``.
    """
    file = Path(path)
    if file.suffix == ".jsonl":
        documents = []
        for line, record in read_jsonl_numbered(file):
            if not isinstance(record.get(text_field), str):
                state = "missing" if text_field not in record else f"{type(record[text_field]).__name__}, not text"
                raise UserError(
                    f"{file}:{line}: the {text_field!r} field is {state} (keys on that line: "
                    f"{', '.join(sorted(record)) or 'none'}). Put each document's text there, or set text_field."
                )
            documents.append(record[text_field])
        return documents
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise UserError(
            f"{file} does not exist (relative paths are resolved against {Path.cwd()}); give a text file."
        ) from None
    except IsADirectoryError:
        raise UserError(f"{file} is a directory; give a plain text file or a .jsonl file of documents.") from None
    try:
        return [raw.decode("utf-8-sig")]
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise UserError(f"{file}:{line}: not UTF-8 text; save the file as UTF-8.") from None


def window_problems(spec: Mapping[str, Any], context: int) -> List[str]:
    """Windows the model cannot read (``context``: its longest input) or that leave tokens unscored.

    The plan checks them against the run's model context, the run against the model's own.
    """
    spec = {**DEFAULTS, **spec}
    window = spec["max_length"] or context
    stride = spec["stride"] or window
    if window > context:
        return [f"max_length={window} of the text_perplexity task on {spec['path']} exceeds the model's context of "
                f"{context} tokens; lower it to {context} or less (or leave it out: the model's context)."]
    if stride > window:
        return [f"stride={stride} of the text_perplexity task on {spec['path']} exceeds max_length={window}, which "
                "would leave tokens unscored; give a stride of at most max_length."]
    return []


def problems(spec: Mapping[str, Any], field: str) -> List[str]:
    """The spec's problems: numbers in range, the file present and readable, at least one token of text."""
    spec = {**DEFAULTS, **spec}
    found: List[str] = []
    for key, least in (("max_length", 2), ("stride", 1)):
        value = spec[key]
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
            found.append(f"{field}.{key}={value!r} must be a whole number of at least {least} (or left out).")
    if not found and spec["stride"] and spec["max_length"] and spec["stride"] > spec["max_length"]:
        found.append(
            f"{field}.stride={spec['stride']} exceeds {field}.max_length={spec['max_length']}: tokens between windows "
            "would go unscored. Give a stride of at most max_length (max_length: disjoint windows)."
        )
    for key in ("join", "text_field"):
        if not isinstance(spec[key], str):
            found.append(f"{field}.{key}={spec[key]!r} must be text.")
    if not isinstance(spec.get("path"), str):
        found.append(f"{field}.path={spec.get('path')!r}: give a plain text file or a .jsonl file of documents.")
    if not (isinstance(spec.get("path"), str) and isinstance(spec["text_field"], str)):
        return found
    try:
        if not "".join(read_documents(spec["path"], spec["text_field"])).strip():
            found.append(f"{field}.path={spec['path']} holds no text; give a file with the text to score.")
    except UserError as error:
        found.append(f"{field}.path: {error}")
    return found


TEXT_PERPLEXITY = TaskType(
    "text_perplexity", run, problems, keys=("path", *DEFAULTS),
    metrics=declared(*(Metric(name, False, name, MetricKind.INFO) for name in ("perplexity", "bits_per_byte"))),
)
