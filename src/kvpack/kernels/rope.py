"""RoPE for attention over pre-RoPE keys: cos/sin at every cached position, without a table per position.

The torch paths take cos/sin of the positions they read straight from the model's rotary module
(`RopeAt.full`, transient). The C++ kernels compose them from two small tables by angle addition: a
position p = (r << SHIFT) + j has cos/sin(p) = hi[r] (x) lo[j] (cos = hc lc - hs ls, sin = hs lc + hc ls),
with hi[r] = the module's cos/sin at r << SHIFT and lo[j] = its cos/sin at j divided by the module's
attention scaling (its cos at 0). The tables hold 2^SHIFT + max_position / 2^SHIFT rows of rot floats:
about 24 KiB at 2K tokens and 150 KiB at 32K for a head_dim of 64, where a table per position held 256
bytes per token. The composition equals the module's values up to float rounding of the angles (checked
on sample positions whenever the tables grow; a rotary module whose angles do not add up, or whose
halves differ, i.e. not rotate_half-symmetric, gets no kernel tables and the torch path is used).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SHIFT = 6  # lo table: positions 0..63


@dataclass
class RopeSlice:
    """cos/sin of consecutive tokens held as one tensor: cs [batch, tokens, 2, width], width = rot/2 (half) or rot
    (full). What the per-run Triton kernels read; `RopeAt.materialize()` builds one."""

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
        """(cos, sin) [batch, tokens, rot/2] views (row stride 2 * rot/2)."""
        if not self.half:
            raise ValueError("this RoPE table is not rotate_half-symmetric; kernels cannot use it")
        return self.cs[..., 0, :], self.cs[..., 1, :]


@dataclass
class SplitTables:
    """hi [rows, rot] and lo [2^shift, rot] (cos in the first rot/2 channels, sin in the last), fp32."""

    hi: torch.Tensor
    lo: torch.Tensor
    shift: int
    rot: int

    def compose(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [..., rot/2] at positions [...] (int, >= 0), as the kernels compute them."""
        half = self.rot // 2
        p = positions.long()
        h, l = self.hi[p >> self.shift], self.lo[p & ((1 << self.shift) - 1)]
        hc, hs, lc, ls = h[..., :half], h[..., half:], l[..., :half], l[..., half:]
        return hc * lc - hs * ls, hs * lc + hc * ls


class RopeAt:
    """cos/sin at the logged positions of slots start..end-1 of one layer: positions [batch, tokens] int32."""

    def __init__(self, table: "RopeTable", layer_idx: int, start: int, end: int):
        self.table, self.layer_idx, self.start, self.end = table, layer_idx, start, end

    @property
    def positions(self) -> torch.Tensor:
        return self.table.log.positions[:, self.start:self.end]

    def __getitem__(self, index: slice) -> "RopeAt":
        start, stop, step = index.indices(self.end - self.start)
        if step != 1:
            raise ValueError("RoPE slices are contiguous")
        return RopeAt(self.table, self.layer_idx, self.start + start, self.start + stop)

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [batch, tokens, rot] float32 from the rotary module (transient)."""
        log = self.table.log
        cos, sin = log.source.compute(self.layer_idx, self.positions, log.dtype)
        batch = self.positions.shape[0]
        return cos.float().expand(batch, -1, -1), sin.float().expand(batch, -1, -1)

    def materialize(self) -> RopeSlice:
        """This range as one RopeSlice (halves kept when rotate_half-symmetric)."""
        cos, sin = self.full()
        half = cos.shape[-1] // 2
        symmetric = torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])
        width = half if symmetric else cos.shape[-1]
        return RopeSlice(torch.stack([cos[..., :width], sin[..., :width]], 2).contiguous(), cos.shape[-1], symmetric)

    def halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.materialize().halves()

    def kernel_tables(self) -> SplitTables | None:
        """The split tables covering these positions, or None (no kernel: see the module docstring)."""
        return self.table.split(self.layer_idx, self.positions)


class RopeTable:
    """Split cos/sin tables of a pre-RoPE cache's logged positions (a cache.positions.PositionLog), per rotary
    kind (layers sharing RoPE share them), grown as larger positions are logged and rebuilt when the rotary
    module's frequencies change (dynamic scaling)."""

    def __init__(self, log):
        self.log = log
        self._tables: dict = {}

    def get(self, layer_idx: int, start: int, end: int) -> RopeAt:
        """cos/sin of slots start..end-1."""
        return RopeAt(self, layer_idx, start, end)

    def nbytes(self) -> int:
        """Bytes of every table held."""
        return sum(t["tables"].hi.nbytes + t["tables"].lo.nbytes for t in self._tables.values() if t.get("tables"))

    def split(self, layer_idx: int, positions: torch.Tensor) -> SplitTables | None:
        """Tables whose hi rows cover every position in `positions`, or None (negative positions, angles that do not
        add up, halves that differ)."""
        if positions.numel() == 0:
            return None
        # the logged positions' range, once per forward (the log clears its memo whenever positions change)
        span = ("range", positions.data_ptr(), tuple(positions.shape))
        if span not in self.log.memo:
            self.log.memo[span] = int(positions.min()), int(positions.max())
        low, high = self.log.memo[span]
        if low < 0:
            return None
        source = self.log.source
        key = source.key(layer_idx)
        freq = getattr(source.module, "inv_freq", None)
        freq_ptr = None if freq is None else freq.data_ptr()
        entry = self._tables.get(key)
        if entry is None or entry["freq_ptr"] != freq_ptr:
            entry = self._tables[key] = {"freq_ptr": freq_ptr, "tables": None, "ok": True}
            lo = self._rows(layer_idx, torch.arange(1 << SHIFT))
            if lo is not None:
                scaling = lo[0, 0]
                entry["lo"] = lo / scaling if float(scaling) != 0 else None
            if lo is None or entry["lo"] is None:
                entry["ok"] = False
        if not entry["ok"]:
            return None
        rows = (high >> SHIFT) + 1
        tables = entry["tables"]
        if tables is None or tables.hi.shape[0] < rows:
            have = 0 if tables is None else tables.hi.shape[0]
            grow = max(rows, have + have // 4 + 8)
            new = self._rows(layer_idx, torch.arange(have, grow) << SHIFT)
            if new is None:
                entry["ok"] = False
                return None
            hi = new if tables is None else torch.cat([tables.hi, new])
            tables = SplitTables(hi.contiguous(), entry["lo"], SHIFT, hi.shape[1])
            if not self._adds_up(layer_idx, tables, have << SHIFT, grow << SHIFT):
                entry["ok"] = False
                return None
            entry["tables"] = tables
        return tables

    def _rows(self, layer_idx: int, positions: torch.Tensor) -> torch.Tensor | None:
        """[n, rot] cos | sin (one half each) at positions [n], or None when the halves differ."""
        # float32 whatever the model's dtype: the kernels compute in float32 (a bf16 model's cos/sin are these, rounded)
        cos, sin = self.log.source.compute(layer_idx, positions.unsqueeze(0).to(self._device()), torch.float32)
        cos, sin = cos[0].float(), sin[0].float()
        half = cos.shape[-1] // 2
        if not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
            return None
        return torch.cat([cos[:, :half], sin[:, :half]], 1)

    def _adds_up(self, layer_idx: int, tables: SplitTables, start: int, stop: int) -> bool:
        """The composed cos/sin equal the module's at sample positions in start..stop-1, within float rounding of
        the angles (the module rounds position x frequency in float32)."""
        sample = torch.unique(torch.linspace(start, stop - 1, 9).long() + torch.tensor([0, 1, 3, 7, 13, 29, 37, 51, 63]))
        sample = sample[sample < stop]
        want = self._rows(layer_idx, sample)
        if want is None:
            return False
        cos, sin = tables.compose(sample)
        got = torch.cat([cos, sin], 1)
        scaling = float(tables.hi[0, 0])
        freq = getattr(self.log.source.module, "inv_freq", None)
        fmax = float(freq.abs().max()) if freq is not None else 1.0
        tol = abs(scaling) * (1e-5 + 4 * 2.0 ** -23 * float(sample.max()) * fmax)
        return bool(((got - want).abs() <= tol).all())

    def _device(self) -> torch.device:
        positions = self.log.positions
        return positions.device if positions is not None else torch.device("cpu")
