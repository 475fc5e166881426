"""Fixed-capacity sparse outliers, so every chunk of a layout serializes to the same byte count.

kvpack codecs keep outliers as three tensors (the one outlier format of `kvpack.codecs`):
`outlier_values` fp16 [nnz], `outlier_indices` [nnz] (column in a row) and `outlier_counts` [rows]
(one row per token over all heads, or per token and head). With keys ranged per channel at
calibration, nnz depends on the data. Here each (layer, K/V) block gets room for `capacity`
outliers: values and indices are zero-padded to it, and a block with more candidates keeps the
`capacity` whose removal would cost most (largest |x - dense decode|); the others are decoded
from the dense codes (clamped to the range), never lost silently as wrong values. Tokens that must
stay exact (attention sinks) are forced in first.
"""
from __future__ import annotations

import math

import torch

from kvpack.codecs import sparse
from kvpack.codecs.base import Encoded
from kvpack.integrations.lmcache.errors import ChunkFormatError

NAMES = sparse.OUTLIER_NAMES
VALUES, INDICES, COUNTS = NAMES


def has_outliers(tensors: dict[str, torch.Tensor]) -> bool:
    present = [n in tensors for n in NAMES]
    if any(present) and not all(present):
        raise ChunkFormatError(f"a codec produced only part of the sparse outlier tensors: {sorted(tensors)}")
    return all(present)


def fit(
    codec, enc: Encoded, x: torch.Tensor, capacity: int, forced_tokens: torch.Tensor | None, stats: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors of `enc` with outliers fitted to `capacity` (values/indices padded to exactly that length).

    x [heads, tokens, head_dim] is the block `enc` encodes; `forced_tokens` (token indices) must be exact.
    `stats` (optional) accumulates blocks, candidates, kept and dropped outliers.
    """
    tensors = dict(enc.tensors)
    if not has_outliers(tensors):
        return tensors
    counts = tensors[COUNTS].flatten()
    rows = counts.numel()
    kind = codec.layout().outlier_rows  # the codec declares its rows: "token_all" or "token_head"
    n = x.numel() // rows
    nnz = int(counts.to(torch.int64).sum())
    forced = forced_tokens is not None and forced_tokens.numel() > 0
    if nnz > capacity or forced:
        xr = sparse.to_rows(x.float(), kind)
        _, mask = sparse.decode_rows({k[len("outlier_"):]: tensors[k] for k in NAMES}, rows, n)
        force_rows = torch.zeros(rows, dtype=torch.bool)
        if forced:
            tokens = x.shape[1]
            token_rows = forced_tokens.to(torch.int64)
            if kind == "token_head":
                token_rows = (torch.arange(x.shape[0])[:, None] * tokens + token_rows[None, :]).flatten()
            force_rows[token_rows] = True
            mask |= force_rows[:, None]
        candidates = int(mask.sum())
        if candidates > capacity:
            dense = codec.decode(Encoded({k: v for k, v in tensors.items() if k not in NAMES}, enc.shape, enc.meta))
            cost = (xr - sparse.to_rows(dense.float(), kind)).abs()
            cost = cost.masked_fill(force_rows[:, None], float("inf")).masked_fill(~mask, -1.0)
            keep = torch.topk(cost.flatten(), capacity).indices
            mask = torch.zeros(rows * n, dtype=torch.bool)
            mask[keep] = True
            mask = mask.view(rows, n)
        _, cols = mask.nonzero(as_tuple=True)
        tensors[VALUES] = xr[mask].to(torch.float16)
        tensors[INDICES] = cols.to(tensors[INDICES].dtype)
        tensors[COUNTS] = mask.sum(1).to(counts.dtype).view(tensors[COUNTS].shape)
        nnz = int(mask.sum())
    else:
        candidates = nnz
    if stats is not None:
        for name, value in (("blocks", 1), ("candidates", candidates), ("kept", nnz), ("dropped", candidates - nnz),
                            ("capacity", capacity), ("full_blocks", int(candidates > capacity))):
            stats[name] = stats.get(name, 0) + value
    for name in (VALUES, INDICES):
        t = tensors[name].flatten()
        tensors[name] = torch.cat([t, t.new_zeros(capacity - nnz)])
    return tensors


def unpad(tensors: dict[str, torch.Tensor], capacity: int) -> dict[str, torch.Tensor]:
    """Inverse of the padding in `fit`: values/indices cut to the stored count."""
    if not has_outliers(tensors):
        return tensors
    nnz = int(tensors[COUNTS].to(torch.int64).sum())
    if nnz > capacity:
        raise ChunkFormatError(f"chunk claims {nnz} outliers in a block with room for {capacity}: it is damaged")
    out = dict(tensors)
    out[VALUES], out[INDICES] = tensors[VALUES][:nnz], tensors[INDICES][:nnz]
    return out


def capacity_for(numel: int, fraction: float) -> int:
    """Outlier slots of a block of `numel` elements."""
    return int(math.ceil(fraction * numel - 1e-9))
