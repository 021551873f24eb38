"""The engine's running batch: its rows, their KV cache and left-padded attention mask, and how rows join and leave.

Rows are left-padded to a common length with a per-row attention mask, so each row sees
exactly the positions it would alone. New rows are prefilled with a cache of their own, which
is left-padded and stacked with the batch's (``merge``); finished rows are selected away,
with the leading columns that are padding in every row left (``keep_unfinished``). The cache
is transformers' ``DynamicCache`` with full-attention layers (``check_cache_layout``), its
layers ``llmexp.serving.growing_cache.GrowingLayer``s once merged: a decoding step writes its
position in place instead of copying the whole cache.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from llmexp.serving.generation import GenerationRequest, GenerationStream
from llmexp.serving.growing_cache import GrowingLayer
from llmexp.serving.streamed_text import StreamedText


@dataclass
class Row:
    """A request in the engine: waiting, then one row of the running batch."""

    request: GenerationRequest
    stream: GenerationStream
    prompt_ids: List[int]
    adapter: str
    max_tokens: int
    text: StreamedText
    generator: Optional[torch.Generator]
    submitted_at: float
    first_token_at: Optional[float] = None
    generated: int = 0
    next_token: int = -1  # sampled, not yet fed to the model
    finish_reason: Optional[str] = None


@dataclass
class RunningBatch:
    """The running batch: its rows, their KV cache and left-padded attention mask [rows, positions]."""

    rows: List[Row] = field(default_factory=list)
    cache: Any = None
    mask: Optional[torch.Tensor] = None

    def merge(self, rows: List[Row], cache, mask: torch.Tensor) -> None:
        """Append prefilled rows; the shorter of their cache and the batch's is left-padded to the longer."""
        if not self.rows:
            width = mask.shape[1]
            cache.layers = [GrowingLayer.stacked([(layer.keys, layer.values)], width) for layer in cache.layers]
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for layer, new in zip(self.cache.layers, cache.layers):
            layer.add_rows(new.keys, new.values, width)
        self.mask = torch.cat([_left_pad(self.mask, width, -1), _left_pad(mask, width, -1)])
        self.rows.extend(rows)

    def keep_unfinished(self) -> None:
        """Drop finished rows, and the leading positions that are padding in every row left.

        A finished row's slot is taken by a running row from the end of the batch, so only as
        many rows move in the cache as have finished.
        """
        keep = [i for i, row in enumerate(self.rows) if row.finish_reason is None]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        order = _holes_filled(keep)
        mask = self.mask[torch.tensor(order, device=self.mask.device)]
        start = int((mask.sum(0) > 0).nonzero()[0])  # first position some row still uses
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keep_rows(order, start)
        self.rows = [self.rows[i] for i in order]

    def cut_cache(self, width: int) -> None:
        """The cache back to its first ``width`` positions: undoes a decoding step that extended some layers, then failed."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]

    def clear(self) -> None:
        self.rows, self.cache, self.mask = [], None, None


def check_cache_layout(model) -> None:
    """Refuse a model whose KV cache has other layers than full attention (sliding windows, ...): they do not merge."""
    layers = DynamicCache(config=model.config).layers
    odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    if odd:
        raise ValueError(
            f"this engine batches full-attention KV caches only; the model's cache has {', '.join(sorted(odd))} layers"
        )


def cache_keyword(model) -> str:
    """The forward argument taking the KV cache: ``cache`` since transformers 5.24, ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _holes_filled(keep: List[int]) -> List[int]:
    """The rows ``keep`` (ascending) in slots ``0..len(keep)``: each kept slot in place, each freed one taken by a
    kept row from beyond them."""
    kept, movers = set(keep), iter(i for i in keep if i >= len(keep))
    return [i if i in kept else next(movers) for i in range(len(keep))]


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``tensor`` with zeros prepended along ``dim`` up to ``width`` (masked positions: their values are unseen)."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
