"""Dense-and-sparse split: the outliers of x (elements outside per-vector [lo, hi]) are stored
exactly in fp16 as a compressed sparse row matrix; the dense part is quantized by the caller.

Layout of one block, rows of `n` elements each (the nuq codec uses one row per token, CSR, for
keys and values alike):
  values  fp16 [nnz]   the outliers, exactly (x rounded to fp16, restored bit-exact)
  indices [nnz]        position inside the row, in the smallest integer type that holds n - 1
  counts  [rows]       outliers per row, the smallest type that holds n; the CSR row pointer
                       array is their prefix sum (`pointers`), so storing counts instead of
                       int32 pointers is the same information in 1/4 (uint8) of the bytes.
Byte counts are those of these real tensors.
"""
from __future__ import annotations

import math

import torch


def index_dtype(limit: int) -> torch.dtype:
    """Smallest integer dtype holding every value in [0, limit]."""
    if limit <= 255:
        return torch.uint8
    if limit <= 32767:
        return torch.int16
    if limit <= 2**31 - 1:
        return torch.int32
    return torch.int64


def outlier_mask(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """True where x lies outside [lo, hi] (lo, hi broadcast against x)."""
    return (x < lo) | (x > hi)


def encode_rows(x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """x, mask [rows, n] -> {"values", "indices", "counts"} holding x[mask] in row-major order."""
    if x.dim() != 2 or mask.shape != x.shape:
        raise ValueError(f"encode_rows needs x and mask of one shape [rows, n], got {tuple(x.shape)}, {tuple(mask.shape)}")
    rows, n = x.shape
    _, cols = mask.nonzero(as_tuple=True)
    return {
        "values": x[mask].to(torch.float16),
        "indices": cols.to(index_dtype(max(n - 1, 0))),
        "counts": mask.sum(1).to(index_dtype(n)),
    }


def pointers(counts: torch.Tensor) -> torch.Tensor:
    """CSR row pointers [rows + 1] (int64) from per-row counts [rows]."""
    return torch.cat([counts.new_zeros(1, dtype=torch.int64), torch.cumsum(counts.to(torch.int64), 0)])


def decode_rows(sparse: dict[str, torch.Tensor], rows: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `encode_rows`: (values [rows, n] float32, zero off the outliers; mask [rows, n])."""
    counts = sparse["counts"].to(torch.int64)
    if counts.numel() != rows:
        raise ValueError(f"sparse outliers hold {counts.numel()} rows, expected {rows}")
    row_idx = torch.repeat_interleave(torch.arange(rows, device=counts.device), counts)
    col_idx = sparse["indices"].to(torch.int64)
    dense = torch.zeros(rows, n, dtype=torch.float32, device=counts.device)
    mask = torch.zeros(rows, n, dtype=torch.bool, device=counts.device)
    dense[row_idx, col_idx] = sparse["values"].float()
    mask[row_idx, col_idx] = True
    return dense, mask


def nbytes(sparse: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sparse.values())


# ---------------------------------------------------------------------------------------- block outliers
# The one outlier format of every codec: an Encoded block of x [..., H, T, D] stores its outliers as
# "outlier_values" / "outlier_indices" / "outlier_counts" (encode_rows above) over rows of one of two kinds,
# declared by the codec's StorageLayout.outlier_rows:
#   "token_all"   one row per token (all heads): rows [..., T] over H * D columns (h * D + c)
#   "token_head"  one row per token and head:    rows [..., H, T] over D columns (c)
# Rows run in x's order ([..., T] leading dims first), so the kernels index row (blk, b, t) or (blk, b, h, t).
OUTLIER_ROWS = ("token_all", "token_head")
OUTLIER_NAMES = ("outlier_values", "outlier_indices", "outlier_counts")


def to_rows(x: torch.Tensor, rows: str) -> torch.Tensor:
    """x [..., H, T, D] -> the outlier rows [R, n] of kind `rows`."""
    if rows == "token_all":
        return x.movedim(-3, -2).reshape(-1, x.shape[-3] * x.shape[-1])
    if rows == "token_head":
        return x.reshape(-1, x.shape[-1])
    raise ValueError(f"outlier rows must be one of {OUTLIER_ROWS}, got {rows!r}")


def from_rows(r: torch.Tensor, shape: tuple[int, ...], rows: str) -> torch.Tensor:
    """Inverse of `to_rows` for x of `shape` [..., H, T, D]."""
    *lead, heads, tokens, dim = shape
    if rows == "token_all":
        return r.reshape(*lead, tokens, heads, dim).movedim(-2, -3)
    return r.reshape(shape)


def encode_outliers(x: torch.Tensor, mask: torch.Tensor, rows: str) -> dict[str, torch.Tensor]:
    """The outliers of x [..., H, T, D] where `mask`, as the three named tensors of the one format."""
    part = encode_rows(to_rows(x, rows), to_rows(mask, rows))
    return {f"outlier_{k}": t for k, t in part.items()}


def apply_outliers(x: torch.Tensor, tensors: dict[str, torch.Tensor], rows: str) -> torch.Tensor:
    """x [..., H, T, D] with the stored outliers of `tensors` put back (x itself if there are none)."""
    if "outlier_values" not in tensors:
        return x
    shape = tuple(x.shape)
    n = shape[-3] * shape[-1] if rows == "token_all" else shape[-1]
    part = {k: tensors[f"outlier_{k}"].to(x.device) for k in ("values", "indices", "counts")}
    values, mask = decode_rows(part, math.prod(shape) // n, n)
    return torch.where(from_rows(mask, shape, rows), from_rows(values, shape, rows).to(x.dtype), x)


def slice_outliers(tensors: dict[str, torch.Tensor], tokens: int, start: int, stop: int) -> dict[str, torch.Tensor]:
    """The outliers of tokens start..stop-1 of a block's `tokens` tokens (either row kind: the token index runs
    fastest in both), as the three named tensors."""
    counts = tensors["outlier_counts"]
    row = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts.long())
    token = row % tokens
    kept = (token >= start) & (token < stop)
    return {"outlier_values": tensors["outlier_values"][kept], "outlier_indices": tensors["outlier_indices"][kept],
            "outlier_counts": counts.view(-1, tokens)[:, start:stop].reshape(-1)}


def segment_index(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenated ranges [starts[i], starts[i] + lengths[i]) as one index tensor."""
    total = int(lengths.sum())
    first = torch.cumsum(lengths, 0) - lengths
    return torch.repeat_interleave(starts - first, lengths, output_size=total) + torch.arange(total, device=starts.device)
