"""fp16 storage: the uncompressed baseline (the model itself may compute in float32)."""
from __future__ import annotations

import torch

from kvpack.codecs.base import Codec, Encoded, StorageLayout, register_codec


@register_codec
class Fp16Codec(Codec):
    name = "fp16"

    def encode(self, x: torch.Tensor) -> Encoded:
        return Encoded({"values": x.to(torch.float16)}, tuple(x.shape))

    def layout(self) -> StorageLayout:
        return StorageLayout({"values": "codes"})

    def slice_tokens(self, enc: Encoded, keep: int) -> Encoded:
        return Encoded({"values": enc.tensors["values"][..., :keep, :]}, (*enc.shape[:-2], keep, enc.shape[-1]))

    def decode(self, enc: Encoded) -> torch.Tensor:
        return enc.tensors["values"].float()
