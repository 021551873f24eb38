"""A failure in one line: the ``reason`` that results.json, jobs.json and a sweep's table give.

A table of many points is scanned, not read: a failed point's reason is its error's type and
message on one line, at most ``MAX_REASON`` characters. The whole traceback stays in a log
file whose path is recorded beside the reason (``error_log`` in results.json, ``stderr`` in
jobs.json), never pasted into it.
"""

from __future__ import annotations

from llmexp.errors import UserError

MAX_REASON = 200
TRACEBACK = "Traceback (most recent call last)"


def reason_of(error: BaseException) -> str:
    """``Type: first line of the message``; bad input (``UserError``) is its message alone, which names the field.

    A message that carries another process's traceback (a failed rank's) adds that traceback's
    own exception, which is the cause.
    """
    message = str(error).strip()
    line = message.split("\n", 1)[0]
    if TRACEBACK in message:
        line = f"{line} {last_error_line(message)}"
    return one_line(line if isinstance(error, UserError) else f"{type(error).__name__}: {line}")


def last_error_line(traceback_text: str) -> str:
    """The exception a printed traceback ends with (``ValueError: boom``), its message's first line.

    That is the first line after the traceback's last indented one (frames and source lines
    are indented, the exception line is not).
    """
    lines = [line for line in traceback_text.rstrip().splitlines() if line.strip()]
    start = max((i + 1 for i, line in enumerate(lines) if line.startswith((" ", "\t", TRACEBACK))), default=0)
    return one_line(lines[start] if start < len(lines) else traceback_text)


def one_line(text: str) -> str:
    """``text`` with its whitespace runs (newlines too) as single spaces, cut to ``MAX_REASON`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 1] + "…"
