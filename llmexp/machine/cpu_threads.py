"""How many threads torch runs on the CPU: the job's share of the cores, and no more than other processes leave free.

torch's OpenMP threads meet at the end of every parallel region, and libgomp lets a thread
that arrives first spin (~300,000 iterations) before it sleeps. On a quiet machine that saves a
wake-up per region; beside another busy process one of the threads waits for a core, and the
others spin on theirs meanwhile. The default run's training fell from 10.1k to 0.76k tokens/s
next to one busy core (2 cores): the run took 44 minutes instead of 5 at 4x the CPU time.
Waiting passively (``OMP_WAIT_POLICY=PASSIVE``) stops the spinning but costs 43% on a quiet
machine, since every region then ends in a sleep and a wake-up. What works both ways is fewer
threads when the cores are shared: one thread runs 6.4k tokens/s whether or not a core is busy
(``benchmarks/bench_shared_cores.py``).

So a job starts with its share of the cores this process may use (affinity and a container's
CPU quota, through joblib's ``cpu_count``, divided among the ranks a node runs), and while it
runs, ``FreeCores.check`` (called between training steps and evaluation batches) measures every
few seconds how much of this process's CPUs other processes used (``/proc/stat``) and gives
torch the cores they left, at least one. A user's ``OMP_NUM_THREADS`` wins over both; joblib's
workers (``hydra/launcher=joblib``) arrive with it set to cores / workers.

The thread count changes a float kernel's order of additions: a run that lost threads to
another process gives figures that differ in the last digits from a quiet run's. So a change
needs two checks in a row that agree (a short burst of another process changes nothing), and
the first one is said on the console, with the fix for a run that must match a quiet one to
the digit (``OMP_NUM_THREADS``: a fixed count, at the other process's mercy).

torch and joblib are imported inside the functions: every command imports this module, and
``llmexp plan`` never loads torch.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Dict, List, Optional

WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def prefer_passive_waiting() -> None:
    """Make OpenMP threads sleep, not spin, between parallel regions, unless the user chose how they wait.

    For a process whose other threads need the cores between torch's regions (a server's event
    loop). libgomp reads the setting when torch loads it, so it only works before torch is imported.
    """
    if "torch" not in sys.modules and not any(name in os.environ for name in WAIT_SETTINGS):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def usable_cores() -> int:
    """The cores this process may run on: the fewest of the machine's, its affinity and its cgroup's CPU quota."""
    from joblib import cpu_count

    return cpu_count()


def user_chose_threads() -> bool:
    return "OMP_NUM_THREADS" in os.environ


def use_share_of_cores(sharers: int = 1) -> int:
    """Give torch ``usable_cores() // sharers`` threads (at least 1), unless ``OMP_NUM_THREADS`` is set; the count used.

    ``sharers`` is the number of processes of this job on the node (its ranks): more threads
    than cores makes every thread wait for a descheduled one (gloo collectives ~10x slower).
    """
    import torch

    global _share
    if not user_chose_threads():
        torch.set_num_threads(max(1, usable_cores() // sharers))
    _share = torch.get_num_threads()
    return _share


_share: Optional[int] = None  # the job's share, set when it starts (use_share_of_cores)


def _cpu_seconds(cpus: List[int]) -> Optional[Dict[str, float]]:
    """Busy seconds of ``cpus`` since boot (``/proc/stat``: user, nice, system, irq, softirq, steal), or None off Linux."""
    busy = 0.0
    try:
        with open("/proc/stat") as stat:
            for line in stat:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    values = [int(x) for x in fields[:8]]
                    busy += sum(values) - values[3] - values[4]  # all but idle and iowait
    except (OSError, ValueError):
        return None
    return {"busy": busy / os.sysconf("SC_CLK_TCK"), "own": time.process_time(), "wall": time.monotonic()}


class FreeCores:
    """Keeps torch's thread count to the cores of this process's CPUs that other processes leave free.

    ``check()`` is cheap (one read of /proc/stat every ``every_s`` seconds): call it between
    steps of any loop. It counts the CPU time of the process's CPUs (its affinity) minus its own,
    so another process's load on them lowers the count, and their going quiet raises it again,
    never above the job's share (``use_share_of_cores``). Does nothing when ``OMP_NUM_THREADS``
    is set or off Linux. ``warn`` says the first lowering on the caller's console.
    """

    def __init__(self, name: str, warn: Callable[[str], None], every_s: float = 2.0):
        self.name, self.warn, self.every_s = name, warn, every_s
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.last = _cpu_seconds(self.cpus) if self.cpus and not user_chose_threads() else None
        self.lowest: Optional[int] = None  # the fewest threads it gave torch, for the record
        self._proposed: Optional[int] = None  # the previous check's count: a change needs two in a row
        self._told = False

    def check(self) -> None:
        if self.last is None or time.monotonic() - self.last["wall"] < self.every_s:
            return
        now = _cpu_seconds(self.cpus)
        if now is None:
            self.last = None
            return
        wall = now["wall"] - self.last["wall"]
        others = max(0.0, (now["busy"] - self.last["busy"]) - (now["own"] - self.last["own"])) / wall
        self.last = now
        import torch

        share = _share or usable_cores()
        wanted = max(1, min(share, round(len(self.cpus) - others)))
        proposed, self._proposed = self._proposed, wanted
        if wanted != torch.get_num_threads() and wanted == proposed:
            torch.set_num_threads(wanted)
            if wanted < share and not self._told:
                self._told = True
                self.warn(
                    f"{self.name}: other processes are using {others:.1f} of the {len(self.cpus)} cores this run may "
                    f"use, so torch runs on {wanted} thread(s) while they do, instead of spinning on cores it cannot "
                    f"have; its figures may differ in the last digits from a quiet run's (OMP_NUM_THREADS={share} "
                    "keeps the thread count fixed)."
                )
        threads = torch.get_num_threads()
        self.lowest = threads if self.lowest is None else min(self.lowest, threads)


def settings() -> dict:
    """What a run records of them (results.json ``environment.cpu_threads``): cores, torch's threads, how they wait."""
    torch = sys.modules.get("torch")
    return {
        "usable_cores": usable_cores(),
        "threads": torch.get_num_threads() if torch is not None else None,
        **{name.lower(): os.environ.get(name) for name in (*WAIT_SETTINGS, "OMP_NUM_THREADS")},
    }
