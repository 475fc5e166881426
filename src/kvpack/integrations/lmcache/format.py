"""The serialized chunk: a small self-describing frame around the packed tensors.

    magic "KVPK" | u16 format version | u32 header length | header (JSON, utf-8)
    | payload (packed tensors, in the order the header's method/recipe/layout implies)
    | sha256 of everything before it (32 bytes) | zero padding up to the size LMCache allocated

The header names the method, the recipe's sha256, the key path (pre- or post-RoPE), the RoPE
parameters, each group's layout/shape/dtype and the payload length; the reader rebuilds the tensor
table from the same recipe and refuses (ChunkFormatError) any chunk whose header or digest disagrees.
"""
from __future__ import annotations

import hashlib
import json
import struct

import torch

from kvpack.integrations.lmcache.errors import ChunkFormatError

MAGIC = b"KVPK"
FORMAT_VERSION = 1
FORMAT_NAME = "kvpack-lmcache"
PREFIX = struct.Struct("<4sHI")
DIGEST_BYTES = 32


def header_bytes(header: dict) -> bytes:
    return json.dumps({"format": FORMAT_NAME, **header}, sort_keys=True, separators=(",", ":")).encode()


def frame_nbytes(header: bytes, payload: int) -> int:
    """Total bytes of a frame with this header and payload length."""
    return PREFIX.size + len(header) + payload + DIGEST_BYTES


def write_prefix(out: torch.Tensor, header: bytes) -> int:
    """Write magic, version, header into flat uint8 `out`; returns the payload offset."""
    head = PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header
    out[: len(head)].copy_(torch.frombuffer(bytearray(head), dtype=torch.uint8))
    return len(head)


def _digest(buf: torch.Tensor, end: int) -> bytes:
    return hashlib.sha256(buf[:end].numpy()).digest()


def seal(out: torch.Tensor, end: int) -> int:
    """Append the sha256 of out[:end]; returns the frame's end."""
    out[end : end + DIGEST_BYTES].copy_(torch.frombuffer(bytearray(_digest(out, end)), dtype=torch.uint8))
    return end + DIGEST_BYTES


def read_prefix(buf: torch.Tensor) -> tuple[dict, int]:
    """(header, payload offset) of the frame in flat uint8 `buf` (CPU); ChunkFormatError if it is not one."""
    if buf.numel() < PREFIX.size:
        raise ChunkFormatError(f"buffer of {buf.numel()} bytes is too short to hold a kvpack chunk")
    magic, version, length = PREFIX.unpack(bytes(buf[: PREFIX.size].numpy()))
    if magic != MAGIC:
        raise ChunkFormatError(f"not a kvpack chunk (magic {magic!r}); it was written by another serde or is damaged")
    if version != FORMAT_VERSION:
        raise ChunkFormatError(
            f"kvpack chunk format version {version}; this kvpack reads version {FORMAT_VERSION}. "
            "Read it with the kvpack version that wrote it, or let LMCache recompute the chunk."
        )
    end = PREFIX.size + length
    if end > buf.numel():
        raise ChunkFormatError(f"chunk header of {length} bytes runs past the {buf.numel()}-byte buffer: it is damaged")
    try:
        header = json.loads(bytes(buf[PREFIX.size : end].numpy()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChunkFormatError(f"chunk header is not valid JSON ({exc}): the chunk is damaged") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ChunkFormatError("chunk header does not describe a kvpack-lmcache chunk: it is damaged")
    return header, end


def check_seal(buf: torch.Tensor, end: int) -> None:
    """Raise ChunkFormatError unless buf[end:end+32] is the sha256 of buf[:end]."""
    if end + DIGEST_BYTES > buf.numel():
        raise ChunkFormatError(f"chunk of {end + DIGEST_BYTES} bytes does not fit its {buf.numel()}-byte buffer: it was cut short")
    stored = bytes(buf[end : end + DIGEST_BYTES].numpy())
    if stored != _digest(buf, end):
        raise ChunkFormatError("chunk checksum mismatch: the stored bytes are damaged; the chunk is refused")
