"""How torch's CPU threads wait and how many there are: chosen for a machine other processes share.

libgomp (torch's OpenMP) lets a thread that reaches the end of a parallel region spin for
~300,000 iterations before it sleeps. On a quiet machine that saves a wake-up; beside another
busy process it burns the core the thread it waits for needs. The default run, sharing 2 cores
with another process, took 44 minutes instead of 5 at 4x the CPU time. Passive waiting keeps
that cost near what the shared cores allow (``benchmarks/bench_shared_cores.py`` measures both).

The thread count is the job's share of the cores this process may use (affinity, and a
container's CPU quota, through joblib's ``cpu_count``), divided among the ranks a node runs.
A user's ``OMP_WAIT_POLICY``/``GOMP_SPINCOUNT`` or ``OMP_NUM_THREADS`` wins; joblib's workers
(``hydra/launcher=joblib``) arrive with ``OMP_NUM_THREADS`` set to cores / workers.
"""

from __future__ import annotations

import os
import sys

WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def prefer_passive_waiting() -> None:
    """Make OpenMP threads sleep, not spin, between parallel regions, unless the user chose how they wait.

    libgomp reads the setting when torch loads it, so it only works before torch is imported;
    processes started from this one (ranks, Slurm jobs, joblib workers) inherit it.
    """
    if "torch" not in sys.modules and not any(name in os.environ for name in WAIT_SETTINGS):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def usable_cores() -> int:
    """The cores this process may run on: the fewest of the machine's, its affinity and its cgroup's CPU quota."""
    from joblib import cpu_count

    return cpu_count()


def use_share_of_cores(sharers: int = 1) -> int:
    """Give torch ``usable_cores() // sharers`` threads (at least 1), unless ``OMP_NUM_THREADS`` is set; the count used.

    ``sharers`` is the number of processes of this job on the node (its ranks): more threads
    than cores makes every thread wait for a descheduled one (gloo collectives ~10x slower).
    """
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, usable_cores() // sharers))
    return torch.get_num_threads()


def settings() -> dict:
    """What a run records of them (results.json ``environment.cpu_threads``): cores, torch's threads, how they wait."""
    torch = sys.modules.get("torch")
    return {
        "usable_cores": usable_cores(),
        "threads": torch.get_num_threads() if torch is not None else None,
        **{name.lower(): os.environ.get(name) for name in (*WAIT_SETTINGS, "OMP_NUM_THREADS")},
    }
