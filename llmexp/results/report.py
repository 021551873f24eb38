"""The comparison of a run's evaluated models as a table (Markdown, CSV) and Pareto plots (PNG).

Rows come from ``results.comparison``: one per evaluation, with the model's stats and the
cost of making it. Size is the model's bytes on disk in MB (``size_mb``) and as a percentage
of the first row's (``size_pct``): in the compress pipeline the first row is the baseline, in
the customize pipeline the base model scored zero-shot. A plot shows each accuracy measure
against throughput and against size, and joins the models no other model beats on both axes
(the Pareto front).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from llmexp.atomic import replace_atomically

# The table's columns, in order; those no row has are left out.
COLUMNS = (
    "stage", "made_by", "precision", "simulated", "layers", "parameters",
    "mc_cloze_acc", "mc_letter_acc", "free_answer_em", "word_problem_em", "gsm8k_em", "text2sql_em",
    "text2sql_exec_acc", "text2sql_rougeL", "text2sql_bleu", "text2sql_f1", "perplexity",
    "mc_cloze_acc_delta", "mc_cloze_acc_delta_se", "word_problem_em_delta", "word_problem_em_delta_se",
    "perplexity_rel_delta", "kl_to_baseline", "flip_rate_multiple_choice", "flip_rate_word_problems",
    "size_mb", "size_pct", "bits_per_weight", "tokens_per_s", "eval_peak_memory_mb",
    "trainable_parameters", "train_time_s", "peak_memory_mb",
)
# The columns a terminal may show, most important first: the table keeps as many as fit its width,
# leaving out the last ones first, and shows them in COLUMNS' order; comparison.md and .csv carry them
# all. Which model, how accurate, how big; then how it differs from the baseline, what it is, its
# speed, what made it and at what cost.
CONSOLE_COLUMNS = (
    "stage", "mc_cloze_acc", "word_problem_em", "free_answer_em", "text2sql_em", "size_mb", "perplexity",
    "kl_to_baseline", "precision", "parameters", "layers", "tokens_per_s", "made_by", "text2sql_exec_acc",
    "text2sql_rougeL", "text2sql_bleu", "text2sql_f1", "flip_rate_multiple_choice", "train_time_s",
)
# Accuracy measures a Pareto plot may show, in order of preference (at most two are drawn).
ACCURACIES = ("mc_cloze_acc", "word_problem_em", "text2sql_em", "free_answer_em", "gsm8k_em", "mc_letter_acc")
# Cost axes: (metric, axis label, whether higher is better). Throughput is the evaluation's forward
# tokens/s, or a benchmark stage's generated tokens/s; memory is what the evaluation used.
THROUGHPUT = ("tokens_per_s", "throughput (tokens/s, higher is better)", True)
GENERATION_THROUGHPUT = ("output_tokens_per_s", "generation throughput (output tokens/s, higher is better)", True)
SIZE = ("size_mb", "size (MB on disk, lower is better)", False)
PEAK_MEMORY = ("eval_peak_memory_mb", "peak memory (MB, lower is better)", False)
COSTS = (THROUGHPUT, SIZE)

TABLE_MD, TABLE_CSV, PARETO_PNG = "comparison.md", "comparison.csv", "pareto.png"


def report_rows(comparison: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The comparison rows with their size: ``size_mb`` (10^6 bytes on disk) and ``size_pct`` (of the first row's)."""
    reference = next((row.get("bytes_on_disk") for row in comparison if row.get("bytes_on_disk")), None)
    rows = []
    for row in comparison:
        row = dict(row)
        if row.get("bytes_on_disk"):
            row["size_mb"] = row["bytes_on_disk"] / 1e6
        if reference and row.get("bytes_on_disk"):
            row["size_pct"] = 100.0 * row["bytes_on_disk"] / reference
        rows.append(row)
    return rows


def table_columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> List[str]:
    """The ``columns`` at least one row has a value for."""
    return [column for column in columns if any(row.get(column) is not None for row in rows)]


def write_report(run_dir: Path | str, comparison: Sequence[Mapping[str, Any]]) -> Dict[str, str]:
    """Write the table (``comparison.md``, ``comparison.csv``) and ``pareto.png``; their paths by kind."""
    run_dir = Path(run_dir)
    rows = report_rows(comparison)
    columns = table_columns(rows)
    written = {
        "table": str(replace_atomically(run_dir / TABLE_MD, lambda f: f.write(markdown_table(rows, columns)))),
        "csv": str(replace_atomically(run_dir / TABLE_CSV, lambda f: _write_csv(f, rows, columns))),
    }
    png = pareto_png(rows)
    if png is not None:
        written["plot"] = str(replace_atomically(run_dir / PARETO_PNG, lambda f: f.write(png), binary=True))
    return written


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_value(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def pareto_front(points: Sequence[tuple], higher_cost_is_better: bool) -> List[int]:
    """Indices of the ``(cost, accuracy)`` points no other point beats on both, ordered by cost."""
    sign = -1 if higher_cost_is_better else 1

    def beats(a, b) -> bool:
        return sign * a[0] <= sign * b[0] and a[1] >= b[1] and (a[0] != b[0] or a[1] != b[1])

    front = [i for i, p in enumerate(points) if not any(beats(q, p) for q in points)]
    return sorted(front, key=lambda i: points[i][0])


def pareto_png(
    rows: Sequence[Mapping[str, Any]],
    costs: Sequence[tuple] = COSTS,
    accuracies: Sequence[str] = ACCURACIES,
    label: str = "stage",
) -> Optional[bytes]:
    """Accuracy against each cost axis, one panel per (accuracy, cost) pair; None with nothing to plot.

    At most two accuracy measures are drawn, the first of ``accuracies`` that two rows have;
    each point is annotated with its row's ``label`` field.
    """
    accuracies = [name for name in accuracies if sum(row.get(name) is not None for row in rows) >= 2][:2]
    costs = [cost for cost in costs if sum(row.get(cost[0]) is not None for row in rows) >= 2]
    if not accuracies or not costs:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(
        len(accuracies), len(costs), figsize=(6 * len(costs), 4.5 * len(accuracies)), squeeze=False
    )
    for r, accuracy in enumerate(accuracies):
        for c, (cost, axis_label, higher_is_better) in enumerate(costs):
            axis = axes[r][c]
            shown = [row for row in rows if row.get(accuracy) is not None and row.get(cost) is not None]
            points = [(float(row[cost]), float(row[accuracy])) for row in shown]
            axis.scatter([p[0] for p in points], [p[1] for p in points])
            for row, (x, y) in zip(shown, points):
                axis.annotate(str(row.get(label, "")), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            front = pareto_front(points, higher_is_better)
            axis.plot([points[i][0] for i in front], [points[i][1] for i in front], linestyle="--", label="Pareto front")
            axis.set_xlabel(axis_label)
            axis.set_ylabel(accuracy)
            axis.grid(alpha=0.3)
            axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def _write_csv(handle, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
