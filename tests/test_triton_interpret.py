"""Triton kernels run by the Triton interpreter on the CPU (TRITON_INTERPRET=1), against the torch reference.

Tiny shapes: blocks of a few tokens, head_dim 16-64, GQA with 3 query rows per KV head, many outliers.
The split-K decode kernels (triton_decode) are compared with decode-then-attend over the whole layer;
the per-run kernels (triton_attention) with kernels.reference. Skipped cleanly when triton is not installed.
"""
from __future__ import annotations

import importlib
import sys

from triton_interpreter import use_interpreter

use_interpreter()  # before triton decorates the kernels

import pytest
import torch

pytest.importorskip("triton")

from kvpack.cache.stream import TokenStream  # noqa: E402
from kvpack.codecs.nuq import NuqCodec  # noqa: E402
from kvpack.codecs.rvq import RVQCodec  # noqa: E402
from kvpack.kernels import reference  # noqa: E402
from kvpack.kernels.rope import RopeSlice  # noqa: E402

if "kvpack.kernels.triton_attention" in sys.modules:  # imported without the interpreter: decorate again
    importlib.reload(sys.modules["kvpack.kernels.triton_attention"])
for _name in ("kvpack.kernels.triton_encode", "kvpack.kernels.triton_device", "kvpack.kernels.triton_mixed",
              "kvpack.kernels.triton_tq", "kvpack.kernels.triton_decode"):  # in dependency order
    if _name in sys.modules:
        importlib.reload(sys.modules[_name])
from kvpack.kernels import triton_attention, triton_decode, triton_encode  # noqa: E402
from kvpack.hf.rope import apply_rope  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
H, GROUPS = 2, 3


def _stream(codec, tokens: int, dim: int, blocks: list[int], seed: int = 0) -> TokenStream:
    """A TokenStream holding `tokens` encoded tokens appended in calls of the sizes in `blocks` (several runs)."""
    g = torch.Generator().manual_seed(seed)
    stream = TokenStream(codec, 0, 0)
    added = calls = 0
    while added < tokens:
        n = min(blocks[calls % len(blocks)], tokens - added)
        stream.append(torch.randn(2, H, n, dim, generator=g) * 1.5)
        added += n
        calls += 1
    return stream


def _rope(tokens: int, dim: int) -> RopeSlice:
    """cos/sin rows for 2 batch rows: positions 0.. and 7.. (as with left padding)."""
    inv = 1e4 ** (-torch.arange(0, dim, 2).float() / dim)
    pos = torch.stack([torch.arange(tokens), torch.arange(tokens) + 7]).float()
    freqs = pos[:, :, None] * inv  # [2, tokens, dim/2]
    return RopeSlice(torch.stack([freqs.cos(), freqs.sin()], 2).contiguous(), dim, True)


def nuq_codecs(bits: int, dim: int, frac: float, per_head: bool = False, span: str = "all", seed: int = 0,
               csc: bool = False):
    from test_attention import CscKeys  # keys with column-wise outliers: the other sparse layout

    g = torch.Generator().manual_seed(seed)
    levels = torch.randn(H if per_head else 1, 1 << bits, generator=g).sort(-1).values
    levels = levels / levels.abs().amax(-1, keepdim=True)
    key = (CscKeys if csc else NuqCodec)(levels, "channel", H, dim, frac, zero=0.2 * torch.randn(H, dim, generator=g),
                                         scale=1.0 + torch.rand(H, dim, generator=g))
    value = NuqCodec(levels, "token", H, dim, frac, span=span)
    return key, value


def _compare_runs(stream, codec, dim, rope, keys=True, values=True):
    """Every run: triton key scores and/or value sums == reference, to float32 noise."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, H, GROUPS, dim, generator=g)
    offset = 0
    for run in stream.body.runs:
        n = run.tokens
        if keys:
            part = None if rope is None else rope[offset:offset + n]
            want = torch.zeros(2, H, GROUPS, n)
            got = torch.zeros(2, H, GROUPS, n)
            reference.key_scores(run, codec, q, part, want)
            assert triton_attention.key_scores(run, codec, q, part, got)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if values:
            p = torch.softmax(torch.randn(2, H, GROUPS, n, generator=g), -1)
            want_v = torch.zeros(2, H, GROUPS, dim)
            got_v = torch.zeros(2, H, GROUPS, dim)
            reference.value_accum(run, codec, p, want_v)
            assert triton_attention.value_accum(run, codec, p, got_v)
            torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-5)
        offset += n


@pytest.mark.parametrize("bits,frac", [(2, 0.05), (3, 0.0), (4, 0.05)])
def test_nuq_kernels_match_reference(bits, frac):
    dim = 16
    key, value = nuq_codecs(bits, dim, frac, csc=bits == 3)
    keys = _stream(key, 29, dim, [5, 1, 1, 16])
    values = _stream(value, 29, dim, [5, 1, 1, 16], seed=1)
    assert len(keys.body.runs) >= 3
    _compare_runs(keys, key, dim, _rope(29, dim), values=False)
    _compare_runs(values, value, dim, None, keys=False)


def test_nuq_per_head_codebooks_post_rope_and_span_head():
    dim = 32
    key, value = nuq_codecs(3, dim, 0.03, per_head=True, span="head", seed=3)
    _compare_runs(_stream(key, 19, dim, [7]), key, dim, None, values=False)  # keys stored post-RoPE: no rotation
    _compare_runs(_stream(value, 19, dim, [7], seed=2), value, dim, None, keys=False)


@pytest.mark.parametrize("grouping,codes", [("strided", 2048), ("contiguous", 16)])  # 11-bit codes straddle bytes
def test_rvq_kernels_match_reference(grouping, codes):
    dim = 16
    g = torch.Generator().manual_seed(4)
    books = torch.randn(3, codes, 8, generator=g) * torch.tensor([1.0, 0.3, 0.1])[:, None, None]
    codec = RVQCodec(books, dim, grouping)
    stream = _stream(codec, 14, dim, [4, 1, 8])
    _compare_runs(stream, codec, dim, _rope(14, dim) if grouping == "strided" else None)


def test_unsupported_runs_are_declined():
    """RVQ outliers, odd head_dim or partial RoPE: the kernels say no and the caller uses the reference."""
    dim = 16
    books = torch.randn(2, 16, 8)
    codec = RVQCodec(books, dim, "strided", lower=-torch.ones(H, dim), upper=torch.ones(H, dim))
    stream = _stream(codec, 6, dim, [6])
    run = stream.body.runs[0]
    q = torch.randn(2, H, GROUPS, dim)
    assert not triton_attention.key_scores(run, codec, q, None, torch.zeros(2, H, GROUPS, 6))
    key, _ = nuq_codecs(4, dim, 0.0)
    run = _stream(key, 6, dim, [6]).body.runs[0]
    partial = RopeSlice(_rope(6, dim).cs[..., :4], 8, True)
    assert not triton_attention.key_scores(run, key, q, partial, torch.zeros(2, H, GROUPS, 6))


@pytest.mark.parametrize("bits,frac,span", [(2, 0.03, "all"), (3, 0.03, "head")])
def test_fused_encode_matches_codec(bits, frac, span):
    """The fused append kernel stores exactly what NuqCodec.encode stores (codes, scales, outliers)."""
    dim = 16
    key, value = nuq_codecs(bits, dim, frac, span=span, seed=bits, csc=bits == 2)
    x = torch.randn(2, H, 5, dim, generator=torch.Generator().manual_seed(9)) * 1.7
    for codec in (key, value):
        want = codec.encode(x)
        got = triton_encode.nuq_encode(codec, x)
        assert got is not None
        assert set(got.tensors) == set(want.tensors) and got.shape == want.shape
        for name, t in want.tensors.items():
            assert got.tensors[name].dtype == t.dtype, name
            assert torch.equal(got.tensors[name], t), name


# ------------------------------------------------------------------------------ split-K flash-decoding (one layer)
B, DIM = 2, 64


def _layer(bits: int, frac: float, span: str = "all", per_head: bool = False, blocks=(9, 1, 20), tokens: int = 33,
           seed: int = 0):
    """(key codec, value codec, keys stream, values stream): 1 fp16 sink token, nuq runs, a 2-token fp16 window."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randn(H if per_head else 1, 1 << bits, generator=g).sort(-1).values
    levels = levels / levels.abs().amax(-1, keepdim=True)
    key = NuqCodec(levels, "channel", H, DIM, frac, zero=0.2 * torch.randn(H, DIM, generator=g),
                   scale=1.0 + torch.rand(H, DIM, generator=g))
    value = NuqCodec(levels, "token", H, DIM, frac, span=span)
    ks, vs = TokenStream(key, 1, 2), TokenStream(value, 1, 2)
    _grow(ks, vs, tokens, blocks, g)
    return key, value, ks, vs


def _grow(ks, vs, tokens: int, blocks, g) -> None:
    added = i = 0
    while added < tokens:
        n = min(blocks[i % len(blocks)], tokens - added)
        ks.append(torch.randn(B, H, n, DIM, generator=g) * 1.5)
        vs.append(torch.randn(B, H, n, DIM, generator=g))
        added += n
        i += 1


def _positions(total: int, pad: int = 3) -> torch.Tensor:
    """int32 [B, total]: row 0 at 0.., row 1 left-padded by `pad` slots (pads at position 1, then 0..)."""
    row1 = torch.cat([torch.ones(pad, dtype=torch.long), torch.arange(total - pad)])
    return torch.stack([torch.arange(total) + 5, row1]).to(torch.int32)


INV_FREQ = 1e4 ** (-torch.arange(0, DIM, 2).float() / DIM)


def _decode_then_attend(ks, vs, query, scaling, positions=None, mask=None, softcap=None, rope_scaling=1.0):
    """The layer's attention from its decoded keys/values: [B, Q, Hq, D] float32."""
    k, v = ks.read(torch.float32), vs.read(torch.float32)
    total = k.shape[2]
    if positions is not None:
        ang = positions[:, :total].double()[:, :, None] * INV_FREQ.double()
        emb = torch.cat([ang, ang], -1)
        k = apply_rope(k, (emb.cos() * rope_scaling).float(), (emb.sin() * rope_scaling).float())
    per = query.shape[1] // H
    s = query.float() @ k.repeat_interleave(per, 1).transpose(-1, -2) * scaling
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    q = query.shape[2]
    if mask is None and q > 1:
        rows = torch.arange(q)[:, None] + total - q
        s = s.masked_fill(torch.arange(total) > rows, float("-inf"))
    elif mask is not None:
        m = mask[..., -total:]
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m
    return (torch.softmax(s, -1) @ v.repeat_interleave(per, 1)).transpose(1, 2)


def _query(queries: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(B, H * 3, queries, DIM, generator=torch.Generator().manual_seed(seed))


def _check(got, want, dot16: bool) -> None:
    assert got is not None and got.shape == want.shape
    scale = want.abs().max()
    tol = 3e-3 if dot16 else 2e-5
    assert (got.float() - want).abs().max() <= tol * scale, float((got.float() - want).abs().max() / scale)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_split_k_matches_decode_then_attend(bits):
    """RoPE from positions (left padding masked), GQA 3 x 1, outliers in keys and values, several runs and splits."""
    key, value, ks, vs = _layer(bits, 0.05, seed=bits)
    assert len(ks.body.runs) >= 2 and ks.head is not None and ks.tail is not None
    assert ks.body.runs[0].__dict__.get("_kvpack_triton_cells") is None
    total = ks.stored
    pos = _positions(total)
    mask = torch.ones(B, 1, 1, total + 4, dtype=torch.bool)  # longer than the stored tokens: the last ones count
    mask[1, ..., 4:7] = False  # batch row 1: 3 padding slots after the sink
    query = _query(1)
    got = triton_decode.stream_attention(ks, vs, key, value, query, mask, DIM ** -0.5, positions=pos,
                                         inv_freq=INV_FREQ, dot16=False, split_tokens=32)
    _check(got, _decode_then_attend(ks, vs, query, DIM ** -0.5, pos, mask), False)


def test_split_k_fp16_dot_causal_span_head_per_head_levels():
    """fp16 tensor-core operands; 2 query tokens (causal); per-head codebooks; value outliers per (token, head)."""
    key, value, ks, vs = _layer(4, 0.04, span="head", per_head=True, blocks=(20, 1), tokens=26, seed=7)
    total = ks.stored
    pos = _positions(total, pad=0)
    query = _query(2)
    got = triton_decode.stream_attention(ks, vs, key, value, query, None, DIM ** -0.5, positions=pos,
                                         inv_freq=INV_FREQ, rope_scaling=1.1, dot16=True, split_tokens=16)
    _check(got, _decode_then_attend(ks, vs, query, DIM ** -0.5, pos, rope_scaling=1.1), True)


def test_split_k_post_rope_additive_mask_softcap_and_appends():
    """Keys stored post-RoPE, an additive float mask, softcapping; then more blocks appended: the outlier pointers
    kept on the run are extended, and the answer still matches."""
    key, value, ks, vs = _layer(2, 0.06, blocks=(7, 1), tokens=12, seed=3)
    query = _query(1, seed=9)

    def attend():
        total = ks.stored
        mask = torch.zeros(B, 1, 1, total)
        mask[0, ..., 2] = float("-inf")
        mask[1, ..., :] = torch.linspace(-1, 0, total)
        got = triton_decode.stream_attention(ks, vs, key, value, query, mask, 0.2, softcap=3.0, dot16=False)
        _check(got, _decode_then_attend(ks, vs, query, 0.2, mask=mask, softcap=3.0), False)

    def rows_seen() -> int:
        return sum(r.__dict__["_kvpack_triton_cells"]["rows"] for r in ks.body.runs if "_kvpack_triton_cells" in r.__dict__)

    attend()
    before = rows_seen()
    _grow(ks, vs, 3, (1,), torch.Generator().manual_seed(4))
    attend()
    assert rows_seen() > before


def test_cell_pointers_match_a_recount():
    """Per-(row, head) CSR pointers of "token_all" outliers == counting every stored outlier's row and head."""
    from kvpack.kernels.layout import nuq_view

    key, _, ks, _ = _layer(3, 0.08, blocks=(5, 1, 1), tokens=10, seed=2)
    for run in ks.body.runs:
        view = nuq_view(run, key)
        o = view.outliers
        assert o.mode == 1
        ptr = triton_decode._cell_pointers(run, view).long()
        rows = torch.repeat_interleave(torch.arange(o.counts.numel()), o.counts.long())
        cells = rows * H + o.positions.long() // DIM
        counts = torch.bincount(cells, minlength=o.counts.numel() * H)
        assert torch.equal(ptr[1: counts.numel() + 1] - ptr[: counts.numel()], counts)
        assert int(ptr[counts.numel()]) == o.values.numel()


def test_split_k_declines_what_it_does_not_cover():
    """RVQ runs, head_dim not a power of two, partial rotary: None (the caller takes another path)."""
    books = torch.randn(2, 16, 8)
    codec = RVQCodec(books, 16, "strided")
    ks, vs = TokenStream(codec, 0, 0), TokenStream(codec, 0, 0)
    ks.append(torch.randn(1, H, 4, 16))
    vs.append(torch.randn(1, H, 4, 16))
    assert triton_decode.stream_attention(ks, vs, codec, codec, torch.randn(1, H, 1, 16), None, 0.25) is None
    key, value, ks, vs = _layer(4, 0.0, tokens=4, blocks=(4,))
    partial = INV_FREQ[: DIM // 4]
    assert triton_decode.stream_attention(ks, vs, key, value, _query(1), None, 0.1, positions=_positions(ks.stored),
                                          inv_freq=partial) is None
