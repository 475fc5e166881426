"""Errors of the LMCache serde (subclasses of ValueError, so LMCache's serde task marks the chunk failed)."""
from __future__ import annotations

from kvpack.errors import KVPackError


class SerdeConfigError(KVPackError, ValueError):
    """The serde's kwargs are invalid or do not fit the KV layout LMCache hands it."""


class ChunkFormatError(KVPackError, ValueError):
    """A stored chunk is damaged, from another format version, or written with another method/recipe/layout."""
