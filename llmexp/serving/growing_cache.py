"""A KV cache layer that grows in place, for the running batch: each decoding step writes its one position.

transformers' ``DynamicLayer`` appends a step's keys and values with ``torch.cat``, copying the
whole cache of every layer at every step: on the tiny model on a CPU that copy took a tenth of a
batched decoding step at 16 rows of ~100 positions, and it grows with the context.
``GrowingLayer`` keeps its keys and values as views of buffers with free positions after them, so
a step writes its position in place and only a full buffer is copied (into one half as long
again). Rows that leave the batch are removed by moving rows from the end into their slots
inside the buffers (``keep_rows``); rows that join are stacked into new buffers once (``stacked``).

The buffers are inference tensors, written in ``torch.inference_mode`` whoever calls: a serving
cache is never differentiated. Whoever replaces ``keys`` and ``values`` (``crop``,
``batch_select_indices``, another owner) gets ``DynamicLayer``'s behaviour unchanged: the next
``update`` copies them into new buffers.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from transformers.cache_utils import DynamicLayer

MIN_ROOM = 64  # free positions a new buffer keeps at least: a buffer is not copied again for that many steps


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys`` and ``values`` are ``[rows, heads, start:end]`` views of larger buffers."""

    def __init__(self) -> None:
        super().__init__()
        self._buffers: Tuple[torch.Tensor, torch.Tensor] = ()  # [rows, heads, capacity, head_dim] each
        self._views: Tuple[torch.Tensor, ...] = ()  # what keys and values were set to here
        self._rows = self._start = self._end = 0

    @classmethod
    def stacked(cls, parts: Sequence[Tuple[torch.Tensor, torch.Tensor]], width: int) -> "GrowingLayer":
        """The rows of each ``(keys, values)`` part in turn, right-aligned to ``width`` positions, with room after.

        Positions left of a shorter part are zeros: the attention mask hides them, and a hidden
        position must still hold finite numbers (its weight 0 times NaN would be NaN).
        """
        layer = cls()
        keys, values = parts[0]
        layer.lazy_initialization(keys, values)
        rows = sum(part[0].shape[0] for part in parts)
        with torch.inference_mode():
            layer._buffers = tuple(_buffer(t, rows, width + _room(width)) for t in (keys, values))
            row = 0
            for part in parts:
                count, length = part[0].shape[0], part[0].shape[-2]
                for buffer, tensor in zip(layer._buffers, part):
                    buffer[row:row + count, :, :width - length].zero_()
                    buffer[row:row + count, :, width - length:width] = tensor
                row += count
        layer._show(rows, 0, width)
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new positions after the cached ones (a new buffer only when the room is used up)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        added = key_states.shape[-2]
        with torch.inference_mode():
            if not self._holds_views() or self._end + added > self._buffers[0].shape[-2]:
                self._rebuffer(key_states, value_states)
            end = self._end + added
            for buffer, states in zip(self._buffers, (key_states, value_states)):
                buffer[:self._rows, :, self._end:end] = states
        self._show(self._rows, self._start, end)
        return self.keys, self.values

    def keep_rows(self, order: List[int], start: int) -> None:
        """Only the rows ``order``, in that order, from position ``start`` on, moved inside the buffers.

        Row ``order[i]`` is ``i`` or one beyond ``len(order)``: no row is overwritten before it moves.
        """
        if not self._holds_views():
            index = torch.tensor(order, device=self.keys.device)
            self.keys, self.values = self.keys[index, :, start:], self.values[index, :, start:]
            return
        first = self._start + start
        with torch.inference_mode():
            for to, source in enumerate(order):
                if to != source:
                    for buffer in self._buffers:
                        buffer[to, :, first:self._end] = buffer[source, :, first:self._end]
        self._show(len(order), first, self._end)

    def _holds_views(self) -> bool:
        return bool(self._views) and self.keys is self._views[0] and self.values is self._views[1]

    def _rebuffer(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """New buffers holding the current keys and values, with room for these states and more."""
        cached = self.get_seq_length()
        rows = key_states.shape[0]
        length = cached + key_states.shape[-2]
        buffers = tuple(_buffer(t, rows, length + _room(length)) for t in (key_states, value_states))
        if cached:
            for buffer, tensor in zip(buffers, (self.keys, self.values)):
                buffer[:, :, :cached] = tensor
        self._buffers = buffers
        self._rows, self._start, self._end = rows, 0, cached

    def _show(self, rows: int, start: int, end: int) -> None:
        self._rows, self._start, self._end = rows, start, end
        self.keys, self.values = (buffer[:rows, :, start:end] for buffer in self._buffers)
        self._views = (self.keys, self.values)


def _room(length: int) -> int:
    """Free positions after ``length``: half as many again, so copies stay rare however long the sequence."""
    return max(MIN_ROOM, length // 2)


def _buffer(like: torch.Tensor, rows: int, capacity: int) -> torch.Tensor:
    return like.new_empty(rows, like.shape[1], capacity, like.shape[-1])
