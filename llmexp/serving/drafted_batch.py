"""The engine's running rows when a draft model speculates: each row with KV caches of its own.

Rows accept different numbers of proposals per round, so after one round their sequences
differ in length by up to ``k``; one batched cache kept across rounds would need holes in the
middle of its rows and would grow by ``k + 1`` positions a round whatever was accepted. Each row
therefore keeps its own target and draft caches (``llmexp.serving.speculative.DraftedSequence``),
which a round stacks and cuts back (``llmexp.serving.batched_speculation``). Prompts are
prefilled together: ``merge`` cuts the batched, left-padded prefill cache into one unpadded
cache per row. The interface is the
one ``llmexp.serving.running_batch.RunningBatch`` gives the engine (``rows``, ``merge``,
``keep_unfinished``, ``clear``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch

from llmexp.serving.running_batch import Row
from llmexp.serving.speculative import DraftedSequence, new_cache


@dataclass
class DraftedBatch:
    """The running rows and, beside each, its ``DraftedSequence``."""

    target: object  # the target model (its config shapes each row's cache)
    draft: object
    rows: List[Row] = field(default_factory=list)
    sequences: List[DraftedSequence] = field(default_factory=list)

    def merge(self, rows: List[Row], cache, mask: torch.Tensor) -> None:
        """Add prefilled rows: row ``i`` of the left-padded ``cache`` without its padding, and an empty draft cache
        (the draft reads the prompt and the first token at the row's first round)."""
        lengths = mask.sum(-1).tolist()
        width = mask.shape[1]
        for i, row in enumerate(rows):
            if row.finish_reason is not None:
                continue
            own = new_cache(self.target)
            start = width - int(lengths[i])
            for index, layer in enumerate(cache.layers):
                own.update(layer.keys[i:i + 1, :, start:], layer.values[i:i + 1, :, start:], index)
            self.rows.append(row)
            self.sequences.append(DraftedSequence(own, new_cache(self.draft), row.next_token,
                                                  [*row.prompt_ids, row.next_token]))

    def keep_unfinished(self) -> None:
        kept = [(row, sequence) for row, sequence in zip(self.rows, self.sequences) if row.finish_reason is None]
        self.rows = [row for row, _ in kept]
        self.sequences = [sequence for _, sequence in kept]

    def clear(self) -> None:
        self.rows, self.sequences = [], []
