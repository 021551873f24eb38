"""A data option's training and validation records: the user's files, or a seeded share held out of the training set.

Every reader of records (instructions, preference pairs, word problems) splits the same way,
so the same ``data.seed`` holds out the same records whatever reads them.
"""

from __future__ import annotations

import random
from typing import Callable, List, Sequence, Tuple, TypeVar

from llmexp.data.jsonl import PathLike
from llmexp.errors import UserError

T = TypeVar("T")


def split_validation(records: Sequence[T], data_cfg) -> Tuple[List[T], List[T]]:
    """Hold out ``data.validation_split`` of ``records``: the same ones for the same ``data.seed``.

    At least one record is held out when there are two or more and the share is above 0;
    both lists keep file order.
    """
    share = data_cfg.validation_split
    if not 0 <= share < 1:
        raise UserError(
            f"data.validation_split={share} is outside [0, 1). Give the share of training records "
            "to hold out for validation, e.g. data.validation_split=0.1 (0 for none)."
        )
    count = 0 if share == 0 or len(records) < 2 else min(len(records) - 1, max(1, round(share * len(records))))
    held = set(random.Random(f"{data_cfg.seed}/validation").sample(range(len(records)), count))
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


def read_train_and_validation(data_cfg, read_file: Callable[[PathLike], List[T]]) -> Tuple[List[T], List[T]]:
    """``data.path`` read with ``read_file``; validation from ``data.validation_path`` or ``split_validation``."""
    train = _read_nonempty(data_cfg.path, read_file)
    if data_cfg.validation_path:
        return train, _read_nonempty(data_cfg.validation_path, read_file)
    return split_validation(train, data_cfg)


def _read_nonempty(path: str, read_file: Callable[[PathLike], List[T]]) -> List[T]:
    records = read_file(path)
    if not records:
        raise UserError(f"{path} holds no records. Give a JSONL file with one record per line.")
    return records
