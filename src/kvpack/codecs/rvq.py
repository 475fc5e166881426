"""Residual vector quantization (Kumar 2024, arXiv 2410.15704) of keys or values.

Per token and KV head, a vector x [head_dim] is divided by its standard deviation over head_dim
(the scale is stored in fp16), its channels are split into n = head_dim / g groups of g channels
(contiguous: group j = channels j*g .. j*g+g-1; strided: group j = channels j, j+n, j+2n, ...),
and every group is quantized by the same residual quantizer: D stages, each picking the nearest
of its C codewords (Euclidean) for what the previous stages left. Stored per token and head:
n * D codes of log2(C) bits, packed, plus the fp16 scale. Decoding sums the chosen codewords and
multiplies by the scale. The D x C x g codebooks (fp16) are shared by every token, head and
group of one layer's keys (or values): `shared_nbytes()`.

Optional dense-and-sparse outliers (KVQuant's idea applied before VQ): per KV head and channel,
thresholds fitted on calibration data; elements outside them are kept exactly in fp16 (value,
uint8 channel index, uint8 count per token row) and clamped to the thresholds in the dense part.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from kvpack.codecs import packing, sparse
from kvpack.codecs.base import Codec, Encoded, StorageLayout, register_codec, token_range

GROUPINGS = ("strided", "contiguous")
# Distance-matrix budget of one encode chunk (rows x C float32 entries): 512K entries = 2 MiB, so
# the block stays in cache between the matmul and the argmin (256 rows at C = 2048).
CHUNK_ENTRIES = 1 << 19
# Intra-op threads of the greedy search. Its matmuls (K = g) and argmins are small and stall on
# thread synchronization: on the shared 2-core machine one thread encodes 2.6x faster than two
# (benchmarks/rvq_notes.md). Set KVPACK_RVQ_THREADS to change it.
SEARCH_THREADS = int(os.environ.get("KVPACK_RVQ_THREADS", "1"))


@contextmanager
def intra_op_threads(threads: int | None):
    """Run the block with `threads` torch intra-op threads (None or 0: leave as is)."""
    before = torch.get_num_threads()
    if threads and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def check_grouping(grouping: str) -> str:
    if grouping not in GROUPINGS:
        raise ValueError(f"channel grouping must be one of {GROUPINGS}, got {grouping!r}")
    return grouping


def group_permutation(head_dim: int, group: int, grouping: str) -> torch.Tensor:
    """Channel order [head_dim] such that x[..., perm].view(..., head_dim // group, group) are the groups."""
    check_grouping(grouping)
    if group < 1 or head_dim % group:
        raise ValueError(f"head_dim {head_dim} is not divisible by the RVQ group size {group}")
    n = head_dim // group
    if grouping == "contiguous":
        return torch.arange(head_dim)
    # strided: group j holds channels j, j + n, j + 2n, ...
    return torch.arange(head_dim).view(group, n).t().reshape(-1)


def to_groups(x: torch.Tensor, perm: torch.Tensor, group: int) -> torch.Tensor:
    """x [..., head_dim] -> group vectors [..., head_dim // group, group] in `perm` order."""
    return x[..., perm].reshape(*x.shape[:-1], -1, group)


def from_groups(v: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_groups`: v [..., n, group] -> x [..., head_dim]."""
    flat = v.reshape(*v.shape[:-2], -1)
    return flat[..., torch.argsort(perm)]


def token_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-vector standard deviation over the last dim, rounded to fp16 (as stored), zeros -> 1: [..., 1]."""
    scale = x.std(dim=-1, keepdim=True, correction=0).to(torch.float16)
    return torch.where(scale.float() > 0, scale, torch.ones_like(scale))


def nearest_code(r: torch.Tensor, codebook: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Index [rows] of the nearest codeword of codebook [C, g] for each row of r [rows, g] (one block)."""
    dist = torch.addmm(sq_norms, r, codebook.t(), beta=1.0, alpha=-2.0)
    return _argmin_rows(dist)


def _argmin_rows(dist: torch.Tensor) -> torch.Tensor:
    """Column of each row's minimum [rows] (first on ties): numpy's argmin on the CPU (~4x faster than
    torch's there), torch's on other devices."""
    if dist.device.type == "cpu":
        return torch.from_numpy(dist.numpy().argmin(axis=1))
    return dist.argmin(dim=1)


def prepare_search(codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codebooks [D, C, g], transposed [D, g, C], squared norms [D, C]) as the greedy search uses them."""
    books = codebooks.float().contiguous()
    return books, books.transpose(1, 2).contiguous(), (books * books).sum(-1)


def residual_encode(
    vectors: torch.Tensor, codebooks: torch.Tensor, chunk_rows: int | None = None,
    prepared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Greedy residual codes [rows, D] of vectors [rows, g] with codebooks [D, C, g].

    Per stage, the nearest codeword minimizes |c|^2 - 2 r.c. Rows go in chunks so the rows x C
    distance block (one reused buffer) stays below CHUNK_ENTRIES; numpy's argmin is used because
    it is ~4x faster than torch's on CPU (same first-minimum tie rule). `prepared` is
    `prepare_search(codebooks)`, passed by callers that encode many small blocks.
    """
    depth, size, _ = codebooks.shape
    chunk = chunk_rows or max(1, CHUNK_ENTRIES // size)
    books, books_t, sq = prepared or prepare_search(codebooks)
    vectors = vectors.float().to(books.device)
    codes = torch.empty(vectors.shape[0], depth, dtype=torch.int64, device=books.device)
    buffer = torch.empty(min(chunk, vectors.shape[0]), size, device=books.device)
    with intra_op_threads(SEARCH_THREADS):
        for start in range(0, vectors.shape[0], chunk):
            r = vectors[start:start + chunk].clone()
            dist = buffer[: r.shape[0]]
            for s in range(depth):
                torch.addmm(sq[s], r, books_t[s], beta=1.0, alpha=-2.0, out=dist)
                idx = _argmin_rows(dist)
                codes[start:start + chunk, s] = idx
                r -= books[s, idx]
    return codes


def residual_decode(codes: torch.Tensor, codebooks: torch.Tensor, chunk_rows: int = 1 << 16) -> torch.Tensor:
    """Sum of the chosen codewords: codes [rows, D] -> vectors [rows, g]."""
    depth, size, g = codebooks.shape
    flat = codebooks.reshape(depth * size, g)
    offsets = torch.arange(depth, device=codebooks.device) * size
    codes = codes.to(codebooks.device)
    out = torch.empty(codes.shape[0], g, dtype=codebooks.dtype, device=codebooks.device)
    with intra_op_threads(SEARCH_THREADS):
        for start in range(0, codes.shape[0], chunk_rows):
            out[start:start + chunk_rows] = flat[codes[start:start + chunk_rows] + offsets].sum(dim=1)
    return out


@register_codec
class RVQCodec(Codec):
    """One layer's residual vector quantizer for keys or values (see module docstring).

    codebooks [D, C, g] (kept as fp16-rounded float32, stored fp16); `lower`/`upper` [heads, head_dim]
    outlier thresholds or None.
    """

    def __init__(
        self,
        codebooks: torch.Tensor,
        head_dim: int,
        grouping: str = "contiguous",
        lower: torch.Tensor | None = None,
        upper: torch.Tensor | None = None,
        name: str | None = None,
    ):
        codebooks = torch.as_tensor(codebooks).to(torch.float16).float()
        if codebooks.dim() != 3:
            raise ValueError(f"RVQ codebooks must be [depth, codes, group], got shape {tuple(codebooks.shape)}")
        depth, size, group = codebooks.shape
        if size < 2 or size & (size - 1) or size > 1 << 16:
            raise ValueError(f"RVQ codebook size must be a power of two in 2..65536, got {size}")
        self.codebooks = codebooks
        self._search = prepare_search(codebooks)
        self.depth, self.size, self.group = depth, size, group
        self.code_bits = size.bit_length() - 1
        self.head_dim = head_dim
        self.grouping = check_grouping(grouping)
        self.perm = group_permutation(head_dim, group, grouping)
        if (lower is None) != (upper is None):
            raise ValueError("outlier thresholds need both lower and upper")
        self.lower = None if lower is None else torch.as_tensor(lower).to(torch.float16).float()
        self.upper = None if upper is None else torch.as_tensor(upper).to(torch.float16).float()
        self.name = name or f"rvq-d{depth}-c{size}-g{group}-{grouping}" + ("-outliers" if lower is not None else "")

    # -- state ----------------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        tensors = {"codebooks": self.codebooks.to(torch.float16)}
        if self.lower is not None:
            tensors |= {"lower": self.lower.to(torch.float16), "upper": self.upper.to(torch.float16)}
        return {"head_dim": self.head_dim, "grouping": self.grouping, "name": self.name}, tensors

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "RVQCodec":
        return cls(tensors["codebooks"], lower=tensors.get("lower"), upper=tensors.get("upper"), **config)

    def shared_nbytes(self) -> int:
        thresholds = 0 if self.lower is None else 2 * self.lower.numel() * 2
        return self.codebooks.numel() * 2 + thresholds

    def set_codebooks(self, codebooks: torch.Tensor) -> None:
        """Replace the codebooks (fine-tuning's EMA updates), rounded to fp16 as stored."""
        if codebooks.shape != self.codebooks.shape:
            raise ValueError(f"codebooks shape {tuple(codebooks.shape)} != {tuple(self.codebooks.shape)}")
        self.codebooks = codebooks.detach().to(torch.float16).float()
        self._search = prepare_search(self.codebooks)

    # -- the pieces encode is made of (training and fine-tuning reuse them) -----------------------
    def split_outliers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [..., heads, tokens, head_dim] -> (x clamped to the thresholds, bool mask of outliers or None)."""
        if self.lower is None:
            return x, None
        if x.dim() < 3 or x.shape[-3] != self.lower.shape[0]:
            raise ValueError(f"outlier thresholds are per KV head ({self.lower.shape[0]}); expected x [..., heads, tokens, "
                             f"head_dim], got shape {tuple(x.shape)}")
        lower, upper = self.lower[:, None, :], self.upper[:, None, :]
        mask = (x < lower) | (x > upper)
        return torch.minimum(torch.maximum(x, lower), upper), mask

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., head_dim] -> (group vectors [..., n, g] of x / scale, scale [..., 1] fp16)."""
        scale = token_scale(x)
        return to_groups(x / scale.float(), self.perm, self.group), scale

    def denormalize(self, groups: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Group vectors [..., n, g] and scale [..., 1] -> x [..., head_dim]."""
        return from_groups(groups, self.perm) * scale.float()

    # -- codec interface ------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Encoded:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"RVQ codec made for head_dim {self.head_dim}, got vectors of {x.shape[-1]}")
        x = x.float()
        dense, mask = self.split_outliers(x)
        groups, scale = self.normalize(dense)
        codes = residual_encode(groups.reshape(-1, self.group), self.codebooks, prepared=self._search)  # [rows * n, D]
        codes = codes.view(*x.shape[:-1], -1)  # [..., tokens, n * D]
        tensors = {"codes": packing.pack(codes, self.code_bits), "scale": scale}
        if mask is not None:
            tensors |= sparse.encode_outliers(x, mask, "token_head")
        return Encoded(tensors, tuple(x.shape))

    def decode(self, enc: Encoded) -> torch.Tensor:
        shape = enc.shape
        n = self.head_dim // self.group
        codes = packing.unpack(enc.tensors["codes"], self.code_bits, n * self.depth)  # [..., tokens, n * D]
        groups = residual_decode(codes.reshape(-1, self.depth), self.codebooks)
        x = self.denormalize(groups.view(*shape[:-1], n, self.group), enc.tensors["scale"])
        return sparse.apply_outliers(x, enc.tensors, "token_head")

    def slice_tokens(self, enc: Encoded, start: int, stop: int) -> Encoded:
        shape = token_range(enc.shape, start, stop)
        t = enc.tensors  # codes [..., tokens, row bytes], scale [..., tokens, 1]
        out = {"codes": t["codes"][..., start:stop, :], "scale": t["scale"][..., start:stop, :]}
        if "outlier_values" in t:
            out |= sparse.slice_outliers(t, enc.shape[-2], start, stop)
        return Encoded(out, shape)

    def layout(self) -> StorageLayout:
        parts = {"codes": "codes", "scale": "scales"}
        if self.lower is not None:
            parts |= dict.fromkeys(sparse.OUTLIER_NAMES, "outliers")
        return StorageLayout(parts, None if self.lower is None else "token_head")
