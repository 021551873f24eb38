"""The token-level plumbing every scoring call shares: the model's context, padding, batches, EOS ids.

Rows are ``(input ids, target ids)``: the ids the input's last ``len(targets)`` positions
must predict. Batches are padded on the right for scoring and on the left for generation.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

# Input token ids, and the ids the input's last len(targets) positions must predict.
Row = Tuple[List[int], List[int]]


def max_length(model, tokenizer) -> int:
    """The longest input the model takes: its position limit, else the tokenizer's, else 2048."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not limit:
        limit = getattr(tokenizer, "model_max_length", None)
        limit = limit if limit and limit < 10**9 else 2048
    return int(limit)


def padded_batches(rows: Sequence[Row], batch_size: int, pad: int, right: bool):
    """``(start, input_ids, attention_mask)`` per batch of rows' inputs, padded on the right (scoring) or left (generation)."""
    for start in range(0, len(rows), batch_size):
        batch = [ids for ids, _ in rows[start : start + batch_size]]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            span = slice(0, len(ids)) if right else slice(width - len(ids), width)
            input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, span] = 1
        yield start, input_ids, attention_mask


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def eos_ids(model, tokenizer) -> set:
    """EOS ids from the tokenizer and the model's generation config (Llama 3 lists several)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return {int(i) for i in ids if i is not None}


def device_of(model) -> torch.device:
    return next(model.parameters()).device
