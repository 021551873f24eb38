"""What a person sees: stage banners, the results table, warnings and one-paragraph errors.

Progress and messages go to stderr; the results table and the run directory to stdout,
so ``llmexp ... > summary.txt`` keeps the part worth keeping.

Both consoles print text literally: rich markup (``[bold]``) and emoji codes (``:smile:``)
are off, because most of what is printed is user text (overrides such as
``'evaluation.tasks=[perplexity]'``, paths, reasons) that rich would otherwise style, mangle
or refuse with a ``MarkupError``. Styles come from ``Text`` objects and ``style=`` only.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.table import Table
from rich.text import Text

from llmexp import report


def _width(stream) -> Optional[int]:
    """Terminals report their width; piped output gets room so tables do not wrap names."""
    return None if stream.isatty() or "COLUMNS" in os.environ else 160


out = Console(width=_width(sys.stdout), markup=False, emoji=False)
err = Console(stderr=True, width=_width(sys.stderr), markup=False, emoji=False)


def stage_banner(stage_name: str) -> None:
    err.rule(Text(stage_name, style="bold"))


def warn(message: str) -> None:
    err.print(message, style="yellow", highlight=False, soft_wrap=True)


def error(message: str) -> None:
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


# Differences from a baseline: results.json and comparison.md keep them, the console leaves them out.
PAIRED_SUFFIXES = ("_delta", "_delta_se")


def print_results(record: Dict[str, Any]) -> None:
    table = Table(title="Results", title_justify="left")
    for column in ("stage", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for stage_name, stage in record["stages"].items():
        for metric, value in stage["metrics"].items():
            if metric.endswith(PAIRED_SUFFIXES):
                continue
            table.add_row(stage_name, metric, report.format_value(value))
            stage_name = ""
    out.print(table)
    print_comparison(record.get("comparison") or [])
    stats = record.get("model_stats") or {}
    if stats:
        out.print("model: " + ", ".join(f"{k}={report.format_value(v)}" for k, v in stats.items()))
    out.print(f"wall time: {record['wall_time_s']:.1f} s")
    out.print(f"run directory: {record['run_dir']}", soft_wrap=True, highlight=False)


def print_comparison(rows: List[Dict[str, Any]]) -> None:
    """The evaluations side by side with their models' stats and cost (the run's comparison.md has every column)."""
    if len(rows) < 2:
        return
    rows = report.report_rows(rows)
    columns = report.table_columns(rows, report.CONSOLE_COLUMNS)
    table = Table(title="Comparison", title_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column in ("stage", "made_by", "precision") else "right")
    for row in rows:
        table.add_row(*(report.format_value(row.get(column)) for column in columns))
    out.print(table)
