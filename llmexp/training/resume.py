"""Resumable training: a checkpoint every N optimiser steps, and the newest valid one picked up again.

A stage's checkpoints live in ``<stage_dir>/checkpoints/step-00000200.ckpt``. Each is Lightning's
own checkpoint (model, optimiser, scheduler, loop state) plus an ``llmexp`` entry: the RNG states
(python, numpy, torch CPU, CUDA), the data position in micro-batches, the run's config fingerprint
and the loop's running figures. Files are written atomically (temporary file in the same
directory, fsync, ``os.replace``), so a kill leaves the previous checkpoint or the new one,
never a part; the newest ``keep`` are kept. A file that still cannot be read (a truncated copy,
a full disk) is skipped with a warning and the one before it is used.

On several ranks rank 0 writes, prunes and picks the checkpoint to resume from; the other
ranks read the one it picked (a filesystem every rank sees, as a cluster's shared one).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from lightning.pytorch.plugins import TorchCheckpointIO

from llmexp.display import console

from llmexp.training import distributed
from llmexp.atomic import replace_atomically

STATE_KEY = "llmexp"
FILE_NAME = "step-{:08d}.ckpt"
FILE_PATTERN = re.compile(r"^step-(\d{8})\.ckpt$")
REQUIRED_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "global_step", STATE_KEY)


@dataclass
class ResumePoint:
    """The checkpoint a stage resumes from, already read (and checked) once."""

    path: Path
    step: int
    checkpoint: Dict[str, Any]

    @property
    def state(self) -> Dict[str, Any]:
        return self.checkpoint[STATE_KEY]


class Checkpoints:
    """One stage's checkpoints: when to save, where, how many to keep, which one to resume."""

    def __init__(self, directory: Path, every: int, keep: int, fingerprint: str):
        self.directory = Path(directory)
        self.every, self.keep, self.fingerprint = every, keep, fingerprint

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def files(self) -> List[Tuple[int, Path]]:
        """(step, path) of every checkpoint file here, oldest first."""
        if not self.directory.is_dir():
            return []
        found = ((FILE_PATTERN.match(p.name), p) for p in self.directory.iterdir())
        return sorted((int(m.group(1)), p) for m, p in found if m)

    def save(self, trainer, step: int) -> None:
        """Write the checkpoint of ``step`` through ``trainer`` (its ``AtomicCheckpointIO``), then prune.

        Every rank calls it (gathering the training state may be collective); rank 0 writes.
        """
        lead = distributed.is_rank_zero()
        if lead:
            self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / FILE_NAME.format(step)
        trainer.save_checkpoint(path, weights_only=False)  # the whole training state
        if lead:
            for _, old in self.files()[: -self.keep]:
                old.unlink(missing_ok=True)

    def resume_point(self) -> Optional[ResumePoint]:
        """The newest checkpoint that loads, has every part and belongs to this config; None to start afresh.

        Rank 0 chooses; the other ranks read the file it chose.
        """
        chosen = self._choose() if distributed.is_rank_zero() else None
        path = distributed.decided_by_rank_zero(lambda: chosen.path if chosen else None)
        if chosen is not None or path is None:
            return chosen
        problem, checkpoint = self._read(path)
        if problem is not None:
            raise RuntimeError(f"rank {distributed.rank()} cannot read checkpoint {path}, which rank 0 read: {problem}")
        return ResumePoint(path, int(checkpoint["global_step"]), checkpoint)

    def _choose(self) -> Optional[ResumePoint]:
        """Rank 0's choice. Files that do not qualify are named in a warning and removed, as are temporary files a
        killed write left: the run now continues from the point chosen and rewrites what follows.
        """
        for temp in self.directory.glob(".*.tmp") if self.directory.is_dir() else ():
            temp.unlink(missing_ok=True)
        chosen, rejected = None, []
        for _, path in reversed(self.files()):
            problem, checkpoint = self._read(path)
            if problem is None:
                chosen = ResumePoint(path, int(checkpoint["global_step"]), checkpoint)
                break
            console.warn(f"checkpoint {path} cannot be resumed ({problem}); it is removed, an earlier one used if any.")
            rejected.append(path)
        for path in rejected:
            path.unlink(missing_ok=True)
        return chosen

    def _read(self, path: Path) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # any failure to read it (truncated zip, bad pickle, I/O) means "not this one"
            first_sentence = " ".join(str(error).split()).split(". ")[0][:160]
            return f"it does not load: {type(error).__name__}: {first_sentence}", None
        missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
        if missing:
            return f"it lacks {', '.join(missing)}", None
        if checkpoint[STATE_KEY].get("fingerprint") != self.fingerprint:
            return "it was written by a run with a different configuration", None
        return None, checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic; it also hands back a checkpoint read earlier.

    ``Checkpoints.resume_point`` has already read the file it chose, so ``preload`` lets
    Lightning's restore use that copy instead of reading a possibly large file twice.
    """

    def __init__(self):
        self._preloaded: Optional[ResumePoint] = None

    def preload(self, point: ResumePoint) -> None:
        self._preloaded = point

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        replace_atomically(Path(path), lambda handle: torch.save(checkpoint, handle), binary=True)

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        point, self._preloaded = self._preloaded, None
        if point is not None and Path(path) == point.path:
            return point.checkpoint
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def resume_state(fingerprint: str, micro_batches: int, stats: Dict[str, Any]) -> Dict[str, Any]:
    """The ``llmexp`` entry of a checkpoint: everything Lightning does not save itself.

    ``micro_batches`` is the data position: how many micro-batches the saved step consumed,
    counted from the step (never from batches yielded: Lightning prefetches one ahead).
    """
    return {"fingerprint": fingerprint, "micro_batches": micro_batches, "rng": rng_state(), "stats": stats}


def rng_state() -> Dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA) generator states, in types ``torch.load(weights_only=True)`` reads."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, key.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def truncate_log(path: Path, step: int) -> None:
    """Keep the rows of a JSON-lines log up to ``step``, so a resumed run appends where the checkpoint was.

    Reading stops at the first line that does not parse (the torn last line of a killed write).
    """
    if not path.exists():
        return
    kept = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except ValueError:
                break
            if row.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    replace_atomically(path, lambda handle: handle.write("".join(kept)))

