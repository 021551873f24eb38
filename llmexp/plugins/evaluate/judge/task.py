"""The ``judge`` task type: an LLM on an OpenAI-compatible endpoint grades answers against references.

``{type: judge, path: qa.jsonl, url: "http://127.0.0.1:8000/v1", model: judge-model,
template: faithfulness}`` reads items (one JSON object a line: ``question``, ``reference``,
and ``answer`` when the answers to grade are already known; without one, the evaluated
model answers ``question``, greedily, within ``max_new_tokens``), renders each through the
template (``template.py``: shipped ``faithfulness`` and ``correctness``, or a YAML
path), asks the judge (``client.py``: ``concurrency`` requests in flight,
``timeout_s``, ``retries`` with exponential backoff from ``backoff_s``, ``temperature``
0) and reads a score from each reply. Verdicts are cached (``cache.py``, under
``cache_dir``) so a re-run sends no request already answered.

The API key is read from the environment variable named by ``api_key_env`` (default
``OPENAI_API_KEY``; unset: no ``Authorization`` header, as local servers want); the key
itself is never in the config, the rows, the cache or the logs.

Nothing an item goes through raises: an unreachable or failing judge is recorded on that
item's row (``status: error``, with the reason) and the evaluation's other tasks go on.
Metrics: ``score_mean`` over scored items (unparsable and failed ones excluded, never
guessed), ``score_<s>_share`` for each score ``s`` of the template's range (shares of the
scored items), ``n_scored``, ``unparsable``, ``errors``, ``requests`` (sent by this run)
and ``cached`` (items answered from the cache).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from llmexp.sdk import job_environment
from llmexp.data.jsonl import read_jsonl_numbered
from llmexp.sdk import UserError
from llmexp.sdk import Metric, MetricKind, statistics
from llmexp.sdk import TaskInputs, TaskResult, TaskType, declared
from llmexp.sdk import redact_url_credentials

log = logging.getLogger(__name__)

DEFAULTS: Dict[str, Any] = {
    "url": None,  # required: the endpoint's base URL, e.g. http://127.0.0.1:8000/v1
    "model": None,  # required: the judge model's name at that endpoint
    "api_key_env": "OPENAI_API_KEY",
    "template": "faithfulness",
    "concurrency": 8,
    "timeout_s": 60.0,
    "retries": 3,
    "backoff_s": 1.0,
    "temperature": 0.0,
    "judge_max_tokens": 256,  # the judge's reply budget
    "cache_dir": None,  # None: $LLMEXP_CACHE/judge, else ~/.cache/llmexp/judge
    "max_new_tokens": None,  # answers the evaluated model writes; None: the evaluation's max_new_tokens
    "stop": ["\n\n"],  # where a generated answer ends besides EOS
}
KEYS = ("path", *DEFAULTS)
_CACHED = ("status", "score", "reason", "reply")  # what a cached verdict keeps
_FINAL = ("scored", "unparsable")  # the verdicts worth caching


def load_items(path: str, needs: frozenset = frozenset({"question"})) -> List[Dict[str, Any]]:
    """The items of a judge JSONL file; a line missing a field the template uses is a ``UserError`` (``file:line``)."""
    items = []
    for number, record in read_jsonl_numbered(path):
        required = sorted(({"question"} | set(needs)) - {"answer"})
        bad = [name for name in required if not isinstance(record.get(name), str)]
        if "answer" in record and not isinstance(record["answer"], str):
            bad.append("answer")
        if bad:
            raise UserError(
                f"{path}:{number}: {', '.join(bad)} missing or not a string. A judge item has string fields "
                f"{', '.join(required)} (and answer, when the answer to grade is given rather than generated); "
                "fix or delete that line."
            )
        items.append(record)
    return items


def run(spec: Mapping[str, Any], inputs: TaskInputs, scorer) -> TaskResult:
    from llmexp.plugins.evaluate.judge.cache import JudgeCache, cache_key, default_cache_dir
    from llmexp.plugins.evaluate.judge.client import JudgeClient, Judgment
    from llmexp.plugins.evaluate.judge.template import load_template

    settings = {**DEFAULTS, **{key: value for key, value in spec.items() if value is not None}}
    template = load_template(settings["template"])
    items = [dict(item) for item in inputs.first(load_items(spec["path"], template.placeholders))]
    _answer_missing(items, scorer, settings)
    client = JudgeClient(
        url=settings["url"],
        model=settings["model"],
        api_key=os.environ.get(settings["api_key_env"]) or None,
        timeout_s=float(settings["timeout_s"]),
        retries=int(settings["retries"]),
        backoff_s=float(settings["backoff_s"]),
        concurrency=int(settings["concurrency"]),
        temperature=float(settings["temperature"]),
        max_tokens=int(settings["judge_max_tokens"]),
    )
    cache = JudgeCache(settings["cache_dir"] or default_cache_dir())
    request = {"temperature": client.temperature, "max_tokens": client.max_tokens}
    keys = [cache_key(template.text, item, client.model, client.url, request) for item in items]
    hits = [cache.get(key) for key in keys]
    hits = [hit if hit is not None and hit.get("status") in _FINAL else None for hit in hits]
    judgments: List[Optional[Judgment]] = [
        None if hit is None else Judgment(**{name: hit.get(name) for name in _CACHED}) for hit in hits
    ]
    pending = [index for index, judgment in enumerate(judgments) if judgment is None]
    fresh = client.judge_all([template.messages(items[index]) for index in pending], template.parse) if pending else []
    for index, judgment in zip(pending, fresh):
        judgments[index] = judgment
        if judgment.status in _FINAL:  # errors are not final: the next run asks again
            cache.put(keys[index], {name: getattr(judgment, name) for name in _CACHED})
    rows = [_row(item, judgment, hit is not None) for item, judgment, hit in zip(items, judgments, hits)]
    errors = [row for row in rows if row["status"] == "error"]
    if errors:
        log.warning(
            "judge %s: %d of %d item(s) got no verdict; first: %s",
            client.endpoint, len(errors), len(rows), errors[0]["error"],
        )
    return TaskResult(_metrics(rows, template.score_min, template.score_max, sum(j.requests for j in fresh)), rows)


def _answer_missing(items: List[Dict[str, Any]], scorer, settings: Mapping[str, Any]) -> None:
    """Have the evaluated model answer the items given without an ``answer``."""
    from llmexp.data.instructions import format_prompt

    missing = [item for item in items if "answer" not in item]
    for item in items:
        item["answer_source"] = "generated" if "answer" not in item else "given"
    if not missing:
        return
    prompts = [format_prompt(item["question"], scorer.tokenizer) for item in missing]
    answers = scorer.generate(prompts, list(settings["stop"]), max_new_tokens=settings["max_new_tokens"])
    for item, answer in zip(missing, answers):
        item["answer"] = answer.strip()


def _row(item: Mapping[str, Any], judgment, cached: bool) -> Dict[str, Any]:
    row = {**item, "status": judgment.status, "score": judgment.score, "reason": judgment.reason}
    row.update(judge_reply=judgment.reply, cached=cached, requests=judgment.requests, error=judgment.error)
    return row


def _metrics(rows: List[Dict[str, Any]], low: int, high: int, requests: int) -> Dict[str, float]:
    scores = [row["score"] for row in rows if row["status"] == "scored"]
    metrics = {"score_mean": statistics.mean(scores)}
    for value in range(low, high + 1):
        metrics[f"score_{value}_share"] = statistics.mean(score == value for score in scores)
    metrics.update(
        n_scored=float(len(scores)),
        unparsable=float(sum(row["status"] == "unparsable" for row in rows)),
        errors=float(sum(row["status"] == "error" for row in rows)),
        requests=float(requests),
        cached=float(sum(row["cached"] for row in rows)),
    )
    return metrics


def problems(spec: Mapping[str, Any], field: str) -> List[str]:
    """What is wrong with a ``judge`` task's spec: endpoint, template, items file and settings."""
    from llmexp.plugins.evaluate.judge.template import PLACEHOLDERS, load_template

    found: List[str] = []
    settings = {**DEFAULTS, **{key: value for key, value in spec.items() if value is not None}}
    url = settings["url"]
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        found.append(redact_url_credentials(
            f"{field}.url={url!r} must be the judge endpoint's base URL, e.g. http://127.0.0.1:8000/v1."))
    if not isinstance(settings["model"], str) or not settings["model"]:
        found.append(f"{field}.model={settings['model']!r} must name the judge model the endpoint serves.")
    needs = PLACEHOLDERS
    try:
        needs = load_template(str(settings["template"])).placeholders
    except UserError as error:
        found.append(f"{field}.template: {error}")
    path = spec.get("path")
    if not isinstance(path, str) or not path:
        found.append(f"{field}.path is missing; set it to a JSONL file of items (question, reference, answer).")
    else:
        try:
            if not load_items(path, needs):
                found.append(f"{field}.path={path} holds no items; point it at a JSONL file of questions to judge.")
        except UserError as error:
            found.append(f"{field}.path: {error}")
    env = settings["api_key_env"]
    if not isinstance(env, str) or not env.replace("_", "").isalnum():
        found.append(
            f"{field}.api_key_env={env!r} must be the NAME of an environment variable holding the key, "
            "e.g. OPENAI_API_KEY."
        )
    elif "api_key_env" in spec and env not in job_environment():
        found.append(
            f"{field}.api_key_env={env}: that environment variable is not set. Export {env}=<your key> "
            "(never put the key itself in the config), or leave api_key_env out for an endpoint without keys."
        )
    for key, low in (("concurrency", 1), ("retries", 0), ("judge_max_tokens", 1), ("max_new_tokens", 1)):
        value = settings[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            found.append(f"{field}.{key}={value!r} must be a whole number of at least {low}.")
    for key, positive in (("timeout_s", True), ("backoff_s", False), ("temperature", False)):
        value = settings[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (positive and value == 0):
            found.append(f"{field}.{key}={value!r} must be a number {'above' if positive else 'of at least'} 0.")
    cache_dir = settings["cache_dir"]
    if cache_dir is not None and (not isinstance(cache_dir, str) or Path(cache_dir).is_file()):
        found.append(f"{field}.cache_dir={cache_dir!r} must be a directory path (created if missing).")
    stop = settings["stop"]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        found.append(f"{field}.stop={stop!r} must be a list of non-empty strings, e.g. ['\\n\\n'].")
    return found


JUDGE = TaskType("judge", run, problems, KEYS, metrics=declared(Metric("score_mean", True, "score_mean", MetricKind.QUALITY)))
