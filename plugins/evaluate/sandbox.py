"""Running untrusted programs (a model's code completions with their tests) so that one bad sample fails alone.

Each program runs in a fresh ``python -I`` child process, in its own scratch directory
(deleted afterwards), in a new process group, with a minimal environment (no proxy
variables, no API keys, ``HOME`` and ``TMPDIR`` in the scratch directory). This file is
both halves: the parent side (``run_program``, ``run_programs``) and, run as a script, the
child side, which before executing the program

* sets resource limits: address space, CPU seconds, file size (which also caps the captured
  stdout/stderr, so a flood of output kills the child with SIGXFSZ), no core dumps;
* refuses socket creation, process creation (fork, exec, spawn, ``subprocess``,
  ``os.system``), signals to other processes, and writes outside the scratch directory
  (``open``/``os.open`` for writing, and the ``os`` calls that create, remove, rename,
  link or change files), raising ``PermissionError``;
* reads a per-run random marker from stdin, and prints it only after the program (tests
  included) has run to its end, so a program that exits early (``sys.exit(0)``,
  ``os._exit(0)``) before its checks does not pass.

The parent enforces a wall-clock limit by killing the whole process group, and grades a
run as passed only on exit status 0 with the marker as the last line of stdout.

What this is and is not: a guard against the accidents completions make (infinite loops,
recursion, huge allocations, stray file writes, network calls, forks, early exits), the
same kind as OpenAI's ``human-eval`` reliability guard. It is not a security boundary like
a container, a VM or seccomp: it patches Python-level entry points, so code that goes
around them (``ctypes``, C extensions, ``_io.FileIO``, the interpreter's internals, or
reading the marker out of the guard's frame) is not stopped, the child runs as the same
user with read access to what that user can read, and ``RLIMIT_NPROC`` is not used (it
counts all of the user's processes, and root ignores it). Run code from models you do not
trust inside a container as well.
"""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

PROGRAM_FILE = "program.py"
_TAIL_BYTES = 4096


@dataclass(frozen=True)
class Limits:
    """What one program may use; ``timeout_s`` is wall-clock time, startup included."""

    timeout_s: float = 10.0
    memory_mb: int = 2048  # address space (RLIMIT_AS)
    file_mb: int = 16  # any file it writes, its captured stdout and stderr included (RLIMIT_FSIZE)


@dataclass(frozen=True)
class Outcome:
    """How one program ended.

    ``status``: ``passed``; ``failed`` (an exception or a non-zero exit: a failed assertion,
    a syntax error, a refused write); ``exited_early`` (status 0 without reaching the end);
    ``timed_out``; ``crashed`` (killed by a signal: segfault, output or CPU limit).
    ``detail`` is the end of its stderr, or the signal.
    """

    status: str
    seconds: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(program: str, limits: Limits = Limits(), scratch_root: Optional[Path] = None) -> Outcome:
    """Run ``program`` (Python source) in a fresh scratch directory under ``scratch_root`` (default: the temp dir)."""
    if scratch_root is not None:
        Path(scratch_root).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="sample-", dir=scratch_root)).resolve()
    try:
        (scratch / PROGRAM_FILE).write_text(program, encoding="utf-8")
        marker = f"llmexp-sandbox-done-{secrets.token_hex(16)}"
        with open(scratch / "stdout", "wb") as stdout, open(scratch / "stderr", "wb") as stderr:
            started = time.monotonic()
            child = subprocess.Popen(
                [sys.executable, "-I", str(Path(__file__).resolve()), str(scratch), _limits_argument(limits)],
                stdin=subprocess.PIPE,
                stdout=stdout,
                stderr=stderr,
                cwd=scratch,
                env=_child_environment(scratch),
                start_new_session=True,  # its own process group, killed as a whole
            )
            try:
                child.stdin.write(f"{marker}\n".encode())
                child.stdin.close()
            except BrokenPipeError:  # it died before reading its marker; graded below
                pass
            finished = _wait_unreaped(child.pid, started + limits.timeout_s)
            _kill_group(child.pid)  # stray children included; the unreaped leader keeps the group id reserved
            returncode = child.wait()
            seconds = time.monotonic() - started
        return _grade(returncode, finished, seconds, marker, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_programs(
    programs: Sequence[str], limits: Limits = Limits(), scratch_root: Optional[Path] = None, workers: int = 4
) -> List[Outcome]:
    """``run_program`` of each program, ``workers`` at a time, outcomes in order.

    Threads suffice: each one only waits on its child process.
    """
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda program: run_program(program, limits, scratch_root), programs))


def _limits_argument(limits: Limits) -> str:
    return f"{limits.timeout_s}:{limits.memory_mb}:{limits.file_mb}"


def _child_environment(scratch: Path) -> dict:
    """A minimal environment: nothing of the parent's (proxies, API keys, tokens) reaches the program."""
    return {
        "PATH": os.defpath,
        "HOME": str(scratch),
        "TMPDIR": str(scratch),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait until ``pid`` exits (True) or ``deadline`` passes (False), leaving it a zombie.

    ``subprocess`` has no wait that leaves the child unreaped; an unreaped leader keeps
    its process-group id from being reused, so killing the group afterwards is safe.
    """
    pause = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.02)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _grade(returncode: int, finished: bool, seconds: float, marker: str, scratch: Path) -> Outcome:
    stderr = _tail(scratch / "stderr")
    if not finished:
        return Outcome("timed_out", seconds, f"still running after the time limit; {stderr}".strip("; "))
    if returncode < 0:
        name = signal.Signals(-returncode).name
        reason = {"SIGXFSZ": "output or file size limit", "SIGXCPU": "CPU time limit"}.get(name, "")
        return Outcome("crashed", seconds, f"{name} {reason}".strip() + (f"; {stderr}" if stderr else ""))
    if returncode != 0:
        return Outcome("failed", seconds, stderr or f"exit status {returncode}")
    lines = _tail(scratch / "stdout").splitlines()
    if lines and lines[-1] == marker:
        return Outcome("passed", seconds)
    return Outcome("exited_early", seconds, stderr or "exit status 0 before the end of the tests")


def _tail(path: Path) -> str:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - _TAIL_BYTES))
        return handle.read().decode("utf-8", "replace").strip()


# ---------------------------------------------------------------------------------------
# The child side: everything below runs in the sandboxed process (``python -I sandbox.py``)
# and uses only the standard library.


def _child_main(scratch: str, limits_argument: str) -> None:
    timeout_s, memory_mb, file_mb = limits_argument.split(":")
    _set_limits(float(timeout_s), int(memory_mb), int(file_mb))
    marker = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    marker_fd = os.dup(1)  # kept aside: a program that closes or redirects stdout cannot fake or lose it by accident
    root = os.path.realpath(scratch)
    os.chdir(root)
    tempfile.tempdir = root
    source = Path(root, PROGRAM_FILE).read_text(encoding="utf-8")
    _refuse_sockets()
    _refuse_processes()
    _refuse_writes_outside(root)
    code = compile(source, PROGRAM_FILE, "exec")
    sys.argv = [PROGRAM_FILE]  # as if run as `python program.py`
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a program may have closed them; the marker goes to its own descriptor
            pass
    os.write(marker_fd, f"\n{marker}\n".encode())
    os._exit(0)  # not sys.exit: atexit handlers and lingering threads of the program must not run after the marker


def _set_limits(timeout_s: float, memory_mb: int, file_mb: int) -> None:
    cpu_s = int(timeout_s) + 1  # SIGXCPU at the soft limit, SIGKILL a second later
    for which, soft, hard in (
        (resource.RLIMIT_AS, memory_mb * 2**20, memory_mb * 2**20),
        (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
        (resource.RLIMIT_FSIZE, file_mb * 2**20, file_mb * 2**20),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        ceiling = resource.getrlimit(which)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(which, (soft, hard))


def _refused(what: str):
    def refuse(*args, **kwargs):
        raise PermissionError(f"sandbox: {what} is not allowed")

    return refuse


def _refuse_sockets() -> None:
    import _socket
    import socket

    class RefusedSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("sandbox: network access (socket creation) is not allowed")

    socket.socket = _socket.socket = socket.SocketType = RefusedSocket
    for name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo"):
        setattr(socket, name, _refused(f"socket.{name}"))


def _refuse_processes() -> None:
    import posix

    import _posixsubprocess

    me = os.getpid()
    for module in (os, posix):
        for name in (
            "fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "execv", "execve",
            "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp",
            "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "plock", "setsid", "setpgid",
        ):  # fmt: skip
            if hasattr(module, name):
                setattr(module, name, _refused(f"os.{name} (starting processes)"))
        real_kill, real_killpg = module.kill, module.killpg
        module.kill = lambda pid, sig, _kill=real_kill: (
            _kill(pid, sig) if pid in (0, me) else _refused("signalling other processes")()
        )
        module.killpg = lambda pgid, sig, _killpg=real_killpg: (
            _killpg(pgid, sig) if pgid in (0, os.getpgid(0)) else _refused("signalling other processes")()
        )
    # subprocess binds fork_exec when it is imported (it is, by this file): both names are replaced
    _posixsubprocess.fork_exec = subprocess._fork_exec = _refused("subprocess (starting processes)")


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _refuse_writes_outside(root: str) -> None:
    import builtins
    import io
    import posix

    import _io

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):  # an already open descriptor
            return True
        path = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        real = os.path.realpath(path)
        return real == root or real.startswith(root + os.sep)

    def check(path, dir_fd=None) -> None:
        if not inside(path, dir_fd):
            where = os.fsdecode(path)
            raise PermissionError(f"sandbox: writing {where!r} outside the scratch directory is not allowed")

    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open

    def guard_path(function, *positions):
        """``function`` refusing a path argument (by position, or ``path``/``src``/``dst``) outside the root."""

        def guarded(*args, **kwargs):
            for position in positions:
                keyword = ("src", "dst")[min(position, 1)]
                path = args[position] if position < len(args) else kwargs.get(keyword, kwargs.get("path"))
                if path is not None:
                    check(path, kwargs.get("dir_fd", kwargs.get(f"{keyword}_dir_fd")))
            return function(*args, **kwargs)

        return guarded

    for module in (os, posix):
        real_os_open = module.open

        def guarded_os_open(path, flags, *args, _open=real_os_open, **kwargs):
            if flags & _WRITE_FLAGS:
                check(path, kwargs.get("dir_fd"))
            return _open(path, flags, *args, **kwargs)

        module.open = guarded_os_open
        for name, positions in (
            ("remove", (0,)), ("unlink", (0,)), ("rmdir", (0,)), ("mkdir", (0,)), ("mkfifo", (0,)),
            ("mknod", (0,)), ("chmod", (0,)), ("lchmod", (0,)), ("chown", (0,)), ("lchown", (0,)),
            ("truncate", (0,)), ("utime", (0,)), ("rename", (0, 1)), ("replace", (0, 1)), ("link", (1,)),
            ("symlink", (1,)), ("chroot", (0,)), ("setxattr", (0,)), ("removexattr", (0,)),
        ):  # fmt: skip
            if hasattr(module, name):
                setattr(module, name, guard_path(getattr(module, name), *positions))


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])
