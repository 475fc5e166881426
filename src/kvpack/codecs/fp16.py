"""fp16 storage: the uncompressed baseline (the model itself may compute in float32)."""
from __future__ import annotations

import torch

from kvpack.codecs.base import Codec, Encoded, StorageLayout, register_codec, token_range


@register_codec
class Fp16Codec(Codec):
    name = "fp16"

    def encode(self, x: torch.Tensor) -> Encoded:
        return Encoded({"values": x.to(torch.float16)}, tuple(x.shape))

    def layout(self) -> StorageLayout:
        return StorageLayout({"values": "codes"})

    def slice_tokens(self, enc: Encoded, start: int, stop: int) -> Encoded:
        shape = token_range(enc.shape, start, stop)
        return Encoded({"values": enc.tensors["values"][..., start:stop, :]}, shape)

    def decode(self, enc: Encoded) -> torch.Tensor:
        return enc.tensors["values"].float()
