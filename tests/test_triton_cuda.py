"""The split-K decode kernels compiled for a real GPU (skipped without CUDA): the shipped kvpack-3bit (mixed widths)
and kvquant-3bit-1pct (one width) codecs and TurboQuant 3.5 bits against decode-then-attend, with exact fp32 dots and with fp16 tensor-core
dots, and one decode step captured in a CUDA graph and replayed.

Runs in a subprocess without TRITON_INTERPRET (the interpreter tests of the same session replace triton's JIT
functions). benchmarks/gpu_check.sh runs this file, then the timings (benchmarks/triton_gpu_timing.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SCRIPT = r"""
import json, sys, torch
from kvpack.cache.stream import TokenStream
from kvpack.codecs.turboquant import TurboQuantCodec
from kvpack.hf.rope import apply_rope
from kvpack.kernels import triton_decode
from kvpack.recipes.bundled import SHIPPED_DIR
from kvpack.recipes.recipe import Recipe

dev = torch.device("cuda")
out = {}
for method in ("kvpack-3bit", "kvquant-3bit-1pct", "turboquant-3.5"):
    g = torch.Generator(device=dev).manual_seed(0)
    heads, dim = 3, 64
    if method.startswith("turboquant"):  # keys post-RoPE
        key, value = TurboQuantCodec(3.5, dim, seed=1).to(dev), TurboQuantCodec(3.5, dim, seed=2).to(dev)
        zero, scale = torch.zeros((), device=dev), torch.ones((), device=dev)
    else:  # keys pre-RoPE, around the calibrated ranges
        recipe = Recipe.load(SHIPPED_DIR / method)
        key, value = recipe.key_codecs[10].to(dev), recipe.value_codecs[10].to(dev)
        zero, scale = key.zero.view(heads, 1, dim), key.scale.view(heads, 1, dim)
    ks, vs = TokenStream(key, 1, 5), TokenStream(value, 1, 5)
    for n in (200, 1, 1, 90):
        ks.append(zero + scale * torch.randn(2, heads, n, dim, generator=g, device=dev))
        vs.append(torch.randn(2, heads, n, dim, generator=g, device=dev))
    total = ks.stored
    q = torch.randn(2, heads * 3, 1, dim, generator=g, device=dev)
    k, v = ks.read(torch.float32), vs.read(torch.float32)
    pos = inv = None
    if not method.startswith("turboquant"):
        pos = (torch.arange(total, device=dev, dtype=torch.int32) + 4).expand(2, -1).contiguous()
        inv = 1e5 ** (-torch.arange(0, dim, 2, device=dev).float() / dim)
        ang = pos[:, :, None].double() * inv.double()
        emb = torch.cat([ang, ang], -1)
        k = apply_rope(k, emb.cos().float(), emb.sin().float())
    s = q @ k.repeat_interleave(3, 1).transpose(-1, -2) * dim ** -0.5
    want = (torch.softmax(s, -1) @ v.repeat_interleave(3, 1)).transpose(1, 2)
    row = {}
    for dot16 in (False, True):
        got = triton_decode.stream_attention(ks, vs, key, value, q, None, dim ** -0.5, positions=pos, inv_freq=inv,
                                             dot16=dot16, split_tokens=64)
        row[f"dot16={dot16}"] = None if got is None else float((got - want).abs().max() / want.abs().max())
    call = lambda: triton_decode.stream_attention(ks, vs, key, value, q, None, dim ** -0.5, positions=pos, inv_freq=inv)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    graph.replay()
    torch.cuda.synchronize()
    row["graph"] = float((captured - want).abs().max() / want.abs().max())
    out[method] = row
print(json.dumps(out))
"""


def test_kernels_on_the_gpu_match_decode_then_attend_and_capture_in_a_graph():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    for method, row in rows.items():
        assert row["dot16=False"] is not None and row["dot16=False"] < 2e-5, (method, row)
        assert row["dot16=True"] < 3e-3 and row["graph"] < 3e-3, (method, row)
