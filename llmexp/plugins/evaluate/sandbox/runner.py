"""Running a model's program against its tests so that nothing the program does reaches beyond its sample.

``run_program(Program(source, checks, entry_point))`` runs two processes per sample:

* the **program** (the prompt and the model's completion) in a process the kernel confines
  (``isolation.py``): its own user, PID, mount, network, IPC, UTS and cgroup namespaces;
  uid ``nobody`` when the caller is root, never a capability; a read-only view of the
  system and interpreter directories and nothing else (no home directories, data sets or
  run outputs), a small ``tmpfs`` as its only writable place; limits on memory, CPU,
  file size (which caps its output), processes and open files; a seccomp filter (no
  sockets, namespaces, mounts, ptrace, keyrings, BPF, io_uring, modules);
* the **verdict** (``verdict.py``): the problem's checks (the prompt and the test, which
  never enter the program's process) calling the program's function through a pipe and
  getting plain data back (``program_server.py``). The sample passes when ``check``
  returns there.

What holds, and on what (tests in ``tests/test_code_execution.py`` run each attack):

* writes outside the program's ``tmpfs`` (``open``, ``_io.FileIO``, ``os.link`` into it
  and appending): the read-only mount namespace (``EROFS``, ``EXDEV``, or the path does not
  exist in the view);
* network (``socket`` by any route, the original class through the MRO): seccomp refuses
  ``socket(2)``, and the network namespace has no interface up;
* signals and ``ptrace`` to other processes (``os.kill``, ``ctypes``, ``pidfd_send_signal``):
  the PID namespace (nothing outside has a pid in it), the uid when the caller is root;
* forks: ``RLIMIT_NPROC`` in the program's own user namespace; a child that calls
  ``setsid`` or double-forks dies with the namespace's init when the program ends or
  its time runs out;
* a forged pass (reading a marker from the caller's frame, printing to every descriptor,
  ``os._exit(0)`` before the checks, an object whose ``__eq__`` always says yes, patching
  its own interpreter): the verdict is ``check`` returning in the verdict process, which
  the program cannot reach; an exit before the checks end is ``exited_early``, and a reply
  that is not plain data fails the check.

Not guaranteed: the program runs in the same kernel (a kernel bug reachable through the
allowed system calls is a way out, as for any container); it can read what the view
shows (system files, the interpreter's libraries) and spend its limits (memory is capped
per process, so its processes together may hold ``processes`` x ``memory_mb``: a cgroup
would cap the sum, and needs a delegated cgroup this does not assume); and checks that
the program satisfies are only as strong as the checks (the verdict says they returned,
not that they tested much). It changes one thing from the usual single-process harness:
the function's arguments and results cross a process boundary, so a function that only
mutates its arguments, or returns anything but plain data (None, bool, numbers, str,
bytes and lists, tuples, dicts and sets of them), fails.

Where the kernel does not allow this (``isolation_problem`` says why), the program is not
run unless the caller passes ``isolated=False``: then it runs as the caller, with only the
limits, in a temporary directory, and a child that calls ``setsid`` survives it; the
verdict still comes from the separate verdict process.
"""

from __future__ import annotations

import functools
import os
import pickle
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence

VERDICT_SCRIPT = Path(__file__).with_name("verdict.py")
_VERDICT_GRACE_S = 30.0  # beyond timeout_s: starting the processes, and checks that run long themselves


class IsolationUnavailable(Exception):
    """The kernel (or a container around it) refused a confinement step; the message names it."""


@dataclass(frozen=True)
class Program:
    """One sample: ``source`` (prompt and completion) runs confined; ``checks`` define ``check(candidate)``."""

    source: str
    checks: str
    entry_point: str


@dataclass(frozen=True)
class Limits:
    """What one program may use; ``timeout_s`` is wall-clock time, startup included."""

    timeout_s: float = 10.0
    memory_mb: int = 2048  # address space (RLIMIT_AS); the verdict process gets 1 GiB more
    file_mb: int = 16  # any file it writes, its captured output included (RLIMIT_FSIZE), and its tmpfs
    processes: int = 32  # processes and threads at once (RLIMIT_NPROC in its own user namespace)


@dataclass(frozen=True)
class Outcome:
    """How one sample ended.

    ``status``: ``passed``; ``failed`` (a check failed, the program raised or exited
    non-zero, returned something that is not plain data, or was refused a write);
    ``exited_early`` (the program exited with status 0 before its checks ended);
    ``timed_out``; ``crashed`` (killed by a signal: segfault, file size or CPU limit).
    ``detail`` is the failed check and the end of the program's stderr, or the signal.
    """

    status: str
    seconds: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(program: Program, limits: Limits = Limits(), isolated: bool = True) -> Outcome:
    """Run one sample; raises ``IsolationUnavailable`` if ``isolated`` and the kernel refuses a step."""
    job = {**asdict(program), "limits": asdict(limits), "isolated": isolated}
    started = time.monotonic()
    verdict = subprocess.Popen(
        [sys.executable, "-I", str(VERDICT_SCRIPT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
        env={"PATH": os.defpath, "LANG": "C.UTF-8", "TMPDIR": os.environ.get("TMPDIR", "/tmp")},
        start_new_session=True,  # its own process group: killed as a whole if it overruns
    )
    try:
        report, errors = verdict.communicate(pickle.dumps(job), timeout=limits.timeout_s + _VERDICT_GRACE_S)
    except subprocess.TimeoutExpired:
        _kill_group(verdict.pid)
        verdict.communicate()
        return Outcome("timed_out", time.monotonic() - started, "the checks did not finish")
    finally:
        _kill_group(verdict.pid)  # unisolated, what the program left in the group
    seconds = time.monotonic() - started
    if verdict.returncode != 0 or not report:
        raise RuntimeError(f"the sandbox's verdict process failed ({verdict.returncode}): {errors.decode()[-2000:]}")
    result = pickle.loads(report)  # from the verdict process, which runs only trusted code
    if result["status"] == "isolation_failed":
        raise IsolationUnavailable(result["detail"])
    return Outcome(result["status"], seconds, result["detail"])


def run_programs(
    programs: Sequence[Program], limits: Limits = Limits(), workers: int = 4, isolated: bool = True
) -> List[Outcome]:
    """``run_program`` of each program, ``workers`` at a time, outcomes in order.

    Threads suffice: each one only waits on its verdict process.
    """
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda program: run_program(program, limits, isolated), programs))


@functools.lru_cache(maxsize=None)
def isolation_problem() -> Optional[str]:
    """Why this machine cannot run programs isolated (None: it can), from running one trivial program so."""
    probe = Program("def answer():\n    return 42\n", "def check(candidate):\n    assert candidate() == 42\n", "answer")
    try:
        outcome = run_program(probe, Limits(timeout_s=60.0))
    except IsolationUnavailable as error:
        return str(error)
    return None if outcome.passed else f"a trivial program did not pass when isolated ({outcome.status}: {outcome.detail})"


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
