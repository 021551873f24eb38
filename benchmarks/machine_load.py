"""How much CPU *other* processes take while a benchmark runs (Linux ``/proc/stat``).

The load average counts the benchmark itself, so on a 2-core machine it cannot say whether
someone else was busy. This meter takes the CPU time every process used (``/proc/stat``,
steal time included: cycles the hypervisor gave elsewhere) minus this process's and its
children's, over the wall time between ``start()`` and ``cores()``.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Optional


def _busy_seconds() -> Optional[float]:
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class OtherLoad:
    """``start()``, then ``cores()``: the average number of cores others kept busy meanwhile (None off Linux)."""

    def start(self) -> "OtherLoad":
        self.wall, self.busy, self.own = time.perf_counter(), _busy_seconds(), _own_seconds()
        return self

    def cores(self) -> Optional[float]:
        busy = _busy_seconds()
        if busy is None or self.busy is None:
            return None
        others = (busy - self.busy) - (_own_seconds() - self.own)
        return max(0.0, others / (time.perf_counter() - self.wall))


def sample(seconds: float = 1.0) -> Optional[float]:
    """Cores other processes use right now, measured over ``seconds`` of sleeping."""
    meter = OtherLoad().start()
    time.sleep(seconds)
    return meter.cores()


def describe(cores: Optional[float]) -> str:
    return "n/a" if cores is None else f"{cores:.2f}"
