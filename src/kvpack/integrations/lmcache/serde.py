"""LMCache's Serializer / Deserializer for kvpack chunks, and the "kvpack" serde factory.

Importing this module needs lmcache (`pip install kvpack[lmcache]`); `kvpack.integrations.lmcache`
imports it on demand.
"""
from __future__ import annotations

import torch

try:
    from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
    from lmcache.v1.distributed.serde.async_processor import AsyncSerdeProcessor
    from lmcache.v1.distributed.serde.base import Deserializer, SerdeProcessor, Serializer
    from lmcache.v1.memory_management import MemoryObj
except ImportError as exc:  # pragma: no cover - exercised only without lmcache
    raise ImportError(
        "kvpack's LMCache serde needs lmcache: pip install 'kvpack[lmcache]' (or pip install --no-deps "
        f"lmcache==0.5.6 plus its Python dependencies) ({exc})"
    ) from exc

from kvpack.integrations.lmcache.chunk import ChunkCodec
from kvpack.integrations.lmcache.errors import SerdeConfigError

SERDE_NAME = "kvpack"


def group_tensors(obj: MemoryObj) -> list[torch.Tensor]:
    """The tensor of each group of an LMCache object ([2, L, T, D] etc.), views into its memory."""
    shapes = getattr(obj.metadata, "shapes", None)
    if shapes is not None and len(shapes) > 1:
        tensors = [obj.get_tensor(i) for i in range(len(shapes))]
    else:
        tensors = [obj.tensor]
    if any(t is None for t in tensors):
        raise SerdeConfigError("the kvpack serde needs LMCache objects backed by tensors")
    return tensors


def _byte_buffer(obj: MemoryObj) -> torch.Tensor:
    t = obj.tensor
    if t is None:
        raise SerdeConfigError("the kvpack serde needs LMCache byte buffers backed by tensors")
    return t.reshape(-1) if t.dtype == torch.uint8 else t.reshape(-1).view(torch.uint8)


class KVPackSerializer(Serializer):
    """Stores a KV chunk as a kvpack frame; keys go pre-RoPE when the chunk carries cached_positions."""

    def __init__(self, codec: ChunkCodec):
        self.codec = codec

    def serialize(self, src: MemoryObj, dst: MemoryObj, key: ObjectKey) -> int:
        positions = getattr(src.metadata, "cached_positions", None)
        return self.codec.encode_into(group_tensors(src), positions, _byte_buffer(dst))

    def estimate_serialized_size(self, layout_desc: MemoryLayoutDesc) -> int:
        return self.codec.max_nbytes(layout_desc.shapes, layout_desc.dtypes)


class KVPackDeserializer(Deserializer):
    """Rebuilds a KV chunk (in the destination's layout and dtype) from a kvpack frame."""

    def __init__(self, codec: ChunkCodec):
        self.codec = codec

    def deserialize(self, src: MemoryObj, dst: MemoryObj, key: ObjectKey) -> None:
        self.codec.decode_from(_byte_buffer(src), group_tensors(dst))


def create_kvpack_serde(kwargs: dict[str, object]) -> SerdeProcessor:
    """The factory LMCache calls with the "serde" kwargs of an L2 adapter."""
    codec = ChunkCodec.from_kwargs(dict(kwargs))
    return AsyncSerdeProcessor(KVPackSerializer(codec), KVPackDeserializer(codec), max_workers=int(codec.options.max_workers))


def register() -> None:
    """Register serde type "kvpack" with LMCache (idempotent)."""
    from lmcache.v1.distributed.serde.factory import get_registered_serde_types, register_serde_factory

    if SERDE_NAME not in get_registered_serde_types():
        register_serde_factory(SERDE_NAME, create_kvpack_serde)
