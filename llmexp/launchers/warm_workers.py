"""Warm worker processes: each imports the heavy libraries once, runs on its own share of the cores, and takes jobs as they come.

A sweep of short jobs on one machine spends much of its time starting: importing torch,
transformers and lightning takes seconds, and every job of a fresh process pays it. These
workers pay it once each, and start paying it as soon as the pool starts, while the launching
process still composes and checks the sweep.

- Workers are forked from the launching process, so they inherit its state (Hydra's among
  it) instead of receiving it with every job. Each pins itself to its cores
  (``os.sched_setaffinity``) before importing anything, so torch's thread pool and
  ``llmexp.machine.cpu_threads`` see that share only: ``usable_cores() // workers`` cores each,
  so the workers never fight over a core.
- A job goes to whichever worker is free, one job at a time: a slow job holds up no job behind it.
- A worker that dies (the out-of-memory killer, a crash in a native kernel) loses only its
  job: ``map`` reports how it died and starts another worker in its place. concurrent.futures
  and loky mark the whole pool broken instead, failing every job not yet run, which is why
  this pool is written here.
- Workers end with the launching process whatever ends it: ``close`` stops them (Ctrl-C
  included), and each watches a pipe whose only write end the launching process holds, so
  when it dies (even by SIGKILL) the read end sees end-of-file and the worker exits at once.
  Ctrl-C reaches the workers too (the terminal signals the whole process group); they leave
  quietly and the launching process speaks for them.
"""

from __future__ import annotations

import dataclasses
import importlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from llmexp.machine.cpu_threads import usable_cores

STOP_GRACE_S = 5.0  # how long a stopped worker gets to end before it is killed


@dataclasses.dataclass
class Outcome:
    """What became of one job: ``value`` is what ``run(job)`` returned, unless the worker died (``died`` says how)."""

    job: Any
    worker: int
    seconds: float
    value: Any = None
    died: Optional[str] = None


class JobRaised(Exception):
    """``run(job)`` raised in a worker; the message holds the worker's traceback."""


def cores_of(index: int, workers: int) -> List[int]:
    """The CPUs worker ``index`` of ``workers`` runs on: its share of the usable cores, side by side.

    ``usable_cores()`` counts the affinity and a container's CPU quota, so with a quota smaller
    than the affinity the workers together stay within the quota; with more workers than cores
    they share cores round the ring.
    """
    cpus = sorted(os.sched_getaffinity(0))
    share = max(1, usable_cores() // workers)
    return sorted({cpus[(index * share + k) % len(cpus)] for k in range(share)})


@dataclasses.dataclass
class _Worker:
    index: int
    cpus: List[int]
    process: Any
    connection: Connection


class WarmWorkers:
    """``count`` forked workers that import ``preload`` once, then call ``run(job)`` for each job they are given.

    ``run`` is called in the worker; what it returns must pickle. ``start`` may be called early
    (the workers import while the caller goes on); ``map`` starts them if it was not.
    """

    def __init__(self, count: int, run: Callable[[Any], Any], preload: Sequence[str] = ()):
        if not hasattr(os, "fork") or not hasattr(os, "sched_setaffinity"):
            raise RuntimeError("warm workers need fork and CPU affinity (Linux)")
        self.count, self.run, self.preload = count, run, tuple(preload)
        self._workers: Dict[int, _Worker] = {}
        self._lifeline: Optional[Tuple[int, int]] = None  # (read, write): the workers watch read; only this process holds write

    def start(self) -> None:
        """Fork the workers that are not running; each pins itself and imports ``preload`` at once."""
        if self._lifeline is None:
            self._lifeline = os.pipe()
        for index in range(self.count):
            worker = self._workers.get(index)
            if worker is None or not worker.process.is_alive():
                self._workers[index] = self._fork(index)

    def _fork(self, index: int) -> _Worker:
        context = multiprocessing.get_context("fork")
        ours, theirs = context.Pipe()
        cpus = cores_of(index, self.count)
        for stream in (sys.stdout, sys.stderr):  # what is buffered here would be written again by the child
            stream.flush()
        process = context.Process(
            target=_serve, args=(theirs, cpus, self.preload, self.run, self._lifeline),
            name=f"llmexp-worker-{index}", daemon=True,
        )
        process.start()
        theirs.close()
        return _Worker(index, cpus, process, ours)

    def cpus(self, index: int) -> List[int]:
        return self._workers[index].cpus

    def map(self, jobs: Sequence[Any], done: Callable[[Outcome], None] = lambda outcome: None) -> List[Outcome]:
        """Run every job on the first free worker; ``done(outcome)`` as each ends; the outcomes in the jobs' order.

        A job whose ``run`` raised raises ``JobRaised`` here, after the pool is stopped.
        """
        self.start()
        queue: Deque[Tuple[int, Any]] = deque(enumerate(jobs))
        outcomes: List[Optional[Outcome]] = [None] * len(jobs)
        running: Dict[int, Tuple[int, Any, float]] = {}  # worker index -> (job index, job, start time)
        try:
            while queue or running:
                for index in range(self.count):
                    if queue and index not in running:
                        if not self._workers[index].process.is_alive():
                            self._workers[index] = self._fork(index)
                        position, job = queue.popleft()
                        self._workers[index].connection.send(job)
                        running[index] = (position, job, time.monotonic())
                busy = [self._workers[index] for index in running]
                wait([w.connection for w in busy] + [w.process.sentinel for w in busy])
                for worker in busy:
                    position, job, started = running[worker.index]
                    outcome = self._collect(worker, job, started)
                    if outcome is not None:
                        del running[worker.index]
                        outcomes[position] = outcome
                        done(outcome)
        except BaseException:
            self.close()
            raise
        return outcomes  # type: ignore[return-value]

    def _collect(self, worker: _Worker, job: Any, started: float) -> Optional[Outcome]:
        """The worker's outcome if it has one (its result, or its death), else None."""
        seconds = time.monotonic() - started
        if worker.connection.poll():
            try:
                kind, value = worker.connection.recv()
            except EOFError:  # it died as it wrote
                kind, value = "died", None
            if kind == "raised":
                raise JobRaised(value)
            if kind == "returned":
                return Outcome(job, worker.index, seconds, value=value)
        elif worker.process.is_alive():
            return None
        worker.process.join()
        return Outcome(job, worker.index, seconds, died=_death(worker.process.exitcode))

    def close(self) -> None:
        """Stop every worker (SIGTERM: no interpreter teardown to wait for); any left after the grace period is killed."""
        for worker in self._workers.values():
            if worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in self._workers.values():
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.connection.close()
        self._workers.clear()
        if self._lifeline is not None:
            for end in self._lifeline:
                os.close(end)
            self._lifeline = None


def _death(exitcode: Optional[int]) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        why = " (the out-of-memory killer sends it; so does `kill -9`)" if name == "SIGKILL" else ""
        return f"the worker process running it was killed by {name}{why}"
    return f"the worker process running it exited with code {exitcode} before the job ended"


def _serve(connection: Connection, cpus: List[int], preload: Sequence[str], run: Callable[[Any], Any],
           lifeline: Tuple[int, int]) -> None:
    """A worker's life: pin, import, then run jobs until told to stop or the launching process is gone."""
    read, write = lifeline
    os.close(write)
    threading.Thread(target=_exit_with_launcher, args=(read,), daemon=True).start()
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a sweep in the background ignores Ctrl-C, its workers too
        signal.signal(signal.SIGINT, _leave_quietly)
    os.sched_setaffinity(0, cpus)
    for name in preload:
        importlib.import_module(name)
    while True:
        try:
            job = connection.recv()
        except EOFError:
            return
        try:
            reply = ("returned", run(job))
        except Exception:
            import traceback

            reply = ("raised", traceback.format_exc())
        connection.send(reply)


def _exit_with_launcher(read: int) -> None:
    """Block until the launching process is gone (end-of-file on the lifeline), then end this worker at once."""
    while os.read(read, 1):
        pass
    os._exit(1)


def _leave_quietly(signum, frame) -> None:
    """Ctrl-C: the launching process reports the interruption and stops the workers; this one just goes."""
    os._exit(128 + signum)
