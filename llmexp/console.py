"""What a person sees: stage banners, the results table, warnings and one-paragraph errors.

Progress and messages go to stderr; the results table and the run directory to stdout,
so ``llmexp ... > summary.txt`` keeps the part worth keeping.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.table import Table


def _width(stream) -> Optional[int]:
    """Terminals report their width; piped output gets room so tables do not wrap names."""
    return None if stream.isatty() or "COLUMNS" in os.environ else 160


out = Console(width=_width(sys.stdout))
err = Console(stderr=True, width=_width(sys.stderr))


def stage_banner(stage_name: str) -> None:
    err.rule(f"[bold]{stage_name}[/bold]")


def warn(message: str) -> None:
    err.print(f"[yellow]{message}[/yellow]")


def error(message: str) -> None:
    err.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)


def print_results(record: Dict[str, Any]) -> None:
    table = Table(title="Results", title_justify="left")
    for column in ("stage", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for stage_name, stage in record["stages"].items():
        for metric, value in stage["metrics"].items():
            table.add_row(stage_name, metric, _format(value))
            stage_name = ""
    out.print(table)
    print_comparison(record.get("comparison") or [])
    stats = record.get("model_stats") or {}
    if stats:
        out.print("model: " + ", ".join(f"{k}={_format(v)}" for k, v in stats.items()))
    out.print(f"wall time: {record['wall_time_s']:.1f} s")
    out.print(f"run directory: {record['run_dir']}", soft_wrap=True, highlight=False)


def print_comparison(rows: List[Dict[str, Any]]) -> None:
    """The evaluations side by side with the cost of their models, when there are several."""
    if len(rows) < 2:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row if not key.endswith("_n")))
    table = Table(title="Comparison", title_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column in ("stage", "model", "made_by") else "right")
    for row in rows:
        table.add_row(*("-" if row.get(column) is None else _format(row[column]) for column in columns))
    out.print(table)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
