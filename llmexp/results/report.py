"""The comparison of a run's evaluated models as a table (Markdown, CSV) and Pareto plots (PNG).

Rows come from ``results.comparison``: one per evaluation, with the model's stats and the
cost of making it. Size is the model's bytes on disk in MB (``size_mb``) and as a percentage
of the first row's (``size_pct``): in the compress pipeline the first row is the baseline, in
the customize pipeline the base model scored zero-shot. Columns, their order and labels, and
the plots' axes come from what the stages declare (``llmexp.results.columns``). A plot shows
each quality against each cost and joins the models no other model beats on both axes (the
Pareto front). The Markdown table heads each column with its label; the CSV with its key.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from llmexp.atomic import replace_atomically
from llmexp.display.console import format_value
from llmexp.results.columns import Declared, axis_label, columns_of, present
from llmexp.techniques.contract import Metric

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


def table_columns(rows: Sequence[Mapping[str, Any]], declared: Declared) -> List[str]:
    """The table's columns that at least one row has a value for, in order."""
    return present(rows, columns_of(rows, declared).table())


def write_report(run_dir: Path | str, comparison: Sequence[Mapping[str, Any]], declared: Declared) -> Dict[str, str]:
    """Write the table (``comparison.md``, ``comparison.csv``) and ``pareto.png``; their paths by kind.

    ``declared``: what each stage declares it reports (``columns.declared_metrics``)."""
    run_dir = Path(run_dir)
    rows = report_rows(comparison)
    columns = columns_of(rows, declared)
    shown = present(rows, columns.table())
    written = {
        "table": str(replace_atomically(run_dir / TABLE_MD, lambda f: f.write(markdown_table(rows, shown, [columns.label(c) for c in shown])))),
        "csv": str(replace_atomically(run_dir / TABLE_CSV, lambda f: write_csv(f, rows, shown))),
    }
    png = pareto_png(rows, columns.qualities(rows), columns.costs(rows, first=1))
    if png is not None:
        written["plot"] = str(replace_atomically(run_dir / PARETO_PNG, lambda f: f.write(png), binary=True))
    return written


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                   headers: Optional[Sequence[str]] = None) -> str:
    """A Markdown table of ``columns``, headed by ``headers`` (default: the column names)."""
    lines = ["| " + " | ".join(headers or columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_value(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pareto_front(points: Sequence[tuple], higher_cost_is_better: bool, higher_quality_is_better: bool = True) -> List[int]:
    """Indices of the ``(cost, quality)`` points no other point beats on both, ordered by cost."""
    cost_sign = -1 if higher_cost_is_better else 1
    quality_sign = 1 if higher_quality_is_better else -1

    def beats(a, b) -> bool:
        return (cost_sign * a[0] <= cost_sign * b[0] and quality_sign * a[1] >= quality_sign * b[1]
                and (a[0] != b[0] or a[1] != b[1]))

    front = [i for i, p in enumerate(points) if not any(beats(q, p) for q in points)]
    return sorted(front, key=lambda i: points[i][0])


def pareto_figure(rows: Sequence[Mapping[str, Any]], qualities: Sequence[Metric], costs: Sequence[Metric],
                  label: str = "stage"):
    """A matplotlib figure of each quality (rows) against each cost (columns), or None with nothing to plot.

    Each point is annotated with its row's ``label`` field; axes read ``label (key, which way is better)``.
    """
    if not qualities or not costs:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(
        len(qualities), len(costs), figsize=(6 * len(costs), 4.5 * len(qualities)), squeeze=False
    )
    for r, quality in enumerate(qualities):
        for c, cost in enumerate(costs):
            axis = axes[r][c]
            shown = [row for row in rows if row.get(quality.name) is not None and row.get(cost.name) is not None]
            points = [(float(row[cost.name]), float(row[quality.name])) for row in shown]
            axis.scatter([p[0] for p in points], [p[1] for p in points])
            for row, (x, y) in zip(shown, points):
                axis.annotate(str(row.get(label, "")), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            front = pareto_front(points, cost.higher_is_better, quality.higher_is_better)
            axis.plot([points[i][0] for i in front], [points[i][1] for i in front], linestyle="--", label="Pareto front")
            axis.set_xlabel(axis_label(cost))
            axis.set_ylabel(axis_label(quality))
            axis.grid(alpha=0.3)
            axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def pareto_png(rows: Sequence[Mapping[str, Any]], qualities: Sequence[Metric], costs: Sequence[Metric],
               label: str = "stage") -> Optional[bytes]:
    """``pareto_figure`` as PNG bytes; None with nothing to plot."""
    figure = pareto_figure(rows, qualities, costs, label)
    if figure is None:
        return None
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def write_csv(handle, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
