"""Fixed per-token slots: the bytes one token of one layer occupies in a kvpack vLLM page, and their codec.

A slot is `key part | value part`, each a `SlotPart`:
- "raw": the vectors in the model's dtype (the lossless `fp16` method), H * D * itemsize bytes;
- "nuq": a `NuqCodec`'s codes as one little-endian bitstream over the H * D channels at their widths (one width,
  or the recipe's per-channel widths), then fp16 (zero, scale) per token and span when the codec's ranges are
  per token (values), then a FIXED number of outlier slots: fp16 value + channel index (1 byte when H * D < 256,
  else 2), unused slots hold the index H * D. Per-channel ranges and codebooks are per-layer state, kept once
  outside the pages (they live in the recipe's codec).

Values have exactly 2k outliers per token (k per side of the range, `codecs.nuq.outliers_per_side`), so their
slots always suffice. Keys' outliers are elements beyond the calibrated per-channel range, a count that varies
per token: the slot keeps the `key_outlier_slots` elements with the largest clamping error and stores the others
clamped to the range (the only difference from `NuqCodec.encode`, counted by `SlotPart.encode`'s `overflow`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from kvpack.codecs.nuq import NuqCodec, outliers_per_side
from kvpack.integrations.vllm import fastdecode

@dataclass
class SlotPart:
    """Keys or values of one layer in a token slot; `nbytes` is the part's size in bytes."""

    kind: str  # "raw" | "nuq"
    heads: int
    head_dim: int
    dtype: torch.dtype  # raw parts: the stored dtype
    codec: NuqCodec | None = None
    widths: torch.Tensor | None = None  # [H * D] bit width per channel (nuq)
    scale_pairs: int = 0  # fp16 (zero, scale) pairs per token (nuq, per-token ranges)
    outlier_slots: int = 0
    index_bytes: int = 1
    _byte: torch.Tensor = field(init=False, repr=False, default=None)  # [H * D] first byte of each code
    _shift: torch.Tensor = field(init=False, repr=False, default=None)  # [H * D] bit offset within it
    _mask: torch.Tensor = field(init=False, repr=False, default=None)  # [H * D] 2**width - 1

    def __post_init__(self) -> None:
        if self.kind == "nuq":
            w = self.widths.to(torch.int64)
            if int(w.max()) > 8:
                raise ValueError("slot codes are at most 8 bits wide")
            start = torch.cumsum(w, 0) - w
            self._byte, self._shift = start // 8, (start % 8).to(torch.int32)
            self._mask = ((1 << w) - 1).to(torch.int32)

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim

    @property
    def code_bytes(self) -> int:
        return (int(self.widths.sum()) + 7) // 8 if self.kind == "nuq" else 0

    @property
    def nbytes(self) -> int:
        if self.kind == "raw":
            return self.channels * self.dtype.itemsize
        return self.code_bytes + 4 * self.scale_pairs + self.outlier_slots * (2 + self.index_bytes)

    # ----- bitstream -----
    # Channel c's code sits at bit offset o_c of the token's little-endian bitstream; with widths <= 8 it spans
    # at most two bytes, so packing adds (code << o_c % 8) into bytes o_c // 8 and o_c // 8 + 1 (no overlaps),
    # and unpacking reads those two bytes back: O(tokens x channels), no per-bit work.
    def _pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [T, H * D] (int) -> uint8 [T, code_bytes]."""
        shifted = codes.to(torch.int32) << self._shift
        out = torch.zeros(codes.shape[0], self.code_bytes + 1, dtype=torch.int32, device=codes.device)
        out.index_add_(1, self._byte, shifted & 0xFF)
        out.index_add_(1, self._byte + 1, shifted >> 8)
        return out[:, : self.code_bytes].to(torch.uint8)

    def _unpack_codes(self, packed: torch.Tensor) -> torch.Tensor:
        """uint8 [T, code_bytes] -> int64 codes [T, H * D]."""
        p = torch.nn.functional.pad(packed, (0, 1)).to(torch.int32)
        pairs = p[:, self._byte] | (p[:, self._byte + 1] << 8)
        return ((pairs >> self._shift) & self._mask).to(torch.int64)

    # ----- slot codec -----
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """x [T, H, D] -> (uint8 [T, nbytes], outliers that did not fit their slots and were clamped)."""
        if self.kind == "raw":
            return x.to(self.dtype).contiguous().view(torch.uint8).reshape(x.shape[0], -1), 0
        T = x.shape[0]
        xh = x.float().transpose(0, 1)  # [H, T, D] as the codec takes it
        u, mask, zero, scale = self.codec.normalize(xh)
        codes = self.codec.quantize_normalized(u).transpose(0, 1).reshape(T, self.channels)
        parts = [self._pack_codes(codes)]
        if self.scale_pairs:
            z = zero.expand(-1, T, -1).transpose(0, 1).reshape(T, -1)[:, : self.scale_pairs]
            sc = scale.expand(-1, T, -1).transpose(0, 1).reshape(T, -1)[:, : self.scale_pairs]
            parts.append(torch.cat([z, sc], 1).to(torch.float16).view(torch.uint8))
        overflow = 0
        if self.outlier_slots:
            flat = x.float().reshape(T, self.channels)
            if mask is None:
                mask = torch.zeros_like(xh, dtype=torch.bool)
            m = mask.transpose(0, 1).reshape(T, self.channels)
            clamp_err = (u.abs() - 1).clamp(min=0) * scale.abs()  # what clamping an outlier would cost
            err = clamp_err.transpose(0, 1).reshape(T, self.channels).where(m, -1.0)
            k = min(self.outlier_slots, self.channels)
            top, idx = err.topk(k, dim=1)
            used = top >= 0
            overflow = int(m.sum()) - int(used.sum())
            vals = flat.gather(1, idx).where(used, 0.0).to(torch.float16)
            index = idx.where(used, self.channels)
            if k < self.outlier_slots:  # more slots than channels: pad with unused slots
                vals = torch.nn.functional.pad(vals, (0, self.outlier_slots - k))
                index = torch.nn.functional.pad(index, (0, self.outlier_slots - k), value=self.channels)
            index = index.to(torch.int16 if self.index_bytes == 2 else torch.uint8)
            parts += [vals.view(torch.uint8), index.contiguous().view(torch.uint8).reshape(T, -1)]
        return torch.cat(parts, 1), overflow

    def decode(self, slot: torch.Tensor) -> torch.Tensor:
        """uint8 [T, nbytes] -> float32 [T, H, D]."""
        T = slot.shape[0]
        if self.kind == "raw":
            return slot.contiguous().view(self.dtype).reshape(T, self.heads, self.head_dim).float()
        at = self.code_bytes
        zero = scale = None
        if self.scale_pairs:
            pairs = slot[:, at: at + 4 * self.scale_pairs].contiguous().view(torch.float16).float()
            zero, scale = pairs[:, : self.scale_pairs].contiguous(), pairs[:, self.scale_pairs:].contiguous()  # [T, P]
        if fastdecode.available() and slot.device.type == "cpu":
            x = self._decode_compiled(slot, zero, scale)
        else:
            x = self._decode_torch(slot, zero, scale)
        at += 4 * self.scale_pairs
        if self.outlier_slots:
            n = self.outlier_slots
            vals = slot[:, at: at + 2 * n].contiguous().view(torch.float16).float()
            at += 2 * n
            raw = slot[:, at: at + self.index_bytes * n].contiguous()
            index = (raw.view(torch.int16) if self.index_bytes == 2 else raw).to(torch.int64)
            x = torch.cat([x, x.new_zeros(T, 1)], 1).scatter_(1, index, vals)[:, : self.channels]
        return x.reshape(T, self.heads, self.head_dim)

    def _decode_torch(self, slot: torch.Tensor, zero: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
        """Codes and ranges -> float32 [T, H * D] with torch (the reference for `_decode_compiled`)."""
        T = slot.shape[0]
        codes = self._unpack_codes(slot[:, : self.code_bytes]).view(T, self.heads, self.head_dim).transpose(0, 1)
        x = self.codec.dequantize_normalized(codes)  # [H, T, D]
        if zero is None:
            zero, scale = self.codec.zero, self.codec.scale
        else:
            zero, scale = zero.transpose(0, 1).unsqueeze(-1), scale.transpose(0, 1).unsqueeze(-1)  # [P, T, 1]
        return (x * scale + zero).transpose(0, 1).reshape(T, self.channels)

    def _decode_compiled(self, slot: torch.Tensor, zero: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
        t = self._tables()
        out = np.empty((slot.shape[0], self.channels), dtype=np.float32)
        if zero is None:
            zero = scale = torch.empty(slot.shape[0], 0)
        fastdecode.decode_codes(slot.numpy(), self.code_bytes, t["byte"], t["shift"], t["mask"], t["level_base"],
                                t["levels"], t["chan_zero"], t["chan_scale"], zero.numpy(), scale.numpy(),
                                t["pair_div"], out)
        return torch.from_numpy(out)

    def _tables(self) -> dict:
        """Per-channel lookup tables of the compiled decoder, built once."""
        if self.__dict__.get("_fast") is None:
            levels = self.codec.decode_levels.float()
            groups = levels.shape[0]
            c = torch.arange(self.channels)
            group = c * 0 if groups == 1 else (c // self.head_dim if groups == self.heads else c)
            per_channel = self.codec.axis == "channel"
            self.__dict__["_fast"] = {
                "byte": self._byte.numpy().astype(np.int64), "shift": self._shift.numpy(), "mask": self._mask.numpy(),
                "level_base": (group * levels.shape[1]).numpy().astype(np.int64),
                "levels": levels.flatten().contiguous().numpy(),
                "chan_zero": (self.codec.zero.flatten().float().numpy() if per_channel else np.zeros(0, np.float32)),
                "chan_scale": (self.codec.scale.flatten().float().numpy() if per_channel else np.zeros(0, np.float32)),
                "pair_div": self.head_dim if self.scale_pairs == self.heads else self.channels,
            }
        return self.__dict__["_fast"]


def nuq_part(codec: NuqCodec, key_outlier_slots: int | None) -> SlotPart:
    """The slot part of a NuqCodec (keys: per-channel ranges; values: per-token ranges)."""
    heads, dim = codec.heads, codec.head_dim
    n = heads * dim
    widths = codec.channel_bits if codec.channel_bits is not None else torch.full((n,), codec.bits)
    if codec.axis == "channel":
        pairs = 0
        if codec.outlier_frac <= 0:
            slots = 0
        elif key_outlier_slots is not None:
            slots = key_outlier_slots
        else:
            slots = max(1, round(2 * codec.outlier_frac * n))
    else:
        pairs = 1 if codec.span == "all" else heads
        per_vector = dim if codec.span == "head" else n
        if codec.outlier_frac <= 0:
            slots = 0
        elif codec.outlier_scope == "matrix":
            slots = max(1, round(2 * codec.outlier_frac * n))
        else:
            slots = 2 * outliers_per_side(codec.outlier_frac, per_vector) * (heads if codec.span == "head" else 1)
    return SlotPart("nuq", heads, dim, torch.float16, codec=codec, widths=widths.to(torch.int64).flatten(),
                    scale_pairs=pairs, outlier_slots=slots, index_bytes=1 if n < 256 else 2)


def raw_part(heads: int, head_dim: int, dtype: torch.dtype) -> SlotPart:
    return SlotPart("raw", heads, head_dim, dtype)


POOL_HEADER, POOL_ENTRY = 2, 4  # per-page key-outlier pool: uint16 count; fp16 value, uint8 offset, uint8 channel


@dataclass
class LayerSlots:
    """The slot of one layer: key part, value part, the per-block sink record (the first `sink_tokens`
    positions of a sequence kept exactly, post-RoPE keys and values in the model's dtype), and the per-block
    key-outlier pool of `key_pool` entries (0: key outliers in per-token slots; see `outlier_pool`)."""

    key: SlotPart
    value: SlotPart
    sink_tokens: int
    sink_dtype: torch.dtype
    key_pool: int = 0

    @property
    def pool_bytes(self) -> int:
        return POOL_HEADER + POOL_ENTRY * self.key_pool if self.key_pool else 0

    @property
    def slot_bytes(self) -> int:
        return self.key.nbytes + self.value.nbytes

    @property
    def sink_bytes(self) -> int:
        return self.sink_tokens * 2 * self.key.channels * self.sink_dtype.itemsize

    def block_bytes(self, block_size: int) -> int:
        """Bytes of one page of `block_size` tokens of this layer (slots, sink record, key-outlier pool)."""
        return block_size * self.slot_bytes + self.sink_bytes + self.pool_bytes


def per_token_bytes(layers: list[LayerSlots], block_size: int, align: int) -> int:
    """The page content C (bytes per token and layer) vLLM's planner is told: the mean over layers of a page's
    bytes per token, rounded up to `align` (the KV dtype's item size, so vLLM can view pages in that dtype)."""
    total = sum(layer.block_bytes(block_size) for layer in layers)
    per = math.ceil(total / (len(layers) * block_size))
    return -(-per // align) * align
