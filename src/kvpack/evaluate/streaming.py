"""Streaming perplexity: each window goes through the real CompressedCache, teacher-forced.

The window is fed in chunks of `chunk` tokens (1 = the exact decode path: every token's logits
come from attention over what the cache really stores); the next-token NLL of every position is
summed as in `simulated_perplexity`, and (with `reference`) compared with the model's own
next-token distribution over the whole window without the cache (`kl`, `top1`). Bits per element
are measured from the cache's tensors at the end of each window (`memory_report`), not from the
codec's arithmetic; `fixed_bytes` is its `codebooks` part and `marginal_bits_per_element` the rest.

Why it can differ from the simulated number: simulation quantizes a whole window at once, so
(a) with a recent fp16 window (KIVI) every query sees the window's *last* tokens in fp16, while
the cache keeps each query's own most recent tokens in fp16 (the cache is the better case);
(b) codecs with token groups (KIVI keys) quantize a group with statistics of all its tokens,
while the cache keeps the open group in fp16 until it is complete; (c) chunked attention sums in
a different order, and k_proj/v_proj of one token differ from those of a whole window by ~3e-6
(matmul shapes): plain float noise for fp32 attention (logits ~1e-4 apart with a DynamicCache),
but every rounding decision near a boundary (fp16 or an N-bit level) can flip (one fp16 ulp of a
per-token zero point shifts every element of that token), and later layers and tokens amplify the
flips. They go both ways: on SmolLM2 at 3 bits, the simulation itself moves by about +-1% over two
2048-token windows when keys/values get 1e-6 relative noise, and the real cache lands in that band
(benchmarks/cache_real_vs_sim.py measures both). A whole window prefilled in one chunk equals the
simulation exactly.
"""
from __future__ import annotations

import math
import time

import torch

from kvpack.hf.attention import cache_kwargs
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvpack.cache.cache import CompressedCache
from kvpack.recipes.recipe import Recipe
from kvpack.evaluate.perplexity import Divergence, PerplexityResult, reference_logprobs


@torch.no_grad()
def window_stream_nll(model, ids: torch.Tensor, recipe: Recipe, chunk: int = 1,
                      residual_length: int | None = None,
                      divergence: Divergence | None = None) -> tuple[float, int, CompressedCache]:
    """Summed next-token NLL and count for one window ids [1, seqlen] fed through a fresh cache; with
    `divergence`, the window's positions are compared (KL, top-1) with the model run without the cache."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    ref = reference_logprobs(model, ids) if divergence is not None else None
    cache = CompressedCache(model, recipe, residual_length=residual_length)
    seqlen = ids.shape[1]
    total = 0.0
    for start in range(0, seqlen - 1, chunk):
        stop = min(start + chunk, seqlen - 1)
        logits = model(ids[:, start:stop], **cache_kwargs(cache), use_cache=True).logits[0].float()
        total += float(F.cross_entropy(logits, ids[0, start + 1: stop + 1], reduction="sum"))
        if ref is not None:
            divergence.add(ref[start:stop], logits)
    return total, seqlen - 1, cache


@torch.no_grad()
def streaming_perplexity(model, windows: torch.Tensor, recipe: Recipe, chunk: int = 1, progress: bool = True,
                         residual_length: int | None = None, reference: bool = True) -> PerplexityResult:
    """Perplexity of `windows` [n, seqlen] through the real compressed cache, prefilling `chunk` tokens at a time;
    with `reference`, also KL and top-1 agreement against the model without the cache (one more forward per window)."""
    total_nll, total_tokens, bits, marginal, fixed = 0.0, 0, [], [], 0
    div = Divergence() if reference else None
    start = time.perf_counter()
    bar = tqdm(windows, desc=f"{recipe.method} (real cache)", unit="window", disable=not progress, leave=False)
    for window in bar:
        nll, n, cache = window_stream_nll(model, window.unsqueeze(0).to(model.device), recipe, chunk, residual_length, div)
        total_nll += nll
        total_tokens += n
        report = cache.memory_report()
        bits.append(report.bits_per_element)
        marginal.append(report.marginal_bits_per_element)
        fixed = report.fixed_bytes
        del cache
        bar.set_postfix(ppl=f"{math.exp(total_nll / total_tokens):.3f}")
    mean = total_nll / total_tokens
    return PerplexityResult(
        method=recipe.method, ppl=math.exp(mean), nll=mean, tokens=total_tokens, windows=len(windows),
        bits_per_element=sum(bits) / len(bits), seconds=time.perf_counter() - start,
        kl=None if div is None else div.mean_kl, top1=None if div is None else div.top1,
        fixed_bytes=fixed, marginal_bits_per_element=sum(marginal) / len(marginal),
    )
