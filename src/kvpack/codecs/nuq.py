"""KVQuant's nuqN codec: learned non-uniform levels, per-channel or per-token ranges, dense-and-sparse.

Blocks are x [..., heads, tokens, head_dim]. Every vector is normalized to [-1, 1] by its range
(zero = (hi + lo) / 2, scale = (hi - lo) / 2, fp16) and each element becomes the index of the
nearest of 2**N levels (one codebook per layer, or one per KV head). Elements outside the range
are outliers, stored exactly in fp16 as a sparse matrix (`codecs.sparse`), one CSR row per token:
a streaming cache that appends one token at a time pays one small count per token, not one per
channel (the paper's per-channel CSC layout for keys would cost a count per channel per block).

- axis="channel" (keys): one range per (head, channel), fixed offline at calibration, so keys
  stream in without revisiting older tokens. The ranges are per-layer shared state.
- axis="token" (values): one range per token, computed online. With outliers, the `k` smallest
  and largest elements of each token vector (k = round(frac * n / 2), at least 1) are outliers
  and the range is that of the rest; `span="all"` takes one range over all KV heads of a token,
  `span="head"` one per head.
- outlier_scope="matrix": one outlier threshold pair per head fixed at calibration instead
  of per-vector ones (an ablation; the paper's per-vector rule is the default).
- Q-Norm: decoded levels are `levels * a + b` per codebook, (a, b) fitted offline so that the
  mean and standard deviation of dequantized calibration data match the originals.
"""
from __future__ import annotations

import math
import sys
from array import array

import torch

from kvpack.codecs import packing
from kvpack.codecs import sparse
from kvpack.codecs.base import (Codec, Encoded, StorageLayout, check_bits, packed_token_range, register_codec,
                                token_range)
from kvpack.codecs.kmeans import assign, assign_batched

AXES = ("channel", "token")
SPANS = ("head", "all")
SCOPES = ("vector", "matrix")


def _fp16(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else torch.as_tensor(t).to(torch.float16).float()


def _half(t: torch.Tensor | None) -> torch.Tensor | None:
    """t rounded to fp16 and kept in fp16: the codec's shared state is held at its stored precision."""
    return None if t is None else torch.as_tensor(t).to(torch.float16).contiguous()


MAX_COLUMNS = 32767  # channels per layer with per-channel widths: the C++ kernels list them as int16

PAD = 4.0  # codebook padding beyond the normalized range [-1, 1]: midpoints next to it exceed 1


def range_to_zero_scale(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero, scale) of ranges [lo, hi], rounded to fp16 as stored. A constant range gets the tiniest
    fp16 scale (2**-24), so it decodes to its stored zero whatever the levels are (a scale of 1 would
    add the nearest level's magnitude when 0 is not a level)."""
    zero, scale = _fp16((hi + lo) / 2), _fp16((hi - lo) / 2)
    return zero, torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))


def outliers_per_side(frac: float, n: int) -> int:
    """Outliers taken from each end of a vector of n elements for an outlier fraction `frac`."""
    if frac <= 0:
        return 0
    return min(max(1, round(frac * n / 2)), (n - 1) // 2)


@register_codec
class NuqCodec(Codec):
    """nuqN with optional dense-and-sparse outliers and Q-Norm; see the module docstring."""

    def __init__(
        self,
        levels: torch.Tensor,
        axis: str,
        heads: int,
        head_dim: int,
        outlier_frac: float = 0.0,
        zero: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        out_lo: torch.Tensor | None = None,
        out_hi: torch.Tensor | None = None,
        qnorm: torch.Tensor | None = None,
        span: str = "head",
        outlier_scope: str = "vector",
        channel_bits: torch.Tensor | None = None,
        name: str | None = None,
    ):
        levels = _fp16(levels)
        levels = levels.reshape(-1, levels.shape[-1])
        groups, n = levels.shape
        if groups not in (1, heads, heads * head_dim):
            raise ValueError(f"{groups} codebooks for {heads} KV heads of {head_dim} channels: use one per layer, head or channel")
        self.channel_bits = None
        if channel_bits is not None:
            bits = torch.as_tensor(channel_bits).to(torch.int64).reshape(heads * head_dim)
            if groups != heads * head_dim or not 0 <= int(bits.min()) <= int(bits.max()) <= 8 or n != 1 << int(bits.max()):
                raise ValueError("per-channel bit widths (0..8) need one codebook per channel of 2**max(bits) entries")
            if heads * head_dim > MAX_COLUMNS:
                raise ValueError(f"per-channel bit widths cover at most {MAX_COLUMNS} channels per layer (KV heads x "
                                 f"head_dim), got {heads} x {head_dim}: use one width per layer (kvquant-<N>bit-1pct)")
            self.channel_bits = bits.to(torch.uint8)
            unused = torch.arange(n) >= (1 << bits)[:, None]
            levels = levels.masked_fill(unused, PAD)  # entries past a channel's 2**b levels are never chosen
        elif n < 2 or n & (n - 1):
            raise ValueError(f"a codebook needs a power-of-two number of levels >= 2, got {n}")
        levels = levels.sort(-1).values
        if axis not in AXES or span not in SPANS or outlier_scope not in SCOPES:
            raise ValueError(f"axis must be in {AXES}, span in {SPANS}, outlier_scope in {SCOPES}")
        if not 0 <= outlier_frac < 0.5:
            raise ValueError(f"outlier fraction must be in [0, 0.5), got {outlier_frac}")
        levels = _half(levels)  # fp16 [groups, n], sorted; entries past a channel's width hold PAD
        if self.channel_bits is None:
            self.level_data = levels  # fp16 [groups, n]
        else:  # only each channel's 2**b levels, channel after channel: fp16 [sum of 2**b]
            used = torch.arange(n, device=levels.device) < (1 << self.channel_bits.long().to(levels.device))[:, None]
            self.level_data = levels[used].contiguous()
        self.bits = n.bit_length() - 1 if self.channel_bits is not None else check_bits(n.bit_length() - 1, 1, 8)
        self.axis, self.span, self.outlier_scope = sys.intern(axis), sys.intern(span), sys.intern(outlier_scope)
        self.heads, self.head_dim = heads, head_dim
        self.outlier_frac = float(outlier_frac)
        self.qnorm = None if qnorm is None else _half(qnorm).reshape(groups, 2)
        if axis == "channel":
            if zero is None or scale is None:
                raise ValueError("per-channel nuq needs offline zero/scale [heads, head_dim] (see `range_to_zero_scale`)")
            self.zero = _half(zero).reshape(heads, 1, head_dim)
            scale = _half(scale).reshape(heads, 1, head_dim)
            self.scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        if outlier_scope == "matrix" and outlier_frac > 0:
            if out_lo is None or out_hi is None:
                raise ValueError("per-matrix outliers need offline thresholds out_lo/out_hi [heads]")
            self.out_lo = _half(out_lo).reshape(heads, 1, 1)
            self.out_hi = _half(out_hi).reshape(heads, 1, 1)
        width = f"{self.mean_bits:g}" if self.channel_bits is not None else f"{self.bits}"
        self.name = sys.intern(name or f"nuq{width}-{axis}" + (f"-{outlier_frac * 100:g}pct" if outlier_frac else ""))

    @property
    def levels(self) -> torch.Tensor:
        """fp16 [groups, n], sorted: the codebooks, per-channel widths padded to 2**max(bits) with PAD (built when
        asked; the codec holds only each channel's 2**b levels, `level_data`)."""
        if self.channel_bits is None:
            return self.level_data
        n = 1 << self.bits
        width = (1 << self.channel_bits.long().to(self.level_data.device))[:, None]
        entry = torch.arange(n, device=self.level_data.device)
        first = torch.cumsum(width, 0) - width  # where each channel's levels start
        index = (first + entry).clamp(max=self.level_data.numel() - 1)
        return self.level_data[index].masked_fill(entry >= width, PAD)

    @property
    def decode_levels(self) -> torch.Tensor:
        """fp32 [groups, n]: the levels decoding uses (Q-Norm applied), computed when asked, not held."""
        levels = self.levels.float()
        return levels if self.qnorm is None else levels * self.qnorm[:, :1].float() + self.qnorm[:, 1:].float()

    @property
    def mean_bits(self) -> float:
        """Code bits per element: the bit width, or the mean of the per-channel widths."""
        return float(self.channel_bits.float().mean()) if self.channel_bits is not None else float(self.bits)

    # ----- state (recipes) -----
    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        config = {
            "axis": self.axis, "heads": self.heads, "head_dim": self.head_dim, "outlier_frac": self.outlier_frac,
            "span": self.span, "outlier_scope": self.outlier_scope, "name": self.name,
        }
        tensors = {"levels": self.levels.half()}
        if self.axis == "channel":
            tensors["zero"] = self.zero.reshape(self.heads, self.head_dim).half()
            tensors["scale"] = self.scale.reshape(self.heads, self.head_dim).half()
        if self.qnorm is not None:
            tensors["qnorm"] = self.qnorm.half()
        if self._matrix_outliers:
            tensors["out_lo"], tensors["out_hi"] = self.out_lo.flatten().half(), self.out_hi.flatten().half()
        if self.channel_bits is not None:
            tensors["channel_bits"] = self.channel_bits.reshape(self.heads, self.head_dim).to(torch.uint8)
        return config, tensors

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "NuqCodec":
        return cls(tensors["levels"], zero=tensors.get("zero"), scale=tensors.get("scale"), out_lo=tensors.get("out_lo"),
                   out_hi=tensors.get("out_hi"), qnorm=tensors.get("qnorm"), channel_bits=tensors.get("channel_bits"), **config)

    def config(self) -> dict:
        return self.state()[0]

    @property
    def _matrix_outliers(self) -> bool:
        return self.outlier_scope == "matrix" and self.outlier_frac > 0

    def shared_nbytes(self) -> int:
        """fp16 codebooks (only the 2**b used entries of each channel), Q-Norm pairs, per-channel ranges,
        per-matrix thresholds and per-channel bit widths (1 byte each) of this layer."""
        tensors = self.state()[1]
        return self.level_data.numel() * 2 + sum(t.numel() * t.element_size() for k, t in tensors.items() if k != "levels")

    # ----- normalization -----
    def _check(self, x: torch.Tensor) -> None:
        if x.dim() < 3 or x.shape[-3] != self.heads or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"nuq codec calibrated for [..., {self.heads} heads, tokens, {self.head_dim}] got {tuple(x.shape)}; "
                "use a recipe calibrated for this model"
            )

    def _token_range(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token (lo, hi) of x [..., H, T, D] ignoring `mask`ed elements: [..., H|1, T, 1]."""
        dims = (-3, -1) if self.span == "all" else (-1,)
        if mask is None:
            return x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
        inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
        lo, hi = x.where(~mask, inf).amin(dims, keepdim=True), x.where(~mask, -inf).amax(dims, keepdim=True)
        finite = torch.isfinite(lo) & torch.isfinite(hi)  # a vector made only of outliers
        return lo.where(finite, 0.0), hi.where(finite, 0.0)

    def _token_outliers(self, x: torch.Tensor) -> torch.Tensor:
        """Per-vector outlier mask of x [..., H, T, D]: the k smallest and k largest of each token vector."""
        v = x.movedim(-3, -2) if self.span == "all" else x  # [..., T, H, D] or [..., H, T, D]
        v = v.reshape(*v.shape[:-2], -1) if self.span == "all" else v
        n = v.shape[-1]
        k = outliers_per_side(self.outlier_frac, n)
        ordered = v.sort(-1).values
        lo, hi = ordered[..., k : k + 1], ordered[..., n - 1 - k : n - k]
        mask = sparse.outlier_mask(v, lo, hi)
        if self.span == "all":
            mask = mask.reshape(*mask.shape[:-1], self.heads, self.head_dim).movedim(-2, -3)
        return mask

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """x [..., H, T, D] -> (u, outlier mask or None, zero, scale); u = (x - zero) / scale, in [-1, 1] off the outliers."""
        self._check(x)
        x = x.float()
        mask = None
        if self._matrix_outliers:
            mask = sparse.outlier_mask(x, self.out_lo, self.out_hi)
        if self.axis == "channel":
            zero, scale = self.zero, self.scale
            u = (x - zero) / scale
            if self.outlier_frac > 0 and mask is None:
                mask = u.abs() > 1
        else:
            if self.outlier_frac > 0 and mask is None:
                mask = self._token_outliers(x)
            lo, hi = self._token_range(x, mask)
            zero, scale = range_to_zero_scale(lo, hi)
            u = (x - zero) / scale
        return u, mask, zero, scale

    @property
    def codebooks(self) -> str:
        """'layer', 'head' or 'channel': which elements share a codebook."""
        groups = self.levels.shape[0]
        return "layer" if groups == 1 else "head" if groups == self.heads else "channel"

    def to_groups(self, u: torch.Tensor) -> torch.Tensor:
        """u [..., H, T, D] -> [groups, n]: row g holds the elements that use codebook g."""
        if self.codebooks == "layer":
            return u.reshape(1, -1)
        g = u.movedim(-3, 0)  # [H, ..., T, D]
        if self.codebooks == "head":
            return g.reshape(self.heads, -1)
        return g.movedim(-1, 1).reshape(self.heads * self.head_dim, -1)  # [H, D, ..., T]

    def from_groups(self, rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Inverse of `to_groups` for a tensor of `shape` [..., H, T, D]."""
        if self.codebooks == "layer":
            return rows.reshape(shape)
        moved = (shape[-3], *shape[:-3], *shape[-2:])
        if self.codebooks == "head":
            return rows.reshape(moved).movedim(0, -3)
        inner = (shape[-3], shape[-1], *shape[:-3], shape[-2])
        return rows.reshape(inner).movedim(1, -1).movedim(0, -3)

    def quantize_normalized(self, u: torch.Tensor) -> torch.Tensor:
        """Codes of normalized u [..., H, T, D] (clamped to [-1, 1]) under each element's codebook."""
        u = u.clamp(-1, 1)
        levels = self.levels.float()
        if self.codebooks == "layer":
            return assign(u, levels[0])
        return self.from_groups(assign_batched(self.to_groups(u), levels), tuple(u.shape))

    def dequantize_normalized(self, codes: torch.Tensor) -> torch.Tensor:
        """Decoded normalized values of codes [..., H, T, D] (Q-Norm applied)."""
        levels = self.decode_levels
        if self.codebooks == "layer":
            return levels[0][codes]
        n = levels.shape[1]
        group = torch.arange(levels.shape[0], device=codes.device) * n
        group = group.view(self.heads, 1, 1) if self.codebooks == "head" else group.view(self.heads, 1, self.head_dim)
        return levels.flatten()[codes + group]

    # ----- storage -----
    @property
    def outlier_rows(self) -> str:
        """Rows of the sparse outliers (codecs.sparse): one per token over all heads for keys and `span="all"`
        values (a 1-token block costs one count), one per token and head for `span="head"` values."""
        return "token_all" if self.axis == "channel" or self.span == "all" else "token_head"

    def slice_tokens(self, enc: Encoded, start: int, stop: int) -> Encoded | None:
        shape = token_range(enc.shape, start, stop)
        tokens = enc.shape[-2]
        t = enc.tensors
        if self.channel_bits is None:
            parts = {"codes": packed_token_range(t["codes"], start, stop, tokens, self.head_dim, self.bits)}
        else:  # per width, [..., tokens * n codes]: cut where both ends fall on a byte
            parts = {f"codes{b}": packed_token_range(t[f"codes{b}"], start, stop, tokens, n, b)
                     for b, n in self.width_counts()}
        if any(p is None for p in parts.values()):
            return None
        out = dict(parts)
        if self.axis == "token":  # zero/scale [..., H | 1, tokens, 1]
            out |= {"zero": t["zero"][..., start:stop, :], "scale": t["scale"][..., start:stop, :]}
        if "outlier_values" in t:
            out |= sparse.slice_outliers(t, tokens, start, stop)
        return Encoded(out, shape)

    def split_tokens(self, enc: Encoded) -> Encoded | None:
        """Per-channel widths, batch 1, one range per token over all heads (or per-channel ranges) and outlier rows
        per token: every tensor is token-major, so T one-token blocks are views of the same bytes."""
        batch, heads, tokens, dim = enc.shape
        if self.channel_bits is None or batch != 1 or (self.axis == "token" and self.span != "all"):
            return None
        if self.outlier_frac > 0 and self.outlier_rows != "token_all":
            return None
        out = {}
        for name, t in enc.tensors.items():
            if name.startswith("codes"):
                out[name] = t.reshape(tokens, -1)
            elif name in ("zero", "scale"):  # [1, 1, T, 1]
                out[name] = t.reshape(tokens, 1, 1, 1)
            else:  # outlier counts [T] (one row per token), values and positions [nnz]
                out[name] = t
        return Encoded(out, (tokens, heads, 1, dim), dict(enc.meta))

    def layout(self) -> StorageLayout:
        parts = {n: "codes" for n in (["codes"] if self.channel_bits is None else [f"codes{b}" for b, _ in self.width_counts()])}
        if self.axis == "token":
            parts |= {"zero": "scales", "scale": "scales"}
        if self.outlier_frac > 0:
            parts |= dict.fromkeys(sparse.OUTLIER_NAMES, "outliers")
        return StorageLayout(parts, self.outlier_rows if self.outlier_frac > 0 else None)

    # ----- code packing -----
    def width_counts(self) -> list[tuple[int, int]]:
        """(bit width, channels of that width) for every width in use, ascending (0-bit channels store nothing);
        kept as a small array until `channel_bits` is replaced. What the C++ kernels are told: they list each
        width's channels themselves, from the widths."""
        memo = self.__dict__.get("_width_counts")
        if memo is None or memo[0] is not self.channel_bits:
            counts = torch.bincount(self.channel_bits.long().cpu(), minlength=9).tolist()
            memo = self.__dict__["_width_counts"] = (self.channel_bits, array("i", [v for b in range(1, 9) if counts[b]
                                                                                    for v in (b, counts[b])]))
        sizes = memo[1]
        return [(sizes[i], sizes[i + 1]) for i in range(0, len(sizes), 2)]

    def width_columns(self) -> dict[int, torch.Tensor]:
        """Bit width -> int64 [n]: the (head * head_dim + channel) columns stored at that width, ascending (0-bit
        ones store nothing), computed when asked (the torch and Triton paths; the C++ kernels list them from the
        widths, so the codec holds no column lists)."""
        return {b: self.columns_of(b) for b, _ in self.width_counts()}

    def columns_of(self, bits: int) -> torch.Tensor:
        """int64 [n]: the columns stored at width `bits`, ascending (one entry of `width_columns`)."""
        return (self.channel_bits == bits).nonzero().flatten()

    def _pack(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.channel_bits is None:
            return {"codes": packing.pack(codes.reshape(*codes.shape[:-2], -1), self.bits)}
        flat = codes.movedim(-3, -2).reshape(*codes.shape[:-3], codes.shape[-2], -1)  # [..., T, H*D]
        return {f"codes{b}": packing.pack(flat[..., cols.long()].reshape(*flat.shape[:-2], -1), b)
                for b, cols in self.width_columns().items()}

    def _unpack(self, t: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        *lead, heads, tokens, dim = shape
        if self.channel_bits is None:
            return packing.unpack(t["codes"], self.bits, tokens * dim).reshape(shape)
        flat = torch.zeros(*lead, tokens, heads * dim, dtype=torch.int64, device=self.levels.device)
        for b, cols in self.width_columns().items():
            flat[..., cols.long()] = packing.unpack(t[f"codes{b}"], b, tokens * cols.numel()).reshape(*lead, tokens, -1)
        return flat.reshape(*lead, tokens, heads, dim).movedim(-2, -3)

    # ----- codec interface -----
    def encode(self, x: torch.Tensor) -> Encoded:
        u, mask, zero, scale = self.normalize(x)
        codes = self.quantize_normalized(u)
        tensors = self._pack(codes)
        if self.axis == "token":
            tensors["zero"], tensors["scale"] = zero.half(), scale.half()
        if mask is not None:
            tensors |= sparse.encode_outliers(x.float(), mask, self.outlier_rows)
        return Encoded(tensors, tuple(x.shape))

    def decode(self, enc: Encoded) -> torch.Tensor:
        shape = enc.shape
        t = enc.tensors
        codes = self._unpack(t, shape)
        zero, scale = (self.zero, self.scale) if self.axis == "channel" else (t["zero"], t["scale"])
        zero, scale = zero.float(), scale.float()
        x = self.dequantize_normalized(codes) * scale + zero
        return sparse.apply_outliers(x, t, self.outlier_rows)

    def outlier_rate(self, enc: Encoded) -> float:
        """Measured share of elements stored as sparse outliers in `enc`."""
        return enc.tensors["outlier_values"].numel() / max(math.prod(enc.shape), 1) if "outlier_values" in enc.tensors else 0.0
