"""Checkpoint, then requeue, when a cluster says a job must stop: at a training step boundary.

A launcher that can requeue its job (the Slurm launcher, through submitit) hands ``install``
the signal the cluster sends before a preemption or the time limit, and its requeue handler.
While a training loop runs (inside ``training_steps``) the signal only sets a flag: the loop
finishes the optimiser step it is in, writes its resumable checkpoint and calls
``requeue_now``. Outside a training loop the handler requeues at once; the requeued job runs
the same command in the same run directory, where the runner keeps the stages already
completed (``llmexp.running.runner``) and training resumes from its newest checkpoint (``llmexp.training.resume``).

Written here rather than taken from Lightning's own SLURM signal handling because that one
saves inside the signal handler, mid-step, and requeues with ``scontrol`` itself; submitit
already owns requeueing (and its count of timeouts) for llmexp's jobs.
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, NoReturn, Optional

Handler = Callable[[int, object], object]

_requeue: Optional[Handler] = None  # the launcher's handler: checkpoint the job's callable, requeue, exit
_signum: Optional[int] = None  # the signal that asked for the stop, once it came
_training_loops = 0  # training loops running now (nested stages count once each)


def install(signum: int, requeue: Handler) -> None:
    """Route ``signum`` through this module; ``requeue(signum, frame)`` requeues the job (and may exit)."""
    global _requeue
    _requeue = requeue
    signal.signal(signum, _on_signal)


def _on_signal(signum: int, frame) -> None:
    global _signum
    _signum = signum
    if _training_loops == 0:
        requeue_now()


@contextmanager
def training_steps() -> Iterator[None]:
    """While inside, a stop signal waits for the loop's next step boundary (``requested``)."""
    global _training_loops
    _training_loops += 1
    try:
        yield
    finally:
        _training_loops -= 1


def requested() -> bool:
    """Whether a stop signal came: the training loop checkpoints and calls ``requeue_now``."""
    return _signum is not None


def requeue_now() -> NoReturn:
    """Hand over to the launcher's requeue; every rank exits (submitit exits rank 0 only)."""
    if _requeue is None or _signum is None:
        raise RuntimeError("requeue_now() is for a job whose launcher installed a handler and got its signal")
    _requeue(_signum, None)
    sys.exit(-1)
