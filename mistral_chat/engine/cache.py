"""A static, rotating key/value cache.

Every layer keeps `capacity` slots. Position p lives in slot p % capacity, so with a sliding window the buffer
wraps around and memory stays bounded by the window (plus one prefill chunk), not by the conversation length.
`slot_positions` records which absolute position each slot holds (-1: empty); the attention mask is built from it,
so attending over the whole buffer equals full attention restricted to the window, before and after a wrap.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


def cache_capacity(max_positions: int, sliding_window: int | None, prefill_chunk: int) -> tuple[int, bool]:
    """Slots per layer and whether they wrap: all `max_positions`, or window + one prefill chunk - 1 when a
    sliding window makes that smaller."""
    if sliding_window is not None and sliding_window + prefill_chunk - 1 < max_positions:
        return sliding_window + prefill_chunk - 1, True
    return max_positions, False


def max_chunk(capacity: int, sliding_window: int | None, wraps: bool) -> int:
    """The most tokens one forward pass may write without overwriting keys its own queries still need."""
    if not wraps or sliding_window is None:
        return capacity
    return capacity - sliding_window + 1


def allowed_keys(key_pos: torch.Tensor, query_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys (at positions key_pos, -1: an empty slot) each query (at query_pos) may attend to, broadcast:
    earlier or the same position, within `window` (None: no window)."""
    allowed = (key_pos >= 0) & (key_pos <= query_pos)
    if window is not None:
        allowed &= query_pos - key_pos < window
    return allowed


class LayerKVCache(nn.Module):
    """The keys and values of one layer: [batch, kv_heads, capacity, head_dim]."""

    def __init__(self, batch: int, n_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v ([batch, kv_heads, T, head_dim]) into `slots` and return the whole buffers."""
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v

    def update_rows(self, rows: slice, slots: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v ([N, kv_heads, T, head_dim]) of the batch rows `rows` (N of them) into each row's own slots
        ([N, T]); return those rows' buffers (views, no copy)."""
        keys, values = self.k[rows], self.v[rows]
        row = torch.arange(slots.shape[0], device=slots.device)[:, None]
        keys[row, :, slots] = k.transpose(1, 2)  # advanced indices first: [N, T, kv_heads, head_dim]
        values[row, :, slots] = v.transpose(1, 2)
        return keys, values


class SlotPositions(nn.Module):
    """Which absolute position each cache slot holds, shared by all layers; builds the attention mask.

    `sliding_window` is the longest window of any layer (None if one attends to everything): it decides what
    the buffer must keep. Layers with shorter windows (Ministral) ask `mask` for their own.
    """

    def __init__(self, capacity: int, sliding_window: int | None, device: torch.device, wraps: bool = False) -> None:
        super().__init__()
        self.capacity = capacity
        self.sliding_window = sliding_window
        self.wraps = wraps  # positions may run past the capacity (only with a sliding window)
        self.register_buffer("positions", torch.full((capacity,), -1, dtype=torch.long, device=device),
                             persistent=False)

    @property
    def max_chunk(self) -> int:
        """The most tokens one forward pass may write without overwriting keys its own queries still need."""
        return max_chunk(self.capacity, self.sliding_window, self.wraps)

    def record(self, positions: torch.Tensor) -> torch.Tensor:
        """Store `positions` ([T]) in their slots; return the slots."""
        slots = positions % self.capacity
        self.positions.index_copy_(0, slots, positions)
        return slots

    def mask(self, positions: torch.Tensor, window: int | None | Literal["cache"] = "cache") -> torch.Tensor:
        """Boolean [T, capacity]: query at positions[t] may attend to the key in slot s.

        `window`: a layer's own sliding window (None: no window); by default the cache's `sliding_window`.
        """
        if window == "cache":
            window = self.sliding_window
        return allowed_keys(self.positions[None, :], positions[:, None], window)

    def reset(self) -> None:
        self.positions.fill_(-1)

    def can_rewind(self, position: int) -> bool:
        """Whether the keys a query at `position` needs (the window before it) are all still in the buffer."""
        first = 0 if self.sliding_window is None else max(0, position - self.sliding_window + 1)
        if position - first > self.capacity:
            return False
        needed = torch.arange(first, position, device=self.positions.device)
        return bool((self.positions[needed % self.capacity] == needed).all())

    def rewind(self, position: int) -> None:
        """Forget every position >= `position` (the next forward pass writes from there)."""
        self.positions.masked_fill_(self.positions >= position, -1)


class RowPositions(nn.Module):
    """Which absolute position each cache slot holds, for each row of a batch on its own: [batch, capacity].

    `SlotPositions` for sequences that do not move together (continuous batching, engine/batch.py): each row has
    its own length, takes a new sequence when its last one ends (`reset`), and builds its own attention mask.
    Slot rules are `SlotPositions`'s: position p of a row lives in its slot p % capacity.
    """

    def __init__(self, batch: int, capacity: int, sliding_window: int | None, device: torch.device,
                 wraps: bool = False) -> None:
        super().__init__()
        self.batch = batch
        self.capacity = capacity
        self.sliding_window = sliding_window
        self.wraps = wraps
        self.register_buffer("positions", torch.full((batch, capacity), -1, dtype=torch.long, device=device),
                             persistent=False)

    @property
    def max_chunk(self) -> int:
        """The most tokens one forward pass may write into a row (see SlotPositions.max_chunk)."""
        return max_chunk(self.capacity, self.sliding_window, self.wraps)

    def record(self, positions: torch.Tensor, rows: slice) -> torch.Tensor:
        """Store `positions` ([N, T], one line per row of `rows`) in their slots; return the slots ([N, T])."""
        slots = positions % self.capacity
        self.positions[rows].scatter_(1, slots, positions)
        return slots

    def mask(self, positions: torch.Tensor, rows: slice, window: int | None | Literal["cache"] = "cache"
             ) -> torch.Tensor:
        """Boolean [N, T, capacity]: in row n, the query at positions[n, t] may attend to the key in slot s."""
        if window == "cache":
            window = self.sliding_window
        return allowed_keys(self.positions[rows][:, None, :], positions[:, :, None], window)

    def reset(self, row: int | None = None) -> None:
        """Forget one row (None: all of them)."""
        if row is None:
            self.positions.fill_(-1)
        else:
            self.positions[row].fill_(-1)
