"""The peak memory a block of work used, in MB (2**20 bytes), on a GPU or on the CPU.

Both count what the work allocated above what was held at entry. On CUDA it is
``torch.cuda.max_memory_allocated`` (reset at entry) less the memory allocated at entry. On
the CPU it is the highest resident set size seen above the one at entry, sampled by a
background thread from ``/proc/self/statm``; at entry glibc's ``malloc_trim`` hands the
memory that earlier work freed back to the system, or a later stage would reuse it unseen
and report almost nothing. ``ru_maxrss`` alone would not do: it is the high-water mark of the
whole process's lifetime, so a second training stage in the same process would report the
first stage's peak (or nothing above it). It is the fallback only where ``/proc`` is absent.
torch is imported only on the CUDA path: the CPU path runs without it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
import threading
from typing import Optional

MB = 2**20
SAMPLE_EVERY_S = 0.005
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.mb``; device is a torch device or its type name."""

    def __init__(self, device="cpu"):
        self.cuda = str(getattr(device, "type", device)).startswith("cuda")
        self.mb: Optional[float] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._statm: Optional[int] = None

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        _release_freed_memory()
        try:
            self._statm = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._base = _max_rss_bytes()
            return self
        self._base = self._peak = self._resident()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            peak = torch.cuda.max_memory_allocated()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._resident())
            os.close(self._statm)
        else:
            peak = _max_rss_bytes()
        self.mb = round(max(0, peak - self._base) / MB, 1)

    def _resident(self) -> int:
        # statm: size resident shared text lib data dt, in pages
        return int(os.pread(self._statm, 128, 0).split()[1]) * PAGE_BYTES

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self._peak = max(self._peak, self._resident())


def _release_freed_memory() -> None:
    """glibc keeps freed heap pages resident for reuse; ``malloc_trim(0)`` returns them (no-op elsewhere)."""
    library = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(library), "malloc_trim", None) if library else None
    if trim is not None:
        trim(0)


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux
