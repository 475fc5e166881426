"""int-N: asymmetric min-max uniform quantization, per token or per channel, optional groups.

Stored per group: N-bit codes (packed), the minimum and the step, both fp16. KIVI-style is this
codec with per-channel keys in groups of 32 tokens and per-token values in groups of 32 channels.
"""
from __future__ import annotations

import torch

from kvpack.codecs import packing
from kvpack.codecs.base import (Codec, Encoded, StorageLayout, check_bits, packed_token_range, register_codec,
                                token_range)
from kvpack.codecs.grouping import check_axis, grouped, grouped_shape


@register_codec
class UniformCodec(Codec):
    def __init__(self, bits: int, axis: str = "token", group_size: int | None = None):
        self.bits = check_bits(bits, 1, 8)
        self.axis = check_axis(axis)
        self.group_size = group_size
        self.name = f"int{bits}-{axis}" + (f"-g{group_size}" if group_size else "")

    def config(self) -> dict:
        return {"bits": self.bits, "axis": self.axis, "group_size": self.group_size}

    def token_group(self) -> int:
        return (self.group_size or 1) if self.axis == "channel" else 1

    def encode(self, x: torch.Tensor) -> Encoded:
        view, dim = grouped(x.float(), self.axis, self.group_size)
        lo = view.amin(dim, keepdim=True).to(torch.float16)
        hi = view.amax(dim, keepdim=True)
        levels = (1 << self.bits) - 1
        step = ((hi - lo.float()) / levels).to(torch.float16)
        step = torch.where(step.float() > 0, step, torch.ones_like(step))
        codes = torch.round((view - lo.float()) / step.float()).clamp_(0, levels).to(torch.int32)
        packed = packing.pack(codes.reshape(*x.shape[:-2], -1), self.bits)
        return Encoded({"codes": packed, "min": lo, "step": step}, tuple(x.shape))

    def slice_tokens(self, enc: Encoded, start: int, stop: int) -> Encoded | None:
        shape = token_range(enc.shape, start, stop)
        codes = packed_token_range(enc.tensors["codes"], start, stop, enc.shape[-2], enc.shape[-1], self.bits)
        if self.axis != "token" or codes is None:
            return None
        t = enc.tensors  # min/step [..., tokens, groups, 1]
        return Encoded({"codes": codes, "min": t["min"][..., start:stop, :, :], "step": t["step"][..., start:stop, :, :]},
                       shape)

    def layout(self) -> StorageLayout:
        return StorageLayout({"codes": "codes", "min": "scales", "step": "scales"})

    def decode(self, enc: Encoded) -> torch.Tensor:
        shape = enc.shape
        codes = packing.unpack(enc.tensors["codes"], self.bits, shape[-2] * shape[-1])
        view = codes.reshape(grouped_shape(shape, self.axis, self.group_size)).float()
        return (view * enc.tensors["step"].float() + enc.tensors["min"].float()).reshape(shape)
