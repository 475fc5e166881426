"""What the attention kernels read from a BlockStore run: its blocks as strided tensors.

A run (cache_store.Run) holds `count` blocks of x [batch, heads, tokens, head_dim] encoded by one
codec; `run.encoded()` gives every block at once as one Encoded of x [count * batch, heads, tokens,
head_dim], block-major. Token n of the run is token n % T of block n // T. The views below name the
tensors of the two families with fast kernels and check their shapes; a view is None when the run
does not have the expected layout, and attention then takes the generic decode-a-chunk path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpack.codecs import Codec, Encoded
from kvpack.codecs.nuq import NuqCodec
from kvpack.codecs.rvq import RVQCodec
from kvpack.codecs.turboquant import TurboQuantCodec
from kvpack.codecs.packing import packed_length
from kvpack.codecs.sparse import OUTLIER_NAMES


@dataclass
class Outliers:
    """Sparse outliers of a run in the one format (codecs.sparse): fp16 values [nnz], positions [nnz] (column
    within the row), per-row counts [rows] (any int dtype).

    mode: 1 = rows (blk, b, t) over h * D + c ("token_all"), 2 = rows (blk, b, h, t) over c ("token_head").
    """

    values: torch.Tensor
    positions: torch.Tensor
    counts: torch.Tensor
    mode: int = 1


SPARSE_MODES = {"token_all": 1, "token_head": 2}


def sparse_mode(codec: Codec) -> int | None:
    """The kernels' mode number of `codec`'s declared outlier rows (None: no outliers)."""
    rows = codec.layout().outlier_rows
    return None if rows is None else SPARSE_MODES[rows]


@dataclass
class NuqView:
    """One run of NuqCodec blocks. codes uint8 [nblk, B, H, T, D * bits / 8]; the codec's own fp16 state (levels
    [1 | H, 2**bits], Q-Norm, keys' zero and scale [H, 1, D]) is what the C++ kernels read, decoded per call."""

    codes: torch.Tensor
    nblk: int
    batch: int
    heads: int
    tokens: int
    dim: int
    bits: int
    axis: str
    vscale: torch.Tensor | None  # values: fp16 [nblk, B, 1 | H, T]
    vzero: torch.Tensor | None
    span_all: bool
    outliers: Outliers | None
    codec: NuqCodec

    @property
    def run_tokens(self) -> int:
        return self.nblk * self.tokens

    # float32 copies for the Triton kernels, made on first use on the codes' device and held by the codec
    @property
    def levels(self) -> torch.Tensor:
        """fp32 [1 | H, 2**bits], the decoded levels (Q-Norm applied)."""
        dev, codec = self.codes.device, self.codec
        return _codec_constants(codec, f"levels_{dev}", lambda: codec.decode_levels.to(dev).float().contiguous(),
                                codec.levels)

    @property
    def kscale(self) -> torch.Tensor | None:
        """Keys: fp32 [H, D]; values: None."""
        return self._ranges("scale")

    @property
    def kzero(self) -> torch.Tensor | None:
        return self._ranges("zero")

    def _ranges(self, name: str) -> torch.Tensor | None:
        if self.axis != "channel":
            return None
        dev, source = self.codes.device, getattr(self.codec, name)
        return _codec_constants(self.codec, f"k{name}_{dev}",
                                lambda: source.reshape(self.heads, self.dim).to(dev).float().contiguous(), source)


@dataclass
class RvqView:
    """One run of RVQCodec blocks. codes uint8 [nblk, B, H, T, packed bytes of n_groups * depth codes]."""

    codes: torch.Tensor
    nblk: int
    batch: int
    heads: int
    tokens: int
    dim: int
    scale: torch.Tensor  # fp16 [nblk, B, H, T]
    books: torch.Tensor  # fp32 [depth, C, group]
    books16: torch.Tensor  # the same values in fp16 (the codec's codebooks are fp16-rounded)
    code_bits: int
    inv_perm: torch.Tensor | None  # int32 [D]: channel c = group-order element inv_perm[c]; None if identity
    outliers: Outliers | None  # mode 2: rows (blk, b, h, t) over channels

    @property
    def run_tokens(self) -> int:
        return self.nblk * self.tokens


@dataclass(slots=True)
class MixedGroup:
    """The channels of one width in a run of mixed-width NuqCodec blocks. Levels, Q-Norm and ranges stay in the
    codec, fp16, held once per model: the C++ kernels expand them per call, `levels`/`scale`/`zero` on demand."""

    bits: int
    n: int  # members (channels of this width), a multiple of 8
    codes: torch.Tensor  # uint8 [nblk, B, tokens * n * bits / 8]: n codes per token, byte-aligned
    codec: NuqCodec

    @property
    def cols(self) -> torch.Tensor:
        """int64 [n]: channel h * head_dim + c of each member, ascending (`NuqCodec.columns_of`, made when asked)."""
        return self.codec.columns_of(self.bits)

    @property
    def levels(self) -> torch.Tensor:
        """fp32 [n, 2**bits]: the members' decoded levels (Q-Norm applied)."""
        return self.codec.decode_levels[self.cols.long(), : 1 << self.bits]

    @property
    def scale(self) -> torch.Tensor | None:
        """keys: fp32 [n] per-channel scale (None for values)."""
        return None if self.codec.axis != "channel" else self.codec.scale.reshape(-1).float()[self.cols.long()]

    @property
    def zero(self) -> torch.Tensor | None:
        return None if self.codec.axis != "channel" else self.codec.zero.reshape(-1).float()[self.cols.long()]


@dataclass
class MixedNuqView:
    """One run of NuqCodec blocks with per-channel bit widths (`channel_bits`), one group per width."""

    groups: list[MixedGroup]
    nblk: int
    batch: int
    heads: int
    tokens: int
    dim: int
    axis: str
    vscale: torch.Tensor | None  # values: fp16 [nblk, B, 1 | H, T]
    vzero: torch.Tensor | None
    outliers: Outliers | None

    @property
    def run_tokens(self) -> int:
        return self.nblk * self.tokens


@dataclass
class TqView:
    """One run of TurboQuantCodec blocks (no QJL sketch, no center). codes_hi uint8 [nblk, B, H, T, bytes] of the
    first `high_count` rotated coordinates (None if there are none), codes_lo the rest (None if none)."""

    codes_hi: torch.Tensor | None
    codes_lo: torch.Tensor | None
    nblk: int
    batch: int
    heads: int
    tokens: int
    dim: int
    high: int
    low: int
    high_count: int
    levels_hi: torch.Tensor  # fp32 [2**high] (any fp32 tensor when high_count == 0)
    levels_lo: torch.Tensor  # fp32 [2**low]
    norm: torch.Tensor  # fp16 [nblk, B, H, T]
    rotation: torch.Tensor  # fp32 [D, D], row i = R e_i

    @property
    def run_tokens(self) -> int:
        return self.nblk * self.tokens


def run_tensors(run) -> dict[str, torch.Tensor]:
    """Every block's tensors (run.encoded().tensors); the run keeps its used lengths (O(1) per step)."""
    return {n: run.buffers[n][: run.used(n)] for n in run.buffers}


def run_encoded(run) -> tuple[Encoded, tuple[int, int, int, int], int]:
    """(every block as one Encoded of x [count * B, H, T, D], one block's x shape [B, H, T, D], block count)."""
    batch, *rest = run.block_shape
    enc = Encoded(run_tensors(run), (run.count * batch, *rest), dict(run.meta))
    return enc, tuple(run.block_shape), run.count


def _codec_constants(codec, name: str, build, source: torch.Tensor | None = None):
    """Per-codec tensors the kernels read (levels, ranges, codebooks), built once per device and per source
    tensor (a codec whose codebooks are replaced, as fine-tuning does, gets new ones)."""
    store = codec.__dict__.setdefault("_kvpack_kernel_constants", {})
    key = (name, None if source is None else (id(source), source._version))
    if key not in store:
        store[key] = build()
    return store[key]


def block_chunks(run, max_tokens: int, codec: Codec | None = None, start: int = 0, stop: int | None = None):
    """Yield (first run token, Encoded) pieces covering run tokens start..stop-1 (default: all), in order, each of
    at most `max_tokens` tokens where storage allows: whole blocks together (x [blocks * B, H, T, D], block-major),
    or one block's token range cut by `codec.slice_tokens` (x [B, H, n, D]) where a block is larger than
    `max_tokens` or only partly wanted. A block the codec cannot cut (or with no codec) comes whole
    (x [B, H, T, D] from its first token): the caller keeps the tokens it wants."""
    enc, (batch, heads, tokens, dim), count = run_encoded(run)
    stop = count * tokens if stop is None else stop
    if start == 0 and stop == count * tokens and (count * tokens <= max_tokens or (codec is None and count == 1)):
        yield 0, enc
        return
    bounds = {n: run.bounds(n, count) for n in enc.tensors}

    def blocks(i: int, j: int) -> Encoded:
        tensors = {n: t[bounds[n][i]: bounds[n][j]] for n, t in enc.tensors.items()}
        return Encoded(tensors, ((j - i) * batch, heads, tokens, dim), dict(enc.meta))

    per = max(1, max_tokens // max(tokens, 1))
    pos = start
    while pos < stop:
        first = pos // tokens
        if pos == first * tokens and (tokens <= max_tokens or codec is None) and (first + 1) * tokens <= stop:
            last = min(count, first + per, max(first + 1, stop // tokens))
            yield pos, blocks(first, last)
            pos = last * tokens
            continue
        end = min(stop, (first + 1) * tokens, pos + max_tokens)
        part = None if codec is None else codec.slice_tokens(blocks(first, first + 1), pos - first * tokens,
                                                             end - first * tokens)
        if part is None:  # storage not cut per token here: the whole block
            yield first * tokens, blocks(first, first + 1)
            pos = (first + 1) * tokens
        else:
            yield pos, part
            pos = end


def _outliers(t: dict, mode: int | None) -> Outliers | None:
    if mode is None or not all(k in t for k in OUTLIER_NAMES):
        return None
    return Outliers(*(t[k].contiguous() for k in OUTLIER_NAMES), mode=mode)


def run_key(run, codec: Codec) -> tuple:
    """What a view of a run depends on: its codec and blocks (a view is stale when this changes). Buffers change only
    where blocks do: an append changes `count` (and may reallocate), every other change counts in `edits`."""
    return id(codec), run.count, run.edits


def _cached(run, codec: Codec, kind: str, build):
    """A view stored on the run, one per kind (a caller may ask for several kinds of one run), rebuilt when blocks
    are added or dropped or buffers reallocated; on the CPU not stored (`kernels.cpu` keeps the kernel's packed
    arguments instead, far smaller than a view's Python objects)."""
    if next(iter(run.buffers.values())).device.type == "cpu":
        return build(run, codec)
    key = run_key(run, codec)
    memo = run.__dict__.setdefault("_kvpack_views", {})
    hit = memo.get(kind)
    if hit is not None and hit[0] == key:
        return hit[1]
    view = build(run, codec)
    memo[kind] = (key, view)
    return view


def view_tensors(view) -> list[torch.Tensor]:
    """Every tensor a kernel view points at (its fields, width groups and outliers)."""
    out, todo = [], [view]
    while todo:
        o = todo.pop()
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, (list, tuple)):
            todo += list(o)
        elif isinstance(o, (Outliers, MixedGroup, MixedNuqView, NuqView, RvqView, TqView)):
            todo += [getattr(o, f) for f in o.__dataclass_fields__ if f != "codec"]
    return out


def nuq_view(run, codec: Codec) -> NuqView | None:
    """The kernel view of a run of NuqCodec blocks, or None (per-channel widths: `mixed_view`)."""
    if not isinstance(codec, NuqCodec) or codec.channel_bits is not None:
        return None
    return _cached(run, codec, "nuq", _nuq_view)


def rvq_view(run, codec: Codec) -> RvqView | None:
    """The kernel view of a run of RVQCodec blocks, or None."""
    if not isinstance(codec, RVQCodec):
        return None
    return _cached(run, codec, "rvq", _rvq_view)


def mixed_view(run, codec: Codec) -> MixedNuqView | None:
    """The kernel view of a run of mixed-width NuqCodec blocks, or None (0-bit channels, or a width holding a number
    of channels that is not a multiple of 8, have no kernel)."""
    if not isinstance(codec, NuqCodec) or codec.channel_bits is None:
        return None
    return _cached(run, codec, "mixed", _mixed_view)


def _value_ranges(t: dict, nblk: int, batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-token value scale and zero of a run (fp16 [count * B, 1 | H, T, 1]) as [nblk, B, 1 | H, T], or None."""
    scale, zero = t.get("scale"), t.get("zero")
    if scale is None or zero is None or scale.dtype != torch.float16 or scale.shape[-1] != 1 or scale.shape[-2] != tokens:
        return None
    return (scale.contiguous().view(nblk, batch, scale.shape[1], tokens),
            zero.contiguous().view(nblk, batch, zero.shape[1], tokens))


def _mixed_view(run, codec: NuqCodec) -> MixedNuqView | None:
    enc, (batch, heads, tokens, dim), nblk = run_encoded(run)
    t = enc.tensors
    if dim % 8 or int(codec.channel_bits.min()) < 1 or codec.outlier_scope != "vector":
        return None
    mode = sparse_mode(codec)
    if "outlier_values" in t and mode is None:
        return None
    half = torch.float16
    fp16 = [codec.level_data] + ([codec.scale, codec.zero] if codec.axis == "channel" else []) + (
        [codec.qnorm] if codec.qnorm is not None else [])
    if codec.channel_bits.numel() != heads * dim or any(t.dtype != half or not t.is_contiguous() for t in fp16):
        return None
    groups = []
    for bits, n in codec.width_counts():
        codes = t.get(f"codes{bits}")
        if n % 8 or codes is None or codes.dtype != torch.uint8 or tuple(codes.shape) != (nblk * batch, tokens * n * bits // 8):
            return None
        groups.append(MixedGroup(bits, n, codes.contiguous().view(nblk, batch, -1), codec))
    view = MixedNuqView(groups=groups, nblk=nblk, batch=batch, heads=heads, tokens=tokens, dim=dim, axis=codec.axis,
                        vscale=None, vzero=None, outliers=_outliers(t, mode))
    if codec.axis == "token":
        ranges = _value_ranges(t, nblk, batch, tokens)
        if ranges is None:
            return None
        view.vscale, view.vzero = ranges
    return _as_one_block(view)


def _as_one_block(view: MixedNuqView) -> MixedNuqView:
    """A run of one-token blocks of batch 1 (`Codec.split_tokens`) seen as one block of `nblk` tokens: every tensor
    is token-major (codes, one value range per token, outlier rows per token), so this changes only the shapes."""
    if view.batch != 1 or view.tokens != 1 or view.nblk == 1:
        return view
    if (view.vscale is not None and view.vscale.shape[2] != 1) or (view.outliers is not None and view.outliers.mode != 1):
        return view
    tokens = view.nblk
    for g in view.groups:
        g.codes = g.codes.view(1, 1, -1)
    if view.vscale is not None:
        view.vscale, view.vzero = view.vscale.view(1, 1, 1, tokens), view.vzero.view(1, 1, 1, tokens)
    view.nblk, view.tokens = 1, tokens
    return view


def tq_view(run, codec: Codec) -> TqView | None:
    """The kernel view of a run of TurboQuantCodec blocks, or None (QJL sketches and centers have no kernel)."""
    if not isinstance(codec, TurboQuantCodec):
        return None
    return _cached(run, codec, "tq", _tq_view)


def _tq_view(run, codec: TurboQuantCodec) -> TqView | None:
    enc, (batch, heads, tokens, dim), nblk = run_encoded(run)
    codec = codec.bind(dim)
    if codec.qjl or codec.center is not None or dim % 8 or dim > 1024:
        return None
    t = enc.tensors
    norm = t.get("norm")
    if norm is None or norm.dtype != torch.float16 or tuple(norm.shape) != (nblk * batch, heads, tokens, 1):
        return None
    parts = {}
    for name, width, cols in codec._parts():
        codes = t.get(name)
        row = packed_length(cols.stop - cols.start, width)
        if codes is None or codes.dtype != torch.uint8 or tuple(codes.shape) != (nblk * batch, heads, tokens, row):
            return None
        parts[name] = codes.contiguous().view(nblk, batch, heads, tokens, row)
    dev = norm.device
    levels = {w: _codec_constants(codec, f"levels{w}_{dev}", lambda w=w: lv.to(dev).float().contiguous(), lv)
              for w, lv in codec.levels.items()}
    rotation = _codec_constants(codec, f"rotation_{dev}",
                                lambda: codec.rotation.rotate(torch.eye(dim)).float().contiguous().to(dev))
    low = codec.low if codec.high_count < dim else codec.high
    return TqView(
        codes_hi=parts.get("codes_hi"), codes_lo=parts.get("codes_lo"), nblk=nblk, batch=batch, heads=heads,
        tokens=tokens, dim=dim, high=codec.high if codec.high_count else low, low=low, high_count=codec.high_count,
        levels_hi=levels.get(codec.high, levels[low]), levels_lo=levels[low],
        norm=norm.contiguous().view(nblk, batch, heads, tokens), rotation=rotation,
    )


def _nuq_view(run, codec: NuqCodec) -> NuqView | None:
    enc, (batch, heads, tokens, dim), nblk = run_encoded(run)
    t = enc.tensors
    bits = codec.bits
    row = dim * bits // 8
    codes = t.get("codes")
    if dim % 8 or codes is None or tuple(codes.shape) != (nblk * batch, heads, tokens * row) or codes.dtype != torch.uint8:
        return None
    if "outlier_values" in t and codec.outlier_frac <= 0 and codec.outlier_scope != "matrix":
        return None
    if codec.decode_levels.shape[0] not in (1, heads):  # one codebook per layer or per head only
        return None
    if getattr(codec, "channel_bits", None) is not None:  # mixed per-channel widths: not in the kernels
        return None
    mode = sparse_mode(codec)
    if "outlier_values" in t and mode is None:
        return None
    view = NuqView(
        codes=codes.contiguous().view(nblk, batch, heads, tokens, row), nblk=nblk, batch=batch, heads=heads,
        tokens=tokens, dim=dim, bits=bits, axis=codec.axis, vscale=None, vzero=None, span_all=codec.span == "all",
        outliers=_outliers(t, mode), codec=codec,
    )
    if codec.axis != "channel":
        ranges = _value_ranges(t, nblk, batch, tokens)
        if ranges is None:
            return None
        view.vscale, view.vzero = ranges
    return view


def _rvq_view(run, codec: RVQCodec) -> RvqView | None:
    enc, (batch, heads, tokens, dim), nblk = run_encoded(run)
    t = enc.tensors
    n = dim // codec.group
    row = packed_length(n * codec.depth, codec.code_bits)
    codes, scale = t.get("codes"), t.get("scale")
    if codes is None or scale is None or tuple(codes.shape) != (nblk * batch, heads, tokens, row):
        return None
    if scale.dtype != torch.float16 or tuple(scale.shape) != (nblk * batch, heads, tokens, 1):
        return None
    perm = codec.perm
    inv = _codec_constants(codec, f"inv_perm_{codes.device}", lambda: None if torch.equal(perm.cpu(), torch.arange(dim))
                           else torch.argsort(perm.cpu()).to(torch.int32).to(codes.device))
    out = _outliers(t, sparse_mode(codec))
    return RvqView(
        codes=codes.contiguous().view(nblk, batch, heads, tokens, row), nblk=nblk, batch=batch, heads=heads,
        tokens=tokens, dim=dim, scale=scale.contiguous().view(nblk, batch, heads, tokens),
        books=_codec_constants(codec, f"books_{codes.device}", lambda: codec.codebooks.to(codes.device).float().contiguous(),
                               codec.codebooks),
        books16=_codec_constants(codec, f"books16_{codes.device}",
                                 lambda: codec.codebooks.to(codes.device).to(torch.float16).contiguous(), codec.codebooks),
        code_bits=codec.code_bits, inv_perm=inv,
        outliers=out,
    )
