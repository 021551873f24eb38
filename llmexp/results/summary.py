"""What a finished run prints on stdout: every stage's metrics, the comparison of its evaluated models, its model
and its directory.

The comparison shows as many of its columns (``llmexp.results.columns``) as the terminal has room for;
comparison.md and comparison.csv have them all.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.table import Table

from llmexp.display import console as display
from llmexp.display.console import format_value
from llmexp.results.columns import PAIRED_SUFFIXES, Declared, columns_of, declared_metrics, present
from llmexp.results.report import TABLE_CSV, TABLE_MD, report_rows


def print_results(record: Dict[str, Any], console: Console = display.out, declared: Optional[Declared] = None) -> None:
    """Every stage's metrics, the comparison of the evaluated models, the final model and the run directory.

    Nothing is cut short at any width: stage names and values keep their width and a metric
    name too long for what is left folds onto the next line. Differences from a baseline are
    left out (results.json and comparison.md keep them). ``declared``: what each stage declares
    it reports, by default looked up from the record (``columns.declared_metrics``).
    """
    table = Table(title="Results", title_justify="left")
    table.add_column("stage", no_wrap=True)
    table.add_column("metric", overflow="fold")
    table.add_column("value", justify="right", no_wrap=True)
    for stage_name, stage in record["stages"].items():
        for metric, value in stage["metrics"].items():
            if metric.endswith(PAIRED_SUFFIXES):
                continue
            table.add_row(stage_name, metric, format_value(value))
            stage_name = ""
    console.print(table)
    comparison = record.get("comparison") or []
    if len(comparison) > 1:
        print_comparison(comparison, declared if declared is not None else declared_metrics(record), console)
    stats = record.get("model_stats") or {}
    if stats:
        console.print("model: " + ", ".join(f"{k}={format_value(v)}" for k, v in stats.items()))
    console.print(f"wall time: {record['wall_time_s']:.1f} s")
    console.print(f"run directory: {record['run_dir']}", soft_wrap=True, highlight=False)


def print_comparison(rows: List[Dict[str, Any]], declared: Declared, console: Console = display.out) -> None:
    """The evaluations side by side with their models' stats and cost, as many columns as the width has room for."""
    if len(rows) < 2:
        return
    rows = report_rows(rows)
    columns = columns_of(rows, declared)
    display.print_fitted_table(
        "Comparison", rows, present(rows, columns.console()), (TABLE_MD, TABLE_CSV), console, order=columns.table()
    )
