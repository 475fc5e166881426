"""The positions of every token a cache has seen, logged once for all layers, and cos/sin at them.

transformers hands the cache post-RoPE keys and, through kvpack's hooks, each step's position ids. A
pre-RoPE cache keeps those positions ([batch, tokens] int32; left padding and custom position ids work)
to rotate stored keys forward again when attention reads them. `version` changes whenever logged
positions change other than by appending, so derived tables (kernels.rope.RopeTable) know to rebuild.
"""
from __future__ import annotations

import torch

from kvpack.hf.rope import RopeSource


class PositionLog:
    """Positions of logged tokens and the rotary source that turns them into cos/sin."""

    def __init__(self, source: RopeSource):
        self.source = source
        self._buffer: torch.Tensor | None = None  # [batch, capacity] int32
        self._length = 0
        self.version = 0
        self.dtype = torch.float32  # the dtype of the cos/sin the model uses
        self.memo: dict = {}  # cos/sin of the current forward, per (rotary kind, start, end)

    @property
    def positions(self) -> torch.Tensor | None:
        """Positions of every logged token, [batch, tokens] int32."""
        return None if self._buffer is None else self._buffer[:, : self._length]

    def __len__(self) -> int:
        return self._length

    def append(self, slot: int, positions: torch.Tensor) -> None:
        """Record positions [batch, q] of tokens slot..slot+q-1 (a second layer logging the same slots is a no-op)."""
        q = positions.shape[-1]
        if slot + q <= self._length:
            return
        if slot != self._length:
            raise RuntimeError(f"position log has {self._length} tokens; cannot append at {slot}")
        pos = positions.to(torch.int32)
        if self._buffer is None:
            self._buffer = torch.empty(pos.shape[0], max(q, 64), dtype=torch.int32, device=pos.device)
        if slot + q > self._buffer.shape[1]:
            grow = max(slot + q, self._buffer.shape[1] + self._buffer.shape[1] // 8 + 64)
            bigger = torch.empty(self._buffer.shape[0], grow, dtype=torch.int32, device=pos.device)
            bigger[:, :slot] = self._buffer[:, :slot]
            self._buffer = bigger
        self._buffer[:, slot:slot + q] = pos
        self._length = slot + q
        self.memo.clear()

    def rope(self, layer_idx: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [batch, end-start, rot] at the logged positions of tokens start..end-1 (shared by layers)."""
        key = (self.source.key(layer_idx), start, end)
        if key not in self.memo:
            self.memo[key] = self.source.compute(layer_idx, self._buffer[:, start:end], self.dtype)
        return self.memo[key]

    def truncate(self, tokens: int) -> None:
        """Keep the first `tokens` logged positions."""
        if tokens < self._length:
            self._length = tokens
            self._changed()

    def map_batch(self, fn) -> None:
        """Apply fn (acting on dim 0 = batch) to the logged positions (beam reorder, batch select or repeat)."""
        if self._buffer is not None:
            self._buffer = fn(self._buffer[:, : self._length].contiguous())
            self._length = self._buffer.shape[1]
        self._changed()

    def reset(self) -> None:
        self._buffer, self._length = None, 0
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        self.memo.clear()
