"""The split-K kernel of TurboQuant blocks (kernels/triton_tq.py) under the Triton interpreter, against
decode-then-attend with the codec's own decode: keys post-RoPE scored against the rotated query, values summed in
the rotated frame and turned back once per program; fractional widths (two code parts), one width, GQA."""
from __future__ import annotations

import pytest
import torch

from test_triton_interpret import B, DIM, H, _check, _decode_then_attend, _query  # noqa: I001

from kvpack.cache.stream import TokenStream
from kvpack.codecs.turboquant import TurboQuantCodec
from kvpack.kernels import triton_decode

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(kbits: float, vbits: float, tokens: int, blocks, seed: int):
    key, value = TurboQuantCodec(kbits, DIM, seed=1), TurboQuantCodec(vbits, DIM, seed=2)
    g = torch.Generator().manual_seed(seed)
    ks, vs = TokenStream(key, 1, 2), TokenStream(value, 1, 2)
    added = i = 0
    while added < tokens:
        n = min(blocks[i % len(blocks)], tokens - added)
        ks.append(torch.randn(B, H, n, DIM, generator=g) * 1.5 + 0.3)
        vs.append(torch.randn(B, H, n, DIM, generator=g))
        added += n
        i += 1
    return key, value, ks, vs


@pytest.mark.parametrize("kbits,vbits", [(3.5, 2.5), (4, 3)])
def test_tq_split_k_matches_decode_then_attend(kbits, vbits):
    key, value, ks, vs = _layer(kbits, vbits, 31, (9, 1, 20), seed=int(kbits))
    assert len(ks.body.runs) >= 2
    total = ks.stored
    mask = torch.ones(B, 1, 1, total, dtype=torch.bool)
    mask[1, ..., 2:5] = False
    query = _query(1)
    got = triton_decode.stream_attention(ks, vs, key, value, query, mask, DIM ** -0.5, dot16=False, split_tokens=16)
    _check(got, _decode_then_attend(ks, vs, query, DIM ** -0.5, mask=mask), False)


def test_tq_fp16_dots_causal_softcap():
    key, value, ks, vs = _layer(3.5, 3.5, 21, (20, 1), seed=5)
    query = _query(2, seed=6)
    got = triton_decode.stream_attention(ks, vs, key, value, query, None, 0.2, softcap=5.0, dot16=True)
    _check(got, _decode_then_attend(ks, vs, query, 0.2, softcap=5.0), True)


def test_tq_declines_pre_rope_keys_and_qjl():
    key, value, ks, vs = _layer(3.5, 3.5, 6, (6,), seed=7)
    pos = torch.arange(ks.stored, dtype=torch.int32).expand(B, -1).contiguous()
    inv = 1e4 ** (-torch.arange(0, DIM, 2).float() / DIM)
    assert triton_decode.stream_attention(ks, vs, key, value, _query(1), None, 0.1, positions=pos, inv_freq=inv) is None
    qkey = TurboQuantCodec(3.5, DIM, seed=1, qjl=True)
    qs = TokenStream(qkey, 1, 2)
    qs.append(torch.randn(B, H, 8, DIM))
    vs2 = TokenStream(value, 1, 2)
    vs2.append(torch.randn(B, H, 8, DIM))
    assert triton_decode.stream_attention(qs, vs2, qkey, value, _query(1), None, 0.1) is None
