"""Progress a person can follow wherever the run's output goes: a terminal, a log file, a job's output file.

On a terminal, rich's live bars. Anywhere else (``llmexp > log 2>&1``, nohup, a Slurm job's
output file) a live bar is drawn only once, when it ends, so a long stage looks hung; there each
task prints a plain, flushed line instead: at the first update, every ``LLMEXP_PROGRESS_INTERVAL``
seconds (default 30) and when the task ends::

    baseline: step 200/1000 (20%) loss 1.234 11.2k tok/s elapsed 0:18 eta 1:12

``Progress`` is rich's ``Progress`` with both behaviours behind the same calls (``add_task``,
``update``, ``advance``, ``track``), so a loop reports its progress once and either way; rich
keeps the counts, the elapsed time and the speed the ETA comes from. Lines go to stderr with
the rest of the progress, so ``llmexp ... > summary.txt`` keeps only the results.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, Optional, Union

from rich import progress as rich_progress
from rich.console import Console

from llmexp.display import console
from llmexp.errors import UserError

INTERVAL_ENV = "LLMEXP_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0

# A task's ``detail`` field: text after the counts, or a function giving it, called only when a
# line is printed (reading a loss off a GPU waits for the device).
Detail = Union[str, Callable[[], str]]


def interval_s() -> float:
    """Seconds between two progress lines of a task off a terminal (``LLMEXP_PROGRESS_INTERVAL``; 0: every update)."""
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_INTERVAL_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise UserError(
            f"{INTERVAL_ENV}={text!r} is not a number of seconds: it sets how often a run that is not on a terminal "
            f"prints a progress line. Set it to a number such as 10 (0: every update), or unset it for "
            f"{DEFAULT_INTERVAL_S:g} s."
        )
    return seconds


def is_live(stream_console: Optional[Console] = None) -> bool:
    """Whether progress shows as live bars: the console is a terminal that redraws (not TERM=dumb), or a notebook."""
    shown = stream_console or console.err
    return (shown.is_terminal and not shown.is_dumb_terminal) or shown.is_jupyter


class Progress(rich_progress.Progress):
    """Live bars on a terminal; elsewhere the same calls print plain progress lines (see the module docstring).

    Off a terminal the interval counts from the last line of any of its tasks, so a run of
    short tasks (an evaluation's) prints the first update and each task's end, not two lines a task.

    ``name`` starts every bar and line (``evaluate``, a stage's name); a task's description
    follows it. ``unit`` names what is counted (``step``, ``batch``); ``transient`` bars vanish
    when they end. A task's ``detail`` field (``Detail``) adds text to its lines.
    """

    def __init__(self, name: str, unit: str = "", transient: bool = False, stream_console: Optional[Console] = None):
        shown = stream_console or console.err
        self.lines = not is_live(shown)
        self.name, self.unit = name, unit
        self.interval = interval_s()
        self._printed: Dict[int, float] = {}  # task -> its count on its last line
        self._last_line: Optional[float] = None  # when the last line of any task was printed
        super().__init__(
            rich_progress.TextColumn(name.replace("{", "{{").replace("}", "}}"), style="bold", markup=False),
            rich_progress.TextColumn("{task.description}", markup=False),
            rich_progress.BarColumn(),
            rich_progress.MofNCompleteColumn(),
            rich_progress.TimeElapsedColumn(),
            console=shown,
            transient=transient,
            disable=self.lines,
            auto_refresh=not self.lines,  # off a terminal nothing redraws: track() then advances in this thread
        )

    def update(self, task_id, **changes: Any) -> None:
        super().update(task_id, **changes)
        self._line_if_due(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._line_if_due(task_id)

    def stop(self) -> None:
        """End the display; off a terminal, each task whose last progress has no line yet gets one."""
        super().stop()
        if self.lines:
            for task in self.tasks:
                if task.completed and self._printed.get(task.id) != task.completed:
                    self._print_line(task)

    def _line_if_due(self, task_id) -> None:
        if not self.lines:
            return
        task = self._tasks[task_id]
        if not task.completed:
            return
        if task.finished and self._printed.get(task_id) != task.completed:
            self._print_line(task)
        elif self._last_line is None or time.monotonic() - self._last_line >= self.interval:
            self._print_line(task)

    def _print_line(self, task: rich_progress.Task) -> None:
        self._printed[task.id] = task.completed
        self._last_line = time.monotonic()
        self.console.print(progress_line(self.name, self.unit, task), markup=False, highlight=False, soft_wrap=True)


def progress_line(name: str, unit: str, task: rich_progress.Task) -> str:
    """``<name> <description>: <unit> <done>/<total> (<pct>%) <detail> elapsed <m:ss> eta <m:ss>``."""
    label = f"{name} {task.description}".strip()
    count = _number(task.completed)
    if task.total:
        count += f"/{_number(task.total)} ({int(100 * min(task.completed, task.total) / task.total)}%)"
    parts = [f"{label}:", *([unit] if unit else []), count]
    detail = task.fields.get("detail")
    if detail:
        parts.append(detail() if callable(detail) else str(detail))
    parts.append(f"elapsed {clock(task.elapsed or 0.0)}")
    remaining = task.time_remaining
    if task.total and not task.finished and remaining is not None:
        parts.append(f"eta {clock(remaining)}")
    return " ".join(parts)


def clock(seconds: float) -> str:
    """``m:ss`` under an hour, ``h:mm:ss`` from then on."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def rate(per_second: float) -> str:
    """A throughput in three significant digits, with k/M for thousands and millions: ``11.2k``."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if per_second >= scale:
            return f"{per_second / scale:.3g}{suffix}"
    return f"{per_second:.3g}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"
