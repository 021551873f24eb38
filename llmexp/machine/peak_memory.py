"""The peak memory a block of work used, in MB (2**20 bytes), on a GPU or on the CPU.

Both count what the work allocated above what was held at entry. On CUDA it is
``torch.cuda.max_memory_allocated`` (reset at entry) less the memory allocated at entry. On
the CPU it is the kernel's own high-water mark of the resident set (``VmHWM`` in
``/proc/self/status``), reset at entry by writing ``5`` to ``/proc/self/clear_refs`` (Linux
4.0 and later), less the resident set at entry. The kernel sees every page touched, however
briefly: a thread sampling ``/proc/self/statm`` misses short peaks when other processes hold
the cores (it once read a training step's peak 40 % low that way). At entry glibc's
``malloc_trim`` hands the memory that earlier work freed back to the system, or a later stage
would reuse it unseen and report almost nothing. Where the mark cannot be reset (no ``/proc``,
an older kernel) ``ru_maxrss`` is the fallback: the high-water mark of the whole process's
lifetime, so a second stage in the same process reports only what it adds above the first's
peak. torch is imported only on the CUDA path: the CPU path runs without it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from typing import Optional

MB = 2**20
STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"
RESET_PEAK_RSS = "5"  # clear_refs' code for "reset VmHWM to the current RSS" (proc(5))


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.mb``; device is a torch device or its type name.

    Blocks do not nest on the CPU: an inner block's reset would hide the outer block's peak before it."""

    def __init__(self, device="cpu"):
        self.cuda = str(getattr(device, "type", device)).startswith("cuda")
        self.mb: Optional[float] = None
        self._base = 0
        self._kernel_mark = False

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        _release_freed_memory()
        self._kernel_mark = _reset_peak_rss()
        self._base = _status_bytes("VmRSS") if self._kernel_mark else _max_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_bytes("VmHWM") if self._kernel_mark else _max_rss_bytes()
        self.mb = round(max(0, peak - self._base) / MB, 1)


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark to the current resident set; False where it cannot."""
    try:
        with open(CLEAR_REFS, "w") as handle:
            handle.write(RESET_PEAK_RSS)
        return _status_bytes("VmHWM") is not None
    except OSError:
        return False


def _status_bytes(field: str) -> Optional[int]:
    """``field`` of /proc/self/status (given there in kB) in bytes; None when absent."""
    with open(STATUS) as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None


def _release_freed_memory() -> None:
    """glibc keeps freed heap pages resident for reuse; ``malloc_trim(0)`` returns them (no-op elsewhere)."""
    library = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(library), "malloc_trim", None) if library else None
    if trim is not None:
        trim(0)


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux
