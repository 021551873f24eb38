"""What a person sees: stage banners, tables that fit the terminal, warnings and one-paragraph errors.

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
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from rich.console import Console
from rich.table import Table
from rich.text import Text


def _width(stream) -> Optional[int]:
    """Terminals report their width; piped output gets room so tables do not wrap names."""
    return None if stream.isatty() or "COLUMNS" in os.environ else 160


out = Console(width=_width(sys.stdout), markup=False, emoji=False)
err = Console(stderr=True, width=_width(sys.stderr), markup=False, emoji=False)


def stage_banner(stage_name: str) -> None:
    err.rule(Text(stage_name, style="bold"))


def note(message: str) -> None:
    """A plain line of what is happening (on stderr, with the progress)."""
    err.print(message, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    err.print(message, style="yellow", highlight=False, soft_wrap=True)


def error(message: str) -> None:
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


def format_value(value: Any) -> str:
    """A table cell: ``-`` for none, ``yes``/``no``, four significant digits, thousands separated."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_fitted_table(
    title: str,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    files: Sequence[str],
    console: Console = out,
    order: Optional[Sequence[str]] = None,
    keep: int = 1,
) -> None:
    """``fitted_table``, and under it one line naming the columns left out and the ``files`` that have them."""
    table, left_out = fitted_table(title, rows, columns, console, order, keep)
    console.print(table)
    if left_out:
        console.print(
            f"not shown in {console.width} columns: {', '.join(left_out)}; {' and '.join(files)} have every column",
            style="dim", soft_wrap=True, highlight=False,
        )


def fitted_table(
    title: str,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    console: Console,
    order: Optional[Sequence[str]] = None,
    keep: int = 1,
) -> Tuple[Table, List[str]]:
    """A table of ``rows`` with as many of ``columns`` (most important first) as fit ``console``'s width;
    and the columns left out.

    Whole columns are left out, the least important first, because rich would otherwise
    shorten every column to ``width_pru…``, and a cut stage name or header can read as
    another. The first ``keep`` columns always stay; should they alone be wider than the
    console, their cells fold onto a second line rather than lose their ends. Columns are
    shown in the order of ``order`` (which names them all), else in ``columns``' order.
    """
    shown = list(columns)
    while True:
        table = Table(title=title, title_justify="left")
        ordered = sorted(shown, key=list(order or columns).index)
        for column in ordered:
            table.add_column(column, justify="left" if column in _TEXT_COLUMNS else "right", overflow="fold")
        for row in rows:
            table.add_row(*(format_value(row.get(column)) for column in ordered))
        # The width the table takes unconstrained: measured against a console wide enough for any table.
        width = console.measure(table, options=console.options.update_width(_UNCONSTRAINED)).maximum
        if width <= console.width or len(shown) <= keep:
            return table, [column for column in columns if column not in shown]
        shown.pop()


# Columns of names and words, aligned left; numbers align right.
_TEXT_COLUMNS = ("run", "stage", "technique", "pipeline", "made_by", "precision")
_UNCONSTRAINED = 100_000
