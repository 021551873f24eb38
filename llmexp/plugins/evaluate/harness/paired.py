"""Paired comparison of an evaluation with a baseline's evaluation of the same items.

At the embedded default's scale an accuracy difference of 1.5% is two questions out of
150, far below the binomial noise of either accuracy, so a compressed model is compared with
its baseline item by item and by continuous measures that see much smaller changes:

* ``<metric>_delta`` and ``<metric>_rel_delta``: the difference of every metric both
  evaluations have, absolute and relative to the baseline's value;
* ``<metric>_delta_se``: for a task's headline metric (the one its rows' ``correct`` flags
  make), the standard error of the *paired* difference (the spread of per-item
  differences), much smaller than that of either accuracy when few answers change;
* ``flip_rate_<task>``: the share of items whose answer changed, right or wrong;
* ``<metric>_gained`` / ``<metric>_lost``: items only this model / only the baseline got right, and
  ``<metric>_mcnemar_p``, the exact McNemar test of them (is the difference more than chance?);
* ``kl_to_baseline``: mean KL(baseline || model) of the next-token distributions over the
  held-out documents' tokens (computed by the caller, which has both models).

Rows pair by position; where both rows name their ``question`` (``conditions.py``), the questions must be the
same. The prompts may differ: two conditions (closed-book and RAG, say) ask the same questions differently, and
that difference is what their comparison measures.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

from llmexp.data.jsonl import read_jsonl
from llmexp.sdk import UserError, statistics

# Counts, not measures: no delta is taken of them.
_NOT_COMPARED = ("_n", "_tokens")


def baseline_rows(entry: Mapping[str, Any], tasks: Sequence[str], baseline: str, field: str) -> Dict[str, List[dict]]:
    """The baseline evaluation's per-item rows of each task, read from its ``<task>.jsonl`` artifacts."""
    artifacts = entry.get("artifacts") or {}
    missing = [task for task in tasks if task not in artifacts]
    if missing:
        raise UserError(missing_tasks_problem(field, baseline, missing))
    return {task: list(read_jsonl(artifacts[task])) for task in tasks}


def missing_tasks_problem(field: str, baseline: str, missing: Sequence[str]) -> str:
    """The refusal of a comparison (``field``: its ``baseline`` key) whose baseline evaluation lacks ``missing`` tasks."""
    evaluation = field.rsplit(".", 1)[0]
    return (
        f"{field}={baseline.rsplit('.', 1)[-1]}: {evaluation} runs task(s) {', '.join(missing)}, which {baseline} does "
        f"not, so they cannot be compared item by item; add them to {baseline}.tasks or remove them from "
        f"{evaluation}.tasks."
    )


def paired_measures(
    metrics: Mapping[str, float],
    rows: Mapping[str, List[dict]],
    baseline_metrics: Mapping[str, float],
    baseline: Mapping[str, List[dict]],
    headline: Mapping[str, str],
) -> Dict[str, float]:
    """Deltas of shared metrics, flip rates and paired standard errors (see the module docstring).

    ``headline`` maps a task to the metric its rows' ``correct`` flags make.
    """
    paired: Dict[str, float] = {}
    for name, value in metrics.items():
        if name in baseline_metrics and not name.endswith(_NOT_COMPARED):
            reference = baseline_metrics[name]
            paired[f"{name}_delta"] = value - reference
            if reference:  # relative to nothing is undefined: left out rather than written as NaN
                paired[f"{name}_rel_delta"] = (value - reference) / reference
    for task, own in rows.items():
        theirs = baseline[task]
        if len(own) != len(theirs) or not own or "correct" not in own[0] or task not in headline:
            continue  # a task without graded items (perplexity, throughput), or other items
        if any(mine.get("question", other.get("question")) != other.get("question", mine.get("question"))
               for mine, other in zip(own, theirs)):
            continue  # other questions in the same number
        flips = (mine.get("predicted") != other.get("predicted") for mine, other in zip(own, theirs))
        paired[f"flip_rate_{task}"] = statistics.mean(flips)
        differences = [float(mine["correct"]) - float(other["correct"]) for mine, other in zip(own, theirs)]
        metric = headline[task]
        paired[f"{metric}_delta_se"] = statistics.standard_error(differences)
        gained, lost = differences.count(1.0), differences.count(-1.0)
        paired.update({f"{metric}_gained": gained, f"{metric}_lost": lost,
                       f"{metric}_mcnemar_p": statistics.mcnemar_p(gained, lost)})
    return paired
