"""Triton kernels run by the Triton interpreter on the CPU (TRITON_INTERPRET=1), against the torch reference.

Tiny shapes: blocks of a few tokens, head_dim 16/32, GQA with 3 query rows per KV head, many outliers.
Skipped cleanly when triton is not installed.
"""
from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels


def _fresh_triton() -> None:
    """triton decorates its own library functions (tl.argmin, tl.cdiv, ...) when triton.language is imported; if
    an earlier import (transformers probes for triton) did that without the interpreter, give those names
    interpreted twins so kernels run under the interpreter in the same process."""
    if "triton.language" not in sys.modules:
        return
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    twins: dict = {}
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("triton.language"):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):  # keyed by id: hashing a JITFunction analyses its dependencies
                if id(value) not in twins:
                    twins[id(value)] = InterpretedFunction(value.fn)
                setattr(module, attr, twins[id(value)])


_fresh_triton()

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
if "kvpack.kernels.triton_encode" in sys.modules:
    importlib.reload(sys.modules["kvpack.kernels.triton_encode"])
from kvpack.kernels import triton_attention, triton_encode  # noqa: E402

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


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("frac", [0.0, 0.05])
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


@pytest.mark.parametrize("bits,frac,span", [(2, 0.03, "all"), (3, 0.03, "head"), (4, 0.0, "all"), (4, 0.08, "all")])
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
