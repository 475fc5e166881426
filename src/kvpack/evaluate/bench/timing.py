"""Timing decode steps: one layer's attention alone, and the whole model, in interleaved rounds.

Every round times every cache once (so drifts in machine load hit all of them alike); medians are
reported. Attention alone: for a DynamicCache the model's own SDPA call (transformers'
sdpa_attention_forward, in the cache's dtype); for a CompressedCache kvpack's packed attention
(kvpack.kernels.dispatch.layer_attention), on the same query shape [batch, q_heads, 1, head_dim].
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from kvpack.evaluate.bench.peak import sync
from kvpack.hf.attention import cache_kwargs
from kvpack.hf.attention import attention_layers
from kvpack.hf.models import text_config
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from kvpack.cache.cache import CompressedCache
from kvpack.kernels import dispatch


@dataclass
class Timings:
    """Per-round times of one cache (ms): wall and this thread's CPU time."""

    attention_ms: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    attention_cpu_ms: list[float] = field(default_factory=list)
    step_cpu_ms: list[float] = field(default_factory=list)
    kernel: str = ""


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall ms, CPU ms of the calling thread) of fn()."""
    sync(device)
    start, cpu = time.perf_counter(), time.thread_time()
    fn()
    sync(device)
    return 1000.0 * (time.perf_counter() - start), 1000.0 * (time.thread_time() - cpu)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def attention_call(model, cache, layer_idx: int, batch: int):
    """(fn running `layer_idx`'s decode-step attention over `cache`, kernel name)."""

    module = attention_layers(model)[layer_idx]
    cfg = text_config(model.config)
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(layer_idx)
    query = torch.randn(batch, cfg.num_attention_heads, 1, dim, generator=g).to(model.device, model.dtype)
    if not isinstance(cache, CompressedCache):
        layer = cache.layers[layer_idx]  # read at call time: decode steps replace its tensors
        query = query.to(layer.keys.dtype)
        return (lambda: sdpa_attention_forward(module, query, layer.keys, layer.values, None,
                                               scaling=module.scaling)), "sdpa"
    layer, state = cache.layers[layer_idx], cache.packed
    if state is None:
        raise RuntimeError("the bench times packed attention; this cache was built with packed_attention=False")
    paths: list = []
    dispatch.layer_attention(layer, query, None, scaling=module.scaling, backend=state.backend, rope=state.rope,
                             paths=paths)
    kernel = "+".join(sorted({p for _, p in paths}))
    return (lambda: dispatch.layer_attention(layer, query, None, scaling=module.scaling, backend=state.backend,
                                             rope=state.rope)), kernel


@torch.no_grad()
def time_rounds(entries: list[tuple[object, object, int]], rounds: int, device: torch.device) -> list[Timings]:
    """Time (model, cache, batch) entries in `rounds` interleaved rounds: per round and entry, the attention of
    three probe layers (first, middle, last; mean) and one whole decode step (which appends a token)."""
    out = [Timings() for _ in entries]
    calls = []
    for (model, cache, batch), t in zip(entries, out):
        layers = text_config(model.config).num_hidden_layers
        fns = [attention_call(model, cache, i, batch) for i in sorted({0, layers // 2, layers - 1})]
        t.kernel = fns[0][1]
        calls.append([f for f, _ in fns])
    for _ in range(rounds):
        for (model, cache, batch), t, fns in zip(entries, out, calls):
            times = [timed(f, device) for f in fns]
            t.attention_ms.append(statistics.mean(x[0] for x in times))
            t.attention_cpu_ms.append(statistics.mean(x[1] for x in times))
            ids = torch.full((batch, 1), 3, dtype=torch.long, device=device)
            wall, cpu = timed(lambda: model(ids, **cache_kwargs(cache), use_cache=True), device)
            t.step_ms.append(wall)
            t.step_cpu_ms.append(cpu)
    return out
