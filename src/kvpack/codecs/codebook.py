"""Non-uniform codebook quantization: each vector is normalized to [-1, 1] by its own range
(zero = (hi + lo) / 2, scale = (hi - lo) / 2, both fp16) and every element is replaced by the
nearest of 2**N levels. NormalFloat (nfN) is this codec with normal-quantile levels; KVQuant's
calibrated nuqN datatypes reuse it with learned levels.
"""
from __future__ import annotations

import torch

from kvpack.codecs import packing
from kvpack.codecs.base import (Codec, Encoded, StorageLayout, check_bits, packed_token_range, register_codec,
                                token_range)
from kvpack.codecs.grouping import check_axis, grouped, grouped_shape


def normal_float_levels(bits: int) -> torch.Tensor:
    """The NormalFloat levels [2**bits] (QLoRA construction generalized to any N), sorted, in [-1, 1]."""
    n = 1 << check_bits(bits, 1, 8)
    if n == 2:
        return torch.tensor([-1.0, 1.0])
    offset = 1 - 0.5 * (1 / (2 * n) + 1 / (2 * (n - 1)))  # 0.9677 for 4 bits, as in QLoRA
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()


def nearest_level(u: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted `levels` for every element of u (ties go down)."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(u, midpoints.to(u.dtype), right=False)


@register_codec
class CodebookCodec(Codec):
    def __init__(self, levels: torch.Tensor, axis: str = "token", group_size: int | None = None, name: str | None = None):
        levels = torch.as_tensor(levels, dtype=torch.float32).flatten().sort().values
        n = levels.numel()
        if n < 2 or n & (n - 1):
            raise ValueError(f"a codebook needs a power-of-two number of levels >= 2, got {n}")
        self.levels = levels
        self.bits = n.bit_length() - 1
        self.axis = check_axis(axis)
        self.group_size = group_size
        self.name = name or f"codebook{self.bits}-{axis}"

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"axis": self.axis, "group_size": self.group_size, "name": self.name}, {"levels": self.levels}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "CodebookCodec":
        return cls(tensors["levels"], **config)

    def token_group(self) -> int:
        return (self.group_size or 1) if self.axis == "channel" else 1

    def encode(self, x: torch.Tensor) -> Encoded:
        view, dim = grouped(x.float(), self.axis, self.group_size)
        hi, lo = view.amax(dim, keepdim=True), view.amin(dim, keepdim=True)
        zero = ((hi + lo) / 2).to(torch.float16)
        scale = ((hi - lo) / 2).to(torch.float16)
        # A constant group (hi == lo): the tiniest fp16 scale decodes it to its stored zero whatever the
        # levels are (a scale of 1 would add the nearest level's magnitude when 0 is not a level).
        scale = torch.where(scale.float() > 0, scale, torch.full_like(scale, 2.0**-24))
        u = (view - zero.float()) / scale.float()
        codes = nearest_level(u, self.levels)
        packed = packing.pack(codes.reshape(*x.shape[:-2], -1), self.bits)
        return Encoded({"codes": packed, "zero": zero, "scale": scale}, tuple(x.shape))

    def decode(self, enc: Encoded) -> torch.Tensor:
        shape = enc.shape
        codes = packing.unpack(enc.tensors["codes"], self.bits, shape[-2] * shape[-1])
        zero, scale = enc.tensors["zero"].float(), enc.tensors["scale"].float()
        view = codes.reshape(grouped_shape(shape, self.axis, self.group_size))
        return (self.levels[view] * scale + zero).reshape(shape)

    def slice_tokens(self, enc: Encoded, start: int, stop: int) -> Encoded | None:
        shape = token_range(enc.shape, start, stop)
        codes = packed_token_range(enc.tensors["codes"], start, stop, enc.shape[-2], enc.shape[-1], self.bits)
        if self.axis != "token" or codes is None:
            return None
        t = enc.tensors  # zero/scale [..., tokens, groups, 1]
        return Encoded({"codes": codes, "zero": t["zero"][..., start:stop, :, :],
                        "scale": t["scale"][..., start:stop, :, :]}, shape)

    def layout(self) -> StorageLayout:
        return StorageLayout({"codes": "codes", "zero": "scales", "scale": "scales"})

    def shared_nbytes(self) -> int:
        return self.levels.numel() * 2  # stored as fp16


@register_codec
class NormalFloatCodec(CodebookCodec):
    def __init__(self, bits: int, axis: str = "token", group_size: int | None = None):
        super().__init__(normal_float_levels(bits), axis, group_size, name=f"nf{bits}-{axis}")

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"bits": self.bits, "axis": self.axis, "group_size": self.group_size}, {}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "NormalFloatCodec":
        return cls(**config)

    def shared_nbytes(self) -> int:
        return 0  # the NF levels are a fixed datatype, not stored with the cache
