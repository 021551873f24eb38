"""``llmexp plugins``: every technique, the package it comes from, and whether it can run here; then the
backends that train, serve and build engines, and why any of them cannot run here."""

from __future__ import annotations

from typing import List

from rich.table import Table
from rich.text import Text

from llmexp.display import console
from llmexp.machine.backends import BACKENDS, installed_options, unavailable_reason
from llmexp.techniques.plugin_manager import techniques


def main(argv: List[str]) -> int:
    table = Table(title="Techniques", title_justify="left")
    for column in ("technique", "plugin", "package", "memory", "requirements"):
        table.add_column(column)
    for name, entry in sorted(techniques().items()):
        missing = entry.technique.missing_requirements()
        if missing:
            fix = f" (pip install llmexp[{entry.technique.extra}])" if entry.technique.extra else ""
            status = Text(f"missing: {', '.join(missing)}{fix}", style="red")
        else:
            status = Text("installed", style="green")
        table.add_row(name, entry.plugin, entry.distribution, entry.technique.memory, status)
    console.out.print(table)
    console.out.print(backends_table())
    return 0


def backends_table() -> Table:
    table = Table(title="Backends", title_justify="left")
    for column in ("backend", "role", "what", "selected by", "status"):
        table.add_column(column)
    for backend in BACKENDS.values():
        reason = unavailable_reason(backend)
        status = Text(f"unavailable: {reason}", style="red") if reason else Text("available", style="green")
        extras = installed_options(backend)
        if extras:
            status.append(f" (with {', '.join(extras)})")
        table.add_row(backend.name, backend.role, backend.description, backend.selected_by, status)
    return table
