"""Packing documents into fixed-length training blocks, the usual way for causal LM training.

torch is imported when blocks are made: the plan checks read the data modules without it.
"""

from __future__ import annotations

from typing import Iterable, List


def pack_documents(documents: Iterable[List[int]], seq_len: int, num_blocks: int):
    """Concatenate token lists into ``num_blocks`` rows of ``seq_len`` tokens (a LongTensor).

    Documents run across block boundaries (no padding, every token trains); a too-short
    stream is an error rather than silently fewer steps.
    """
    import torch

    needed = seq_len * num_blocks
    stream: List[int] = []
    for tokens in documents:
        stream.extend(tokens)
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise ValueError(f"{len(stream)} tokens cannot fill {num_blocks} blocks of {seq_len}")
    return torch.tensor(stream[:needed], dtype=torch.long).view(num_blocks, seq_len)
