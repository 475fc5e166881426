"""kvpack as LMCache's KV compression: a distributed serde named "kvpack".

Enable it in the process that runs LMCache's storage manager, before the L2 adapters are built:

    import kvpack.integrations.lmcache as kvpack_lmcache; kvpack_lmcache.register()

or start LMCache's cache server through `python -m kvpack.integrations.lmcache <server args>`.
Then select it on an L2 adapter:

    {"type": "fs", "base_path": "/cache",
     "serde": {"type": "kvpack", "method": "kvquant-3bit-1pct", "recipe": "/recipes/kvquant-3bit-1pct",
               "fallback_method": "kvquant-3bit-1pct:post-rope", "fallback_recipe": "/recipes/post",
               "rope_theta": 100000}}

`ChunkCodec` (no lmcache needed) does the work on plain tensors; `KVPackSerializer` /
`KVPackDeserializer` / `create_kvpack_serde` wrap it in LMCache's interface.
"""
from __future__ import annotations

from kvpack.integrations.lmcache.chunk import ChunkCodec
from kvpack.integrations.lmcache.errors import ChunkFormatError, SerdeConfigError
from kvpack.integrations.lmcache.options import SerdeOptions

SERDE_NAME = "kvpack"
_LAZY = ("KVPackSerializer", "KVPackDeserializer", "create_kvpack_serde")

__all__ = ["ChunkCodec", "ChunkFormatError", "SerdeConfigError", "SerdeOptions", "SERDE_NAME", "register", *_LAZY]


def register() -> None:
    """Register serde type "kvpack" with LMCache (`register_serde_factory`); safe to call twice.

    Raises ImportError naming the pip command when lmcache is not installed.
    """
    from kvpack.integrations.lmcache.serde import register as _register

    _register()


def __getattr__(name: str):
    if name in _LAZY:
        from kvpack.integrations.lmcache import serde

        return getattr(serde, name)
    raise AttributeError(f"module 'kvpack.integrations.lmcache' has no attribute {name!r}")
