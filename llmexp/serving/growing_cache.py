"""A KV cache layer that grows in place, for the running batch: each decoding step writes its one position.

transformers' ``DynamicLayer`` appends a step's keys and values with ``torch.cat``, copying the
whole cache of every layer at every step: on the tiny model on a CPU that copy took a tenth of a
batched decoding step at 16 rows of ~100 positions, and it grows with the context.
``GrowingLayer`` keeps its keys and values as views of buffers with free positions after them, so
a step writes its position in place and only a full buffer is copied (into one half as long
again). Rows that leave the batch are removed by moving rows from the end into their slots
inside the buffers (``keep_rows``); rows that join take free rows the buffers keep
(``add_rows``; new buffers only when those are used up). A new buffer has room for half as
many rows and positions again as it starts with (at least ``MIN_ROW_ROOM`` and ``MIN_ROOM``).

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
MIN_ROW_ROOM = 4  # free rows a new buffer keeps at least, for rows that join


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys`` and ``values`` are ``[:rows, :, start:end]`` views of larger buffers.

    Every position of the views holds a finite number: positions that are padding for a row are
    hidden by the attention mask, but a hidden position's weight 0 times NaN would still be NaN,
    and a new buffer's free space is not initialised.
    """

    def __init__(self) -> None:
        super().__init__()
        self._buffers: Tuple[torch.Tensor, ...] = ()  # keys and values: [row capacity, heads, capacity, head_dim]
        self._views: Tuple[torch.Tensor, ...] = ()  # what keys and values were set to here
        self._rows = self._start = self._end = 0

    @classmethod
    def stacked(cls, parts: Sequence[Tuple[torch.Tensor, torch.Tensor]], width: int) -> "GrowingLayer":
        """The rows of each ``(keys, values)`` part in turn, right-aligned to ``width`` positions, zeros before."""
        layer = cls()
        layer.lazy_initialization(*parts[0])
        layer._stack(parts, width)
        return layer

    def add_rows(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
        """Append rows, right-aligned like the others to ``width`` positions (at least the current width), zeros before:
        in the buffers' room when it holds them, the current rows widened to the left with zeros."""
        rows, first = self._rows + keys.shape[0], self._end - width
        if not self._holds_views() or rows > self._buffers[0].shape[0] or first < 0:
            self._stack([(self.keys, self.values), (keys, values)], width)
            return
        with torch.inference_mode():
            for buffer, tensor in zip(self._buffers, (keys, values)):
                buffer[:self._rows, :, first:self._start].zero_()
                _put_right_aligned(buffer[self._rows:rows, :, first:self._end], tensor)
        self._show(rows, first, self._end)

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

    def _stack(self, parts: Sequence[Tuple[torch.Tensor, torch.Tensor]], width: int) -> None:
        rows = sum(part[0].shape[0] for part in parts)
        with torch.inference_mode():
            buffers = tuple(_buffer(t, rows + _row_room(rows), width + _room(width)) for t in parts[0])
            row = 0
            for part in parts:
                count = part[0].shape[0]
                for buffer, tensor in zip(buffers, part):
                    _put_right_aligned(buffer[row:row + count, :, :width], tensor)
                row += count
        self._buffers = buffers
        self._show(rows, 0, width)

    def _rebuffer(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """New buffers holding the current keys and values, with room for these states and more."""
        cached = self.get_seq_length()
        rows = key_states.shape[0]
        length = cached + key_states.shape[-2]
        buffers = tuple(_buffer(t, rows + _row_room(rows), length + _room(length)) for t in (key_states, value_states))
        if cached:
            for buffer, tensor in zip(buffers, (self.keys, self.values)):
                buffer[:rows, :, :cached] = tensor
        self._buffers = buffers
        self._rows, self._start, self._end = rows, 0, cached

    def _show(self, rows: int, start: int, end: int) -> None:
        self._rows, self._start, self._end = rows, start, end
        self.keys, self.values = (buffer[:rows, :, start:end] for buffer in self._buffers)
        self._views = (self.keys, self.values)


def _room(length: int) -> int:
    """Free positions after ``length``: half as many again, so copies stay rare however long the sequence."""
    return max(MIN_ROOM, length // 2)


def _row_room(rows: int) -> int:
    """Free rows after ``rows``: rows that join while others finish fill them without a new buffer."""
    return max(MIN_ROW_ROOM, rows // 2)


def _put_right_aligned(target: torch.Tensor, tensor: torch.Tensor) -> None:
    """``tensor`` into the last positions of ``target`` (same rows), zeros before it."""
    length = tensor.shape[-2]
    target[:, :, :target.shape[-2] - length].zero_()
    target[:, :, target.shape[-2] - length:] = tensor


def _buffer(like: torch.Tensor, rows: int, capacity: int) -> torch.Tensor:
    return like.new_empty(rows, like.shape[1], capacity, like.shape[-1])
