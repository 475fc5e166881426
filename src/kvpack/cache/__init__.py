"""The compressed cache: CompressedCache, its layers, token streams, block store, memory report, save/load."""
from kvpack.cache.cache import CompressedCache

__all__ = ["CompressedCache"]
