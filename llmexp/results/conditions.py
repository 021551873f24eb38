"""The conditions table of ``llmexp report``: each evaluation's condition beside its qualities and its baseline's.

An evaluation's ``condition`` says what its model read before each question (the question alone, solved
examples, retrieved passages). Two evaluations of the same questions in different conditions, or of different
models, compare item by item when one names the other as its ``baseline``: the table gives each quality's
difference from the baseline's (``<quality>_delta``) and the exact McNemar p-value of the items one got right
and the other wrong (``<quality>_mcnemar_p``, where the quality is its task's headline), as the evaluation
recorded them. One row per evaluation that records a condition; the qualities are those its stage declares.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

from llmexp.results.columns import Declared, present, recorded_nodes
from llmexp.techniques.contract import MetricKind

CONDITIONS_CSV = "conditions.csv"
IDENTITY = ("run", "stage", "model", "condition", "baseline")
DELTA, MCNEMAR = "_delta", "_mcnemar_p"


def condition_rows(run: str, results: Mapping[str, Any], declared: Declared) -> List[Dict[str, Any]]:
    """The rows of one run's evaluations that record a condition (``results``: its results.json), in run order."""
    _, nodes = recorded_nodes(results)
    stages = results.get("stages") or {}
    rows = []
    for evaluation in results.get("comparison") or []:
        stage = evaluation.get("stage")
        node = nodes.get(stage)
        if node is None or node.get("condition") is None:
            continue
        metrics = stages[stage].get("metrics") or {}
        row = {"run": run, "stage": stage, "model": evaluation.get("model"), "condition": str(node.condition),
               "baseline": node.get("baseline")}
        for quality in qualities_of(declared.get(stage), metrics):
            row.update({name: metrics.get(name) for name in (quality, quality + DELTA, quality + MCNEMAR)})
        rows.append(row)
    return rows


def qualities_of(metrics_declared, metrics: Mapping[str, Any]) -> List[str]:
    """The qualities a stage declares that it measured, in the order declared."""
    return [m.name for m in metrics_declared or () if m.kind is MetricKind.QUALITY and m.name in metrics]


def condition_columns(rows: Sequence[Mapping[str, Any]], several_runs: bool) -> Tuple[List[str], List[str]]:
    """The table's columns (what some row has) and their Markdown headers: which evaluation, then each quality with
    its difference from the baseline and McNemar's p."""
    qualities = list(dict.fromkeys(
        key for row in rows for key in row if key not in IDENTITY and not key.endswith((DELTA, MCNEMAR))))
    identity = [column for column in IDENTITY if several_runs or column != "run"]
    columns = present(rows, [*identity, *(c for q in qualities for c in (q, q + DELTA, q + MCNEMAR))])
    return columns, [_header(column) for column in columns]


def _header(column: str) -> str:
    if column.endswith(DELTA):
        return f"{column[: -len(DELTA)]} vs baseline"
    if column.endswith(MCNEMAR):
        return f"{column[: -len(MCNEMAR)]} McNemar p"
    return column
