"""RoPE tables for attention over pre-RoPE keys: cos/sin of every cached position, compact.

The model's rotary module gives cos/sin [batch, tokens, rot]; in the rotate_half convention the two
halves are equal (channel i and i + rot/2 share an angle), so the table keeps one half:
cs [batch, slots, 2, rot/2] fp32 (cos row then sin row per token, 2 * rot * 2 bytes). Kernels read
those rows; the torch reference gets full-width tensors back. A table whose halves differ (a
variant that is not rotate_half-symmetric) is kept full width and flagged so kernels are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RopeSlice:
    """cos/sin of consecutive tokens: cs [batch, tokens, 2, width], width = rot/2 (half) or rot (full)."""

    cs: torch.Tensor
    rot: int
    half: bool

    def __getitem__(self, index: slice) -> "RopeSlice":
        return RopeSlice(self.cs[:, index], self.rot, self.half)

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [batch, tokens, rot] as the model's rotary module gives them."""
        cos, sin = self.cs[..., 0, :], self.cs[..., 1, :]
        if self.half:
            cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        return cos, sin

    def halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [batch, tokens, rot/2] views (row stride 2 * rot/2): what the kernels read."""
        if not self.half:
            raise ValueError("this RoPE table is not rotate_half-symmetric; kernels cannot use it")
        return self.cs[..., 0, :], self.cs[..., 1, :]


class RopeTable:
    """Compact cos/sin of every logged position of a pre-RoPE cache (a cache.positions.PositionLog), per rotary
    kind (layers sharing RoPE share it), extended as positions are logged; rebuilt when logged positions change
    other than by appending (crop, beam reorder: the log's `version`) or the rotary module's frequencies do
    (dynamic scaling). Values come from the model's rotary module, exactly as in the cache's decode path."""

    def __init__(self, log):
        self.log = log
        self._tables: dict = {}

    def _fresh(self, table: dict | None) -> dict | None:
        if table is None:
            return None
        freq = getattr(self.log.source.module, "inv_freq", None)
        if freq is not None and freq.data_ptr() != table["freq_ptr"]:
            return None
        return table if table["version"] == self.log.version else None

    def get(self, layer_idx: int, start: int, end: int) -> RopeSlice:
        """cos/sin of slots start..end-1."""
        key = self.log.source.key(layer_idx)
        table = self._fresh(self._tables.get(key))
        if table is None:
            freq = getattr(self.log.source.module, "inv_freq", None)
            table = {"filled": 0, "version": self.log.version, "cs": None, "half": True, "rot": 0,
                     "freq_ptr": None if freq is None else freq.data_ptr()}
            self._tables[key] = table
        if table["filled"] < end:
            self._extend(table, layer_idx, end)
        return RopeSlice(table["cs"][:, start:end], table["rot"], table["half"])

    def nbytes(self) -> int:
        """Bytes of every table held (capacity included)."""
        return sum(t["cs"].numel() * t["cs"].element_size() for t in self._tables.values() if t["cs"] is not None)

    def _extend(self, table: dict, layer_idx: int, end: int) -> None:
        log = self.log
        positions, filled = log.positions, table["filled"]
        cos, sin = log.source.compute(layer_idx, positions[:, filled:end], log.dtype)
        batch = positions.shape[0]
        cos, sin = cos.float().expand(batch, -1, -1), sin.float().expand(batch, -1, -1)
        rot = cos.shape[-1]
        half = rot // 2
        symmetric = torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])
        if table["cs"] is not None and table["half"] and not symmetric:  # start over, full width
            table.update(filled=0, cs=None)
            filled = 0
            cos, sin = log.source.compute(layer_idx, positions[:, :end], log.dtype)
            cos, sin = cos.float().expand(batch, -1, -1), sin.float().expand(batch, -1, -1)
        if table["cs"] is None:
            table["half"], table["rot"] = symmetric, rot
        width = half if table["half"] else rot
        if table["cs"] is None or table["cs"].shape[1] < end:
            capacity = max(end, filled + filled // 4 + 256)
            grown = torch.empty(batch, capacity, 2, width, device=cos.device)
            if filled:
                grown[:, :filled] = table["cs"][:, :filled]
            table["cs"] = grown
        table["cs"][:, filled:end, 0] = cos[..., :width]
        table["cs"][:, filled:end, 1] = sin[..., :width]
        table["filled"] = end
