"""``llmexp plugins``: every technique, the package it comes from, and whether it can run here."""

from __future__ import annotations

from typing import List

from rich.table import Table

from llmexp import console
from llmexp.plugin_manager import techniques


def main(argv: List[str]) -> int:
    table = Table(title="Techniques", title_justify="left")
    for column in ("technique", "plugin", "package", "memory", "requirements"):
        table.add_column(column)
    for name, entry in sorted(techniques().items()):
        missing = entry.technique.missing_requirements()
        if missing:
            fix = f" (pip install llmexp[{entry.technique.extra}])" if entry.technique.extra else ""
            status = f"[red]missing: {', '.join(missing)}{fix}[/red]"
        else:
            status = "[green]installed[/green]"
        table.add_row(name, entry.plugin, entry.distribution, entry.technique.memory, status)
    console.out.print(table)
    return 0
