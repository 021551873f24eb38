"""Preference pairs for DPO: a prompt with a chosen and a rejected response.

Each side is encoded like an SFT example (``encode_example``), so the log-probabilities DPO
compares cover the response tokens only, and both sides share one padded length per batch
so they can run through the model as one batch.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Dict, List, Sequence, Tuple

from llmexp.data.embedded import build_world
from llmexp.data.instructions import encode_example, pad_batch
from llmexp.data.splits import read_train_and_validation, split_validation
from llmexp.data.jsonl import PathLike, read_jsonl_numbered
from llmexp.data.records import Example, PreferencePair
from llmexp.data.text2sql import text2sql_preference_pairs
from llmexp.errors import UserError

FIELDS = ("prompt", "chosen", "rejected")
SIDES = ("chosen", "rejected")


def read_preference_file(path: PathLike) -> List[PreferencePair]:
    """The pairs in a JSONL file of ``{"prompt", "chosen", "rejected"}`` and an optional numeric ``"margin"``, in
    file order.

    A line without those text fields, or whose sides are the same text, raises ``UserError``
    naming ``file:line``.
    """
    pairs = []
    for line, record in read_jsonl_numbered(path):
        if not all(isinstance(record.get(field), str) for field in FIELDS):
            raise UserError(
                f"{path}:{line}: has fields {sorted(record)}; a preference pair needs text fields "
                '"prompt", "chosen" and "rejected".'
            )
        margin = record.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                                   or not math.isfinite(margin)):
            raise UserError(f"{path}:{line}: margin is {margin!r}; give it as a number (the reward gap the chosen "
                            "response must clear) or leave the field out.")
        pair = PreferencePair(*(record[field] for field in FIELDS), margin=margin)
        if pair.chosen.strip() == pair.rejected.strip():
            raise UserError(
                f"{path}:{line}: chosen and rejected are the same text; a pair must differ to teach a "
                "preference. Fix or delete that line."
            )
        pairs.append(pair)
    return pairs


def preference_data(data_cfg) -> Tuple[List[PreferencePair], List[PreferencePair]]:
    """(train, validation) pairs for the ``data`` option of a DPO run."""
    if data_cfg.name == "preference" and data_cfg.path:
        return read_train_and_validation(data_cfg, read_preference_file)
    if data_cfg.name in ("embedded", "preference"):
        return split_validation(text2sql_preference_pairs(build_world(data_cfg.seed, data_cfg.num_people)), data_cfg)
    raise UserError(
        f"data={data_cfg.name} holds no preference pairs. For DPO use data=embedded (built-in Text2SQL "
        "pairs) or data=preference data.path=<pairs.jsonl> with prompt, chosen and rejected fields."
    )


def encode_pair(pair: PreferencePair, tokenizer, max_len: int) -> Dict[str, List[int]]:
    """``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels`` (see ``encode_example``)."""
    encoded = {}
    for side in SIDES:
        ids, labels = encode_example(Example(pair.prompt, getattr(pair, side)), tokenizer, max_len)
        encoded[f"{side}_input_ids"], encoded[f"{side}_labels"] = ids, labels
    return encoded


def pair_collate(pad_id: int) -> Callable[[Sequence[Dict[str, List[int]]]], Dict[str, Any]]:
    """A DataLoader ``collate_fn`` padding both sides of a batch to one common length."""
    return partial(_pad_pairs, pad_id=pad_id)


def _pad_pairs(pairs: Sequence[Dict[str, List[int]]], pad_id: int) -> Dict[str, Any]:
    length = max(len(pair[f"{side}_input_ids"]) for pair in pairs for side in SIDES)
    batch = {}
    for side in SIDES:
        rows = [(pair[f"{side}_input_ids"], pair[f"{side}_labels"]) for pair in pairs]
        batch.update({f"{side}_{key}": value for key, value in pad_batch(rows, pad_id, length).items()})
    return batch
