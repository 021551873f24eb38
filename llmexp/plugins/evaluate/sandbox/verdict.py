"""The verdict process of the code sandbox: a problem's checks, run against a program that lives in another process.

A sample passes when the problem's ``check(candidate)`` returns here, in this process,
with ``candidate`` a stand-in for the program's function: each call is sent to the
program's process (``program_server.py``, started confined by ``isolation.py``) and its
answer comes back as plain data, or as the exception the function raised. The program
can make its own process answer anything, exit, crash or hang; it cannot reach this
process (another PID namespace, not dumpable), its memory, the checks (they never enter
the program's process) or the verdict (written to this process's stdout, which the
program never holds).

``runner.run_program`` runs this file as ``python -I verdict.py`` with the job pickled on
stdin (``source``, ``checks``, ``entry_point``, ``limits``, ``isolated``) and reads the
pickled verdict (``status``, ``detail``) from its stdout. It starts once per sample, so it
imports little: the standard library's cheaper modules and its siblings, by path.
"""

from __future__ import annotations

import builtins
import contextlib
import linecache
import os
import pickle
import resource
import select
import signal
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import isolation  # noqa: E402
import kernel  # noqa: E402
import program_server  # noqa: E402

del sys.path[0]  # the checks import what they import, not this folder's modules

CHECKS_FILE = "checks.py"
MAX_REPLY_BYTES = 64 * 2**20  # one answer of the program's function: plenty for data the checks compare
OWN_MEMORY_MB = 1024  # this process's address space beyond the program's: a reply unpickled, the checks
_TAIL_BYTES = 4096
_SIGNAL_REASONS = {"SIGXFSZ": "file size limit", "SIGXCPU": "CPU time limit",
                   "SIGKILL": "killed: memory, process or CPU limit"}  # fmt: skip


class ProgramEnded(BaseException):
    """The program's process ended before the checks did. Not an ``Exception``: checks that catch those go on."""

    def __init__(self, exit_code: int):
        super().__init__(exit_code)
        self.exit_code = exit_code


class TimedOut(BaseException):
    """The time limit passed while the checks waited for the program."""


class Program:
    """The confined program's process, seen from the checks: send a call, wait for its answer."""

    def __init__(self, launched: isolation.Launched, calls_fd: int, replies_fd: int, deadline: float, limit: int):
        self._launched, self._calls, self._replies = launched, calls_fd, replies_fd
        self._deadline, self._limit = deadline, limit
        self.ended = None  # the ProgramEnded or TimedOut that stopped a call, kept if the checks swallow it

    def call(self, message: bytes) -> tuple:
        """Send a pickled call; its reply, unpickled as plain data."""
        if self.ended is not None:
            raise self.ended
        try:
            program_server.write_message(self._calls, message, self._wait_writable)
            data = program_server.read_message(self._replies, self._limit, self._wait)
            if data is None:
                raise EOFError("the program closed its replies")
        except (BrokenPipeError, EOFError):
            self._wait_for_end()
        except (ProgramEnded, TimedOut) as ended:
            self.ended = ended
            raise
        try:
            return program_server.plain_loads(data)
        except Exception as error:
            raise TypeError(f"the program answered with something other than plain data: {error}") from None

    def _wait(self) -> None:
        """Until a reply can be read; raises ``ProgramEnded`` or ``TimedOut`` instead."""
        self._wait_for([self._replies], [])

    def _wait_writable(self) -> None:
        self._wait_for([], [self._calls])

    def _wait_for(self, reading: list, writing: list) -> None:
        left = self._deadline - time.monotonic()
        ready = select.select([*reading, self._launched.status_fd], writing, [], max(0.0, left))
        if ready[1] or self._replies in ready[0]:
            return
        if ready[0]:
            raise ProgramEnded(self._launched.exit_code())
        raise TimedOut()

    def _wait_for_end(self) -> None:
        left = max(0.0, self._deadline - time.monotonic())
        if not select.select([self._launched.status_fd], [], [], left)[0]:
            self.ended = TimedOut()
        else:
            self.ended = ProgramEnded(self._launched.exit_code())
        raise self.ended


class RemoteFunction:
    """What ``check(candidate)`` receives: calling it calls the program's function in the program's process."""

    def __init__(self, program: Program, name: str):
        self._program, self.__name__ = program, name

    def __call__(self, *args, **kwargs):
        try:
            call = pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:
            raise TypeError(f"the checks passed {self.__name__} an argument that cannot be sent: {error}") from None
        reply = self._program.call(call)
        if reply[0] == "return":
            return reply[1]
        raise _exception(*reply[1:])


def _exception(name: str, message: str) -> Exception:
    """The program's exception as the checks see it: a built-in one as itself, any other as RuntimeError."""
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except Exception:  # a constructor that wants other arguments (UnicodeDecodeError)
            pass
    return RuntimeError(f"{name}: {message}")


def judge(job: dict) -> dict:
    """Run the program confined and the checks here; the verdict as ``{"status", "detail"}``."""
    limits = job["limits"]
    deadline = time.monotonic() + limits["timeout_s"]
    confinement = isolation.Confinement(
        memory_mb=limits["memory_mb"], cpu_s=int(limits["timeout_s"]) + 1, file_mb=limits["file_mb"],
        work_mb=limits["file_mb"], processes=limits["processes"],
    )  # fmt: skip
    isolated = job["isolated"]
    workdir = contextlib.nullcontext("/tmp") if isolated else _temporary_directory()
    with workdir as home, open(os.memfd_create("stdout"), "w+b") as output, \
            open(os.memfd_create("stderr"), "w+b") as errors:  # fmt: skip
        calls_r, calls_w = os.pipe()
        os.set_blocking(calls_w, False)  # a program that stops reading must not block the checks past the deadline
        replies_r, replies_w = os.pipe()
        devnull = os.open(os.devnull, os.O_RDONLY)
        fds = {0: devnull, 1: output.fileno(), 2: errors.fileno(), program_server.CALLS_FD: calls_r,
               program_server.REPLIES_FD: replies_w}  # fmt: skip
        with open(program_server.__file__, encoding="utf-8") as server:
            argv = [sys.executable, "-I", "-c", server.read()]
        try:
            launched = isolation.launch(argv, _environment(home), fds, confinement, isolated, home)
        except kernel.IsolationError as error:
            os.close(calls_w)
            os.close(replies_r)
            return {"status": "isolation_failed", "detail": error.strerror or str(error)}
        finally:
            for fd in (devnull, calls_r, replies_w):
                os.close(fd)
        program = Program(launched, calls_w, replies_r, deadline, limit=MAX_REPLY_BYTES)
        try:
            status, detail = _run_checks(job, program)
        finally:
            launched.stop()
            os.close(calls_w)
            os.close(replies_r)
        stderr = _tail(errors)
        if stderr and status != "passed":
            detail = f"{detail}\nprogram stderr: {stderr}" if detail else stderr
        return {"status": status, "detail": detail}


def _run_checks(job: dict, program: Program) -> tuple:
    """``(status, detail)``: the program's top-level code runs there first, then ``check`` here."""
    entry_point = job["entry_point"]
    try:
        program.call(pickle.dumps(("load", job["source"], entry_point)))
        checks = job["checks"]
        linecache.cache[CHECKS_FILE] = (len(checks), None, checks.splitlines(True), CHECKS_FILE)
        namespace = {"__name__": "__checks__"}
        exec(compile(checks, CHECKS_FILE, "exec"), namespace)
        check = namespace.get("check")
        if not callable(check):
            return "failed", "the problem's test defines no check(candidate)"
        namespace[entry_point] = candidate = RemoteFunction(program, entry_point)
        check(candidate)
    except (ProgramEnded, TimedOut) as ended:
        return _ended(ended)
    except Exception as error:
        if program.ended is not None:  # the checks went on after the program had gone
            return _ended(program.ended)
        return "failed", _describe(error)
    if program.ended is not None:
        return _ended(program.ended)
    return "passed", ""


def _ended(ended: BaseException) -> tuple:
    if isinstance(ended, TimedOut):
        return "timed_out", "still running after the time limit"
    code = ended.exit_code
    if code == 0:
        return "exited_early", "the program exited with status 0 before its checks had finished"
    if code > 0:
        return "failed", f"the program exited with status {code}"
    name = signal.Signals(-code).name
    reason = _SIGNAL_REASONS.get(name)
    return "crashed", f"{name} ({reason})" if reason else name


def _describe(error: Exception) -> str:
    """The failed line of the checks and the exception, e.g. ``checks.py:9: assert candidate(1) == 2`` + ``AssertionError``."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == CHECKS_FILE]
    where = f"{CHECKS_FILE}:{frames[-1].lineno}: {frames[-1].line}\n" if frames else ""
    return where + "".join(traceback.format_exception_only(type(error), error)).strip()


def _temporary_directory():
    import tempfile  # only here: the unisolated program's working directory

    return tempfile.TemporaryDirectory(prefix="sample-")


def _environment(home: str) -> dict:
    """A minimal environment: nothing of the caller's (proxies, API keys, tokens) reaches the program."""
    return {
        "PATH": os.defpath,
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _tail(handle) -> str:
    handle.seek(0, os.SEEK_END)
    handle.seek(max(0, handle.tell() - _TAIL_BYTES))
    return handle.read().decode("utf-8", "replace").strip()


def main() -> None:
    job = pickle.load(sys.stdin.buffer)
    report = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what the checks print goes to stderr; stdout carries the verdict alone
    kernel.not_dumpable()
    memory = (job["limits"]["memory_mb"] + OWN_MEMORY_MB) * 2**20  # a flood of replies meets MemoryError here
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    with report:
        pickle.dump(judge(job), report)


if __name__ == "__main__":
    main()
