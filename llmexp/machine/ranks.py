"""This process's place in its job: its rank among the job's processes, and on its node.

``llmexp.training.distributed`` sets it when it starts or joins a job's ranks; every layer reads it (rank 0
alone prints, downloads and writes), so it sits below them all.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass
class Ranks:
    """This process's place in the job: its rank among ``world_size``, and on its node."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    store: Any = None  # the job's rendezvous store: rank 0's messages, and each process group's rendezvous
    backend: str = "gloo"
    device: Any = None  # the GPU of this rank (None on CPU)
    messages: Iterator[int] = field(default_factory=itertools.count)  # every rank numbers them alike
    groups: Iterator[int] = field(default_factory=itertools.count)




current = Ranks(0, 1, 0, 1)  # a process on its own until a job's ranks start


def rank() -> int:
    return current.rank


def world_size() -> int:
    return current.world_size


def local_world_size() -> int:
    return current.local_world_size


def is_rank_zero() -> bool:
    return current.rank == 0
