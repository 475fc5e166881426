"""Encoded blocks of one layer's keys or values, appended and never re-encoded.

A block is what a codec's `encode` returned for x [batch, heads, tokens, head_dim]. Blocks of the
same layout (same x shape, tensor names, dtypes and trailing tensor dims, same meta) are kept
in one *run*, per tensor one buffer that blocks are concatenated into along dim 0, with spare
capacity (grown by 1/256 of what it holds: under 0.4% spare; appends stay amortized O(1) per row, each appended
row paying for the copy of about 256 rows). A run decodes in one codec call: the
codec sees the blocks as one batch of `blocks * batch` rows, [blocks * batch, heads, tokens,
head_dim], block-major. That is what `encode` would have produced for the blocks stacked along
the batch dim for every codec whose tensors are batch-major (leading batch dim, or flat
row-major lists such as sparse outliers); the first time a codec's blocks are stacked the store
checks it (decoding together == decoding apart), and keeps one run per block otherwise.

A codec whose storage is token-major (`Codec.split_tokens`: kvpack's mixed-width presets at batch 1) has
every block stored as one-token blocks, so a prompt and the decode steps after it share one run (one set of
buffers and bookkeeping per layer, and the kernels read the run as one block).

The layout is paged: block i of a run is a contiguous slice of every buffer, so a packed
attention kernel can walk runs block by block.

Memory: a block's tensors live in the run buffers only. A run starts from the encoded tensors
themselves when they own exactly their storage (no copy), and the store remembers its newest block
by its index in the last run, not by a second reference to its tensors.
"""
from __future__ import annotations

import sys
from array import array
from itertools import accumulate

import torch

from kvpack.codecs import Codec, Encoded, StorageLayout, sparse
from kvpack.errors import MethodError

_DERIVED = ("outlier_values", "outlier_indices")  # block lengths follow from "outlier_counts"


def block_rows(enc: Encoded, blocks: int) -> dict[str, list[int]]:
    """Dim-0 rows of each of the `blocks` blocks in enc (x [blocks * B, H, T, D], block-major), per tensor: an
    equal share of every tensor, except the sparse outlier values and indices, whose blocks have as many rows as
    their `outlier_counts` say."""
    out = {}
    for name, t in enc.tensors.items():
        if name in _DERIVED and blocks > 1:
            counts = enc.tensors["outlier_counts"].to(torch.int64)
            out[sys.intern(name)] = counts.view(blocks, -1).sum(1).tolist()
        elif t.shape[0] % blocks:
            raise ValueError(f"encoded tensor '{name}' of {t.shape[0]} rows does not split into {blocks} blocks")
        else:
            out[sys.intern(name)] = [t.shape[0] // blocks] * blocks
    return out


def signature(enc: Encoded) -> tuple:
    """Layout key: blocks with equal keys can share a run."""
    parts = tuple((n, tuple(enc.tensors[n].shape[1:]), enc.tensors[n].dtype) for n in sorted(enc.tensors))
    return parts, tuple(enc.shape), repr(sorted(enc.meta.items()))


class Run:
    """Blocks of one layout. buffers[name][:used(name)] holds every block's tensor, block after block.

    Bookkeeping is O(1) per block and a few hundred bytes per run: per tensor, the rows in use and, where its
    blocks all have one dim-0 length, that length, both in one int64 array (`_sizes`, indexed through a name ->
    position map shared by every run of the same tensor names); the sparse outlier values and indices (whose
    lengths vary) derive each block's length from the block's `outlier_counts` when asked (`bounds`); any other
    tensor of varying length keeps a growable int64 tensor of block ends (`_ends`). Appending a block grows no
    Python container. `meta` and `block_shape` are shared between runs that have equal ones, never mutated."""

    def __init__(self, block_shape: tuple[int, ...], meta: dict, sig: tuple, buffers: dict[str, torch.Tensor],
                 lengths: dict[str, list[int]]):
        self.block_shape = _shared(tuple(block_shape))  # one block's x: [batch, heads, tokens, head_dim]
        self.meta = _shared_meta(meta)  # `sig` (signature of the first block) is implied by the buffers, shape and meta
        self.buffers = buffers
        self.count = len(next(iter(lengths.values()))) if lengths else 0
        self.edits = 0  # counts changes other than appends (drops, batch maps, compaction), for memos
        self._index = _positions(tuple(buffers))  # name -> position in _sizes (shared)
        self._sizes = array("q", bytes(16 * len(buffers)))  # per tensor: rows in use, rows per block (-1: varying)
        self._ends: dict[str, torch.Tensor] | None = None  # int64 [>= count] block end rows, other varying tensors
        lengths = {n: [int(x) for x in lens] for n, lens in lengths.items()}
        uniform = {n: all(x == lens[0] for x in lens) for n, lens in lengths.items()}
        derive = uniform.get("outlier_counts", False)  # counts rows are fixed by the block shape
        for name, lens in lengths.items():
            i = 2 * self._index[name]
            self._sizes[i] = sum(lens)
            self._sizes[i + 1] = -1
            if derive and name in _DERIVED:
                continue
            if uniform[name]:
                self._sizes[i + 1] = lens[0] if lens else 0
            else:
                self._ends = self._ends or {}
                self._ends[name] = torch.tensor(list(accumulate(lens)), dtype=torch.int64)

    @classmethod
    def start(cls, enc: Encoded, blocks: int = 1) -> "Run":
        """A run of `blocks` blocks (enc: x [blocks * B, H, T, D], block-major, see `block_rows`); it takes over the
        tensors when they own exactly their storage."""
        rows = block_rows(enc, blocks)
        shape = (enc.shape[0] // blocks, *enc.shape[1:])
        return cls(shape, enc.meta, signature(enc), {sys.intern(n): _owned(t) for n, t in enc.tensors.items()}, rows)

    @property
    def signature(self) -> tuple:
        """Layout key of this run's blocks (`signature`), derived from its buffers, block shape and meta."""
        parts = tuple((n, tuple(self.buffers[n].shape[1:]), self.buffers[n].dtype) for n in sorted(self.buffers))
        return parts, self.block_shape, repr(sorted(self.meta.items()))

    def accepts(self, enc: Encoded, blocks: int = 1) -> bool:
        """Whether the `blocks` blocks of `enc` have this run's layout (== `signature(enc) == self.signature`, without
        building it)."""
        if (enc.shape[0] // blocks, *enc.shape[1:]) != self.block_shape or enc.tensors.keys() != self.buffers.keys():
            return False
        if repr(sorted(enc.meta.items())) != repr(sorted(self.meta.items())):
            return False
        return all(t.dtype == self.buffers[n].dtype and t.shape[1:] == self.buffers[n].shape[1:]
                   for n, t in enc.tensors.items())

    @property
    def block_tokens(self) -> int:
        return self.block_shape[-2]

    @property
    def tokens(self) -> int:
        return self.count * self.block_tokens

    def used(self, name: str) -> int:
        """Rows of buffer `name` in use (O(1))."""
        return self._sizes[2 * self._index[name]]

    def _set_used(self, name: str, rows: int) -> None:
        self._sizes[2 * self._index[name]] = rows

    def _block_rows(self, name: str) -> int | None:
        """Dim-0 length of every block of tensor `name` where it is one number, else None."""
        rows = self._sizes[2 * self._index[name] + 1]
        return None if rows < 0 else rows

    def _set_block_rows(self, name: str, rows: int | None) -> None:
        self._sizes[2 * self._index[name] + 1] = -1 if rows is None else rows

    def bounds(self, name: str, blocks: int | None = None) -> list[int]:
        """[0, end of block 0, ..., end of block `blocks` - 1] in rows of tensor `name` (default: every block).
        O(blocks); for outlier values and indices computed from the stored counts."""
        blocks = self.count if blocks is None else blocks
        rows = self._block_rows(name)
        if rows is not None:
            return [i * rows for i in range(blocks + 1)]
        if self._ends and name in self._ends:
            return [0, *self._ends[name][:blocks].tolist()]
        per = self._block_rows("outlier_counts")
        counts = self.buffers["outlier_counts"][: blocks * per].to(torch.int64).view(blocks, per)
        return [0, *torch.cumsum(counts.sum(1), 0).tolist()]

    @property
    def lengths(self) -> dict[str, list[int]]:
        """Dim-0 length of every block, per tensor (derived, O(blocks); `used` and `bounds` are what to call)."""
        out = {}
        for name in self.buffers:
            b = self.bounds(name)
            out[name] = [b[i + 1] - b[i] for i in range(self.count)]
        return out

    def tensor(self, name: str) -> torch.Tensor:
        return self.buffers[name][: self.used(name)]

    def block(self, index: int) -> Encoded:
        """Block `index` as an Encoded of x [batch, heads, tokens, head_dim] (views of the buffers)."""
        tensors = {}
        for name in self.buffers:
            b = self.bounds(name, index + 1)
            tensors[name] = self.buffers[name][b[index]: b[index + 1]]
        return Encoded(tensors, self.block_shape, dict(self.meta))

    def encoded(self) -> Encoded:
        """All blocks as one Encoded of x shape [count * batch, heads, block_tokens, head_dim]."""
        batch, *rest = self.block_shape
        return Encoded({n: self.tensor(n) for n in self.buffers}, (self.count * batch, *rest), dict(self.meta))

    def decode(self, codec: Codec) -> torch.Tensor:
        """-> float tensor [batch, heads, count * block_tokens, head_dim]."""
        batch, heads, tokens, dim = self.block_shape
        x = codec.decode(self.encoded())
        if self.count == 1:
            return x
        return x.reshape(self.count, batch, heads, tokens, dim).permute(1, 2, 0, 3, 4).reshape(batch, heads, -1, dim)

    def append(self, enc: Encoded, blocks: int = 1) -> None:
        """Add the `blocks` blocks of enc (x [blocks * B, H, T, D], block-major) after the others."""
        rows = block_rows(enc, blocks) if blocks > 1 else {n: [t.shape[0]] for n, t in enc.tensors.items()}
        for name, t in enc.tensors.items():
            buf, used, n = self.buffers[name], self.used(name), t.shape[0]
            if used + n > buf.shape[0]:
                grow = max(n, buf.shape[0] // 256)
                extra = torch.empty(grow, *buf.shape[1:], dtype=buf.dtype, device=buf.device)
                buf = self.buffers[name] = torch.cat([buf[:used], extra])
            buf[used:used + n].copy_(t)
            per = rows[name]
            same = self._block_rows(name) == per[0] and per.count(per[0]) == len(per)  # nothing to record
            if not same and not (name in _DERIVED and self._block_rows("outlier_counts") is not None):
                for i, r in enumerate(per):
                    self._note(name, r, self.count + i)
            self._set_used(name, used + n)
        self.count += blocks

    def _note(self, name: str, n: int, index: int) -> None:
        """Record that block `index` (being appended) has `n` rows of tensor `name`."""
        if self._ends and name in self._ends:
            ends = self._ends[name]
            if index >= ends.numel():
                ends = self._ends[name] = torch.cat([ends[:index], ends.new_empty(max(8, index // 8))])
            ends[index] = (ends[index - 1] if index else 0) + n
        elif self._block_rows(name) not in (None, n):
            ends = torch.arange(1, index + 2, dtype=torch.int64) * self._block_rows(name)
            self._set_block_rows(name, None)
            ends[index] = (ends[index - 1] if index else 0) + n
            self._ends = self._ends or {}
            self._ends[name] = ends

    def nbytes(self, name: str, reserved: bool = False) -> int:
        buf = self.buffers[name]
        row = buf.element_size() * (buf[0].numel() if buf.shape[0] else 0)
        rows = buf.shape[0] - self.used(name) if reserved else self.used(name)
        return row * rows

    def compact(self) -> None:
        """Drop spare capacity (before saving)."""
        self.edits += 1
        self.buffers = {n: self.tensor(n).contiguous() for n in self.buffers}
        if self._ends:
            self._ends = {n: e[:self.count].clone() for n, e in self._ends.items()}

    def drop_first(self, blocks: int) -> None:
        self.edits += 1
        cuts = {n: self.bounds(n, blocks)[-1] for n in self.buffers}
        for name, cut in cuts.items():
            self.buffers[name] = self.tensor(name)[cut:].clone()
            self._set_used(name, self.used(name) - cut)
            if self._ends and name in self._ends:
                self._ends[name] = self._ends[name][blocks:self.count] - cut
        self.count -= blocks

    def drop_last(self, blocks: int) -> None:
        self.edits += 1
        keep = self.count - blocks
        for name, rows in [(n, self.bounds(n, keep)[-1]) for n in self.buffers]:
            self._set_used(name, rows)
        self.count = keep

    def map_batch(self, fn, layout: StorageLayout) -> None:
        """Apply fn (acting on dim 0 = batch: a beam reorder, a batch selection or repeat) to every block. Tensors
        lead with the batch dim, except the sparse outliers, which are regrouped by batch row through the
        row kind the codec declares."""
        self.edits += 1
        batch = self.block_shape[0]
        order = fn(torch.arange(batch, device=next(iter(self.buffers.values())).device))  # source row of each new row
        new_batch = int(order.shape[0])
        outliers = [n for n in self.buffers if layout.parts.get(n) == "outliers"]
        for name in self.buffers:
            if name in outliers:
                continue
            if self._block_rows(name) != batch:
                raise ValueError(f"encoded tensor '{name}' does not lead with the batch dim; its codec's layout must "
                                 "declare it (StorageLayout.parts)")
            t = self.tensor(name)
            v = t.reshape(self.count, batch, *t.shape[1:])[:, order]
            self.buffers[name] = v.reshape(self.count * new_batch, *t.shape[1:]).contiguous()
            self._set_block_rows(name, new_batch)
            self._set_used(name, self.count * new_batch)
        if outliers:
            self._map_outliers(order, layout)
        self.block_shape = _shared((new_batch, *self.block_shape[1:]))

    def _map_outliers(self, order: torch.Tensor, layout: StorageLayout) -> None:
        """Regroup the sparse outliers of every block by the new batch rows `order` (vectorized over blocks)."""
        batch, heads, tokens, _ = self.block_shape
        rows = tokens if layout.outlier_rows == "token_all" else heads * tokens  # outlier rows per batch item
        counts = self.tensor("outlier_counts")
        per_row = counts.long().view(self.count, batch, rows)
        seg = per_row.sum(-1)  # [count, batch] outliers of each (block, batch item)
        starts = (torch.cumsum(seg.flatten(), 0) - seg.flatten()).view(self.count, batch)
        new_seg = seg[:, order]
        index = sparse.segment_index(starts[:, order].flatten(), new_seg.flatten())
        for name in ("outlier_values", "outlier_indices"):
            self.buffers[name] = self.tensor(name)[index].contiguous()
            self._set_used(name, self.buffers[name].shape[0])
            self._set_block_rows(name, None)  # derived from the counts
            if self._ends:
                self._ends.pop(name, None)
        self.buffers["outlier_counts"] = per_row[:, order].reshape(-1).to(counts.dtype).contiguous()
        self._set_block_rows("outlier_counts", len(order) * rows)
        self._set_used("outlier_counts", self.buffers["outlier_counts"].shape[0])


_SHARED: dict = {}  # equal block shapes, metas and name -> position maps of runs, held once
_SHARED_MAX = 4096  # past this many (a server seeing ever new prompt lengths), new values are no longer shared


def _share(key: tuple, value):
    """The object kept for `key` (`value` the first time), so that what many runs have in common is held once."""
    found = _SHARED.get(key)
    if found is None:
        found = value
        if len(_SHARED) < _SHARED_MAX:
            _SHARED[key] = value
    return found


def _shared(value):
    """One object for equal (hashable) values, e.g. block shapes."""
    return _share(("value", value), value)


def _shared_meta(meta: dict) -> dict:
    """One dict for equal metas (never mutated: `Run.meta` is read only)."""
    return _share(("meta", repr(sorted(meta.items()))), dict(meta))


def _positions(names: tuple[str, ...]) -> dict[str, int]:
    """name -> position of each of `names` (one dict per tuple of names)."""
    return _share(("positions", names), {n: i for i, n in enumerate(names)})


def _owned(t: torch.Tensor) -> torch.Tensor:
    """t itself if it is contiguous and its storage holds nothing else, else a compact copy."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


class BlockStore:
    """The encoded middle of one layer's keys or values: runs of blocks, oldest first."""

    __slots__ = ("runs", "_newest")

    def __init__(self) -> None:
        self.runs: list[Run] = []
        self._newest = -1  # the newest block is block `_newest` of the last run (-1: dropped since; a new run follows)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.runs)

    def append(self, enc: Encoded, codec: Codec) -> None:
        """Add one encoded block of x [batch, heads, tokens, head_dim] after the others."""
        if any(t.dim() == 0 for t in enc.tensors.values()):
            raise ValueError(f"codec '{codec.name}' returned a 0-dim tensor; encoded tensors need a leading dim")
        split = codec.split_tokens(enc)  # one-token blocks: prompts and decode steps share one run
        enc, blocks = (enc, 1) if split is None else (split, enc.shape[-2])
        last = self.runs[-1] if self.runs else None
        # Blocks of one layout stack along dim 0 and decode as one (the Codec contract, StorageLayout).
        if last is not None and last.accepts(enc, blocks) and self._newest_in(last):
            last.append(enc, blocks)
        else:
            last = Run.start(enc, blocks)
            self.runs.append(last)
        self._newest = last.count - 1

    def _newest_in(self, run: Run) -> bool:
        """Whether the newest block appended is still the last block of `run` (nothing dropped since)."""
        return self._newest >= 0 and run is self.runs[-1] and self._newest == run.count - 1

    def decode(self, codec: Codec) -> torch.Tensor | None:
        """All blocks decoded, float [batch, heads, tokens, head_dim]; None when empty."""
        parts = [r.decode(codec) for r in self.runs if r.count]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def drop_before(self, tokens: int) -> int:
        """Drop whole blocks lying entirely in the first `tokens` tokens; returns tokens dropped."""
        dropped = 0
        while self.runs:
            run = self.runs[0]
            whole = min(run.count, (tokens - dropped) // run.block_tokens)
            if whole <= 0:
                break
            dropped += whole * run.block_tokens
            if whole < run.count:
                run.drop_first(whole)
                break
            self.runs.pop(0)
        if not self.runs:
            self._newest = -1
        return dropped

    def drop_after(self, keep: int, codec: Codec) -> None:
        """Keep only the first `keep` tokens; a block that the cut falls inside keeps its first tokens
        (`codec.slice_tokens`), or the cut is refused when the codec cannot cut its storage there."""
        while self.runs and self.tokens > keep:
            run = self.runs[-1]
            excess = self.tokens - keep
            if excess >= run.tokens:
                self.runs.pop()
                continue
            run.drop_last(excess // run.block_tokens)
            cut = excess % run.block_tokens
            if cut:
                block = run.block(run.count - 1)
                part = codec.slice_tokens(block, 0, run.block_tokens - cut)
                if part is None:
                    raise MethodError(
                        f"'{codec.name}' cannot drop {cut} tokens from inside an encoded block of {run.block_tokens} "
                        "tokens (its storage is not cut per token); give the method a recent window that covers the "
                        "tokens to crop (e.g. ':recent16') for assisted decoding"
                    )
                part = Encoded({n: t.clone() for n, t in part.tensors.items()}, part.shape, dict(part.meta))
                run.drop_last(1)
                if not run.count:
                    self.runs.pop()
                self.runs.append(Run.start(part))
        self._newest = -1

    def map_batch(self, fn, layout: StorageLayout) -> None:
        for run in self.runs:
            run.map_batch(fn, layout)
        self._newest = -1
