"""Decode speed: attention alone and the whole model, fp16 cache vs compressed caches, at long contexts.

`kvpack bench` builds, for every context length, one cache per method holding `context` tokens
per layer, then times in interleaved rounds (every method once per round, medians reported, so
machine load drifts hit all methods alike):
  attention_ms  one layer's decode-step attention (1 query token): for fp16 the model's own SDPA
                call (transformers' sdpa_attention_forward on a DynamicCache's K/V), for compressed
                caches kvpack's packed attention (kvpack.kernels.dispatch.layer_attention);
  step_ms       one whole-model decode step, model(next token, **cache_kwargs(cache)).
Filling: long contexts are not prefilled through the model. Real K/V are captured once from
`source_tokens` tokens of text (pre-RoPE keys and values of every layer, through an fp16 cache),
repeated along the sequence to `context` tokens and encoded straight into the cache's storage in
chunks (keys rotated at their positions for the fp16 DynamicCache and post-RoPE recipes). The
first tokens go through the cache's own append path and are timed: the compression throughput
(tokens per second into the cache, all layers, the model forward excluded); see fill_compressed
for how the rest is filled fast with exactly the bytes encoding would store. Memory: bytes the cache holds
(from its tensors) and peak bytes of a decode step = weights + cache + what the step allocates on top (the
RSS high-water mark's rise during one step on CPU, the allocator's peak on CUDA). The "fp16" row is a
transformers DynamicCache in the model's dtype: float32 on CPU, where SDPA has no fast float16 path.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvpack.hf.hooks import cache_kwargs

from kvpack.hf.intercept import attention_layers
from kvpack.hf.models import text_config


@dataclass
class KV:
    """Captured pre-RoPE keys and values of one layer: [1, kv_heads, tokens, head_dim] float32."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class Entry:
    """One method's cache at one context, and its timings."""

    method: str
    cache: object
    recipe: object | None
    fill_s: float
    fill_tokens: int
    cache_bytes: int
    peak_bytes: int
    attention_ms: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    attention_cpu_ms: list[float] = field(default_factory=list)
    step_cpu_ms: list[float] = field(default_factory=list)
    kernel: str = ""


# ---------------------------------------------------------------------------------------------- memory
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter; return the current bytes it is measured from."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (Linux)
            f.write("5")
    except OSError:
        pass
    return _rss()


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return _rss()


def _weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- K/V
@torch.no_grad()
def capture_kv(model, tokenizer, data: str, tokens: int) -> tuple[list[KV], str]:
    """Pre-RoPE K/V of every layer for the first `tokens` tokens of `data` (synthetic if it cannot be read)."""
    from kvpack.cache.cache import CompressedCache
    from kvpack.recipes.recipe import Recipe

    layers = text_config(model.config).num_hidden_layers
    try:
        from kvpack.data import load_windows

        ids = load_windows(tokenizer, data, tokens, 1)[:1].to(model.device)
        source = f"{tokens} tokens of {data}, repeated"
    except Exception as exc:  # no corpus at hand: Gaussian K/V with the model's shapes
        ids, source = None, f"synthetic Gaussian K/V ({type(exc).__name__}: {exc})"
    if ids is not None and ids.shape[1] == tokens:
        cache = CompressedCache(model, Recipe.baseline("fp16:pre-rope", layers), packed_attention=False)
        model(ids, **cache_kwargs(cache), use_cache=True)
        return [KV(layer.k.read(torch.float32), layer.v.read(torch.float32)) for layer in cache.layers], source
    cfg = text_config(model.config)
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(0)
    shape = (1, cfg.num_key_value_heads, tokens, dim)
    spread = torch.exp(torch.randn(1, cfg.num_key_value_heads, 1, dim, generator=g))  # per-channel magnitudes
    return [KV(torch.randn(shape, generator=g) * spread, torch.randn(shape, generator=g)) for _ in range(layers)], \
        "synthetic Gaussian K/V"


def _tiled(x: torch.Tensor, start: int, n: int, batch: int) -> torch.Tensor:
    """Tokens start..start+n-1 of x repeated along the sequence: [batch, H, n, D]."""
    total = x.shape[-2]
    idx = torch.arange(start, start + n) % total
    return x[..., idx.to(x.device), :].expand(batch, -1, -1, -1)


def _rope_at(model, positions: torch.Tensor, dtype: torch.dtype):
    rotary = next(m for name, m in model.named_modules() if name.split(".")[-1].startswith("rotary_emb"))
    probe = torch.empty(1, dtype=dtype, device=positions.device)
    return rotary(probe, positions)


# ---------------------------------------------------------------------------------------------- caches
@torch.no_grad()
def fill_fp16(model, kv: list[KV], context: int, batch: int, chunk: int = 4096):
    """A DynamicCache holding `context` tokens per layer (keys rotated at positions 0..context-1)."""
    from transformers import DynamicCache

    from kvpack.hf.rope import apply_rope

    device, dtype = model.device, model.dtype
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    for layer, part in enumerate(kv):
        keys, values = [], []
        for s in range(0, context, chunk):
            n = min(chunk, context - s)
            pos = torch.arange(s, s + n, device=device).expand(batch, -1)
            cos, sin = _rope_at(model, pos, torch.float32)
            keys.append(apply_rope(_tiled(part.keys, s, n, batch).to(device), cos, sin).to(dtype))
            values.append(_tiled(part.values, s, n, batch).to(device, dtype))
        cache.update(torch.cat(keys, -2), torch.cat(values, -2), layer)
    _sync(device)
    return cache, time.perf_counter() - start


@torch.no_grad()
def fill_compressed(model, recipe, kv: list[KV], context: int, batch: int, encode_tokens: int = 2048):
    """A CompressedCache holding `context` tokens per layer, encoded chunk by chunk straight into its storage.

    The first `encode_tokens` tokens go through the cache's append path (timed: the compression
    throughput). Beyond them the K/V repeat with the period of the captured source, so for pre-RoPE
    recipes whose codecs encode every token on its own (per-token statistics, fixed per-channel key
    ranges, RVQ) each later source-length chunk encodes to exactly the same bytes: those chunks append
    copies of one encoded chunk (what encoding them would store, without spending minutes on it).
    Returns (cache, seconds spent encoding, tokens encoded).
    """
    from kvpack.cache.cache import CompressedCache
    from kvpack.cache.stream import _encode_block
    from kvpack.hf.rope import apply_rope

    device = model.device
    cache = CompressedCache(model, recipe)
    positions = torch.arange(context, device=device).expand(batch, -1)
    if cache.needs_positions:
        cache.log_positions(0, positions)
    period = kv[0].keys.shape[-2]
    copies = cache.pre_rope and all(max(c.token_group(), 1) == 1 for c in recipe.key_codecs + recipe.value_codecs)
    timed = min(context, max(encode_tokens, period) if copies else context)
    if copies:
        timed = -(-timed // period) * period  # whole source periods, so the copies line up
        timed = min(timed, context)
    elapsed = 0.0
    for layer, part in zip(cache.layers, kv):
        start = time.perf_counter()
        for s in range(0, timed, period):
            n = min(period, timed - s)
            keys = _tiled(part.keys, s, n, batch).to(device).float()
            values = _tiled(part.values, s, n, batch).to(device).float()
            if not cache.pre_rope:
                keys = apply_rope(keys, *_rope_at(model, positions[:, s:s + n], torch.float32))
            if not layer.is_initialized:
                layer.lazy_initialization(keys.to(model.dtype), values.to(model.dtype))
            layer.k.append(keys)
            layer.v.append(values)
        _sync(device)
        elapsed += time.perf_counter() - start
        if timed >= context:
            continue
        if not copies or layer.k.tail is not None or layer.v.tail is not None:
            raise RuntimeError("cannot extend this cache by copies; use a smaller context")
        source_k = _tiled(part.keys, 0, period, batch).to(device).float()
        source_v = _tiled(part.values, 0, period, batch).to(device).float()
        enc_k, enc_v = _encode_block(layer.key_codec, source_k), _encode_block(layer.value_codec, source_v)
        for s in range(timed, context, period):
            n = min(period, context - s)
            if n < period:  # a last partial period: encode it for real
                layer.k.append(source_k[..., :n, :])
                layer.v.append(source_v[..., :n, :])
            else:
                layer.k.body.append(enc_k, layer.key_codec)
                layer.v.body.append(enc_v, layer.value_codec)
    _sync(device)
    return cache, elapsed, timed * batch


def _cache_bytes(cache) -> int:
    from kvpack.cache.cache import CompressedCache

    if isinstance(cache, CompressedCache):
        return cache.memory_report().total
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


# ---------------------------------------------------------------------------------------------- timing
def _timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall ms, CPU ms of the calling thread: with one torch thread, the work without time spent descheduled)."""
    _sync(device)
    start, cpu = time.perf_counter(), time.thread_time()
    fn()
    _sync(device)
    return 1000.0 * (time.perf_counter() - start), 1000.0 * (time.thread_time() - cpu)


def _attention_call(model, entry: Entry, layer_idx: int, batch: int):
    """A function running one layer's decode-step attention for `entry`'s cache, and the kernel it uses."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kvpack.kernels import dispatch as attention

    module = attention_layers(model)[layer_idx]
    cfg = text_config(model.config)
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(layer_idx)
    query = torch.randn(batch, cfg.num_attention_heads, 1, dim, generator=g).to(model.device, model.dtype)
    cache = entry.cache
    if entry.recipe is None:
        k, v = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
        return (lambda: sdpa_attention_forward(module, query, k, v, None, scaling=module.scaling)), "sdpa"
    layer = cache.layers[layer_idx]
    state = cache.packed
    paths: list = []
    attention.layer_attention(layer, query, None, scaling=module.scaling, backend=state.backend, rope=state.rope,
                              paths=paths)
    kernel = "+".join(sorted({p for _, p in paths}))
    return (lambda: attention.layer_attention(layer, query, None, scaling=module.scaling, backend=state.backend,
                                              rope=state.rope)), kernel


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@torch.no_grad()
def bench_context(model, tokenizer, methods: list[str], recipes: dict, kv: list[KV], context: int, batch: int,
                  rounds: int, device: torch.device) -> list[Entry]:
    """All methods at one context length: build each cache, then time them in interleaved rounds."""
    weights = _weights_bytes(model)
    entries = []
    token = torch.full((batch, 1), 3, dtype=torch.long, device=device)
    for method in methods:
        gc.collect()
        recipe = recipes.get(method)
        if recipe is None:
            cache, fill_s = fill_fp16(model, kv, context, batch)
            fill_tokens = context * batch
        else:
            cache, fill_s, fill_tokens = fill_compressed(model, recipe, kv, context, batch)
        model(token, **cache_kwargs(cache), use_cache=True)  # warm-up step (builds RoPE tables, kernels)
        gc.collect()
        base = _reset_peak(device)
        model(token, **cache_kwargs(cache), use_cache=True)
        transient = max(0, _peak(device) - base)  # what one decode step allocates on top of what is held
        held = _cache_bytes(cache)
        entries.append(Entry(method, cache, recipe, fill_s, fill_tokens, held, weights + held + transient))
    layers = text_config(model.config).num_hidden_layers
    probes = sorted({0, layers // 2, layers - 1})
    calls = {}
    for entry in entries:
        fns = [_attention_call(model, entry, i, batch) for i in probes]
        entry.kernel = fns[0][1]
        calls[entry.method] = [f for f, _ in fns]
    for _ in range(rounds):
        for entry in entries:
            times = [_timed(f, device) for f in calls[entry.method]]
            entry.attention_ms.append(statistics.mean(t[0] for t in times))
            entry.attention_cpu_ms.append(statistics.mean(t[1] for t in times))
            wall, cpu = _timed(lambda: model(token, **cache_kwargs(entry.cache), use_cache=True), device)
            entry.step_ms.append(wall)
            entry.step_cpu_ms.append(cpu)
    return entries


def _rows(entries: list[Entry], context: int, batch: int, device: torch.device, model_spec: str, source: str,
          threads: int, calibration: str) -> list[dict]:
    from kvpack.evaluate.results import environment

    base = next((e for e in entries if e.recipe is None), None)
    rows = []
    for e in entries:
        att, step = _median(e.attention_ms), _median(e.step_ms)
        row = {
            "method": e.method, "device": device.type, "device_name": _device_name(device), "context": context,
            "batch": batch, "attention_ms": att, "step_ms": step, "peak_bytes": e.peak_bytes,
            "cache_bytes": e.cache_bytes,
            "prefill_tokens_per_s": e.fill_tokens / e.fill_s if e.fill_s > 0 else None,
            "prefill_tokens_timed": e.fill_tokens,
            "attention_kernel": e.kernel, "attention_ms_rounds": e.attention_ms, "step_ms_rounds": e.step_ms,
            "attention_cpu_ms": _median(e.attention_cpu_ms), "step_cpu_ms": _median(e.step_cpu_ms),
            "threads": threads, "model": model_spec, "kv_source": source,
            "fill": "encoded straight into the cache storage, no model prefill (compressed caches: the first "
                    f"{e.fill_tokens // batch} tokens through the append path, timed; the rest copies of identical "
                    "encoded source chunks)" if e.recipe is not None else "DynamicCache.update per layer",
            "calibration": calibration if e.recipe is not None and e.recipe.calibration else None, "env": environment(),
        }
        if base is not None:
            b_att, b_step = _median(base.attention_ms), _median(base.step_ms)
            row.update(attention_ratio=att / b_att, step_ratio=step / b_step, attention_speedup=b_att / att,
                       step_speedup=b_step / step, memory_ratio=base.cache_bytes / max(e.cache_bytes, 1),
                       attention_cpu_ratio=_median(e.attention_cpu_ms) / _median(base.attention_cpu_ms),
                       step_cpu_ratio=_median(e.step_cpu_ms) / _median(base.step_cpu_ms))
        rows.append(row)
    return rows


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or platform.machine()


def run_bench(model_spec: str = "smollm2-135m", device: str = "cpu", contexts: list[int] = (1024, 8192, 32768),
              batch: int = 1, methods: list[str] = ("fp16", "kvquant-4bit-1pct"), rounds: int = 7,
              source_tokens: int = 512, data: str = "wikitext2", calib_data: str = "c4[:500]", calib_windows: int = 2,
              calib_seqlen: int = 512, recipe_dir: str | None = None, model=None, tokenizer=None,
              progress: bool = True, log=print) -> list[dict]:
    """Measure every method at every context; returns result rows (see module docstring)."""
    from kvpack.methods.names import parse_method
    from kvpack.hf.models import load_model
    from kvpack.recipes.resolve import resolve_recipe

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked but no CUDA device is available")
    if model is None:
        model, tokenizer = load_model(model_spec)
    model = model.to(dev).eval()
    methods = list(dict.fromkeys(["fp16", *methods]))  # the baseline, measured in the same run, first
    recipes = {}
    for m in methods:
        if m == "fp16":
            continue
        recipes[m] = resolve_recipe(model, tokenizer, parse_method(m), calib_data=calib_data,
                                    calib_windows=calib_windows, calib_seqlen=calib_seqlen, recipe_dir=recipe_dir,
                                    progress=progress)
        for codecs in (recipes[m].key_codecs, recipes[m].value_codecs):
            for codec in codecs:  # codec state lives on the CPU; move what kernels read
                for name in ("levels", "decode_levels", "zero", "scale", "codebooks", "perm", "lower", "upper"):
                    t = getattr(codec, name, None)
                    if isinstance(t, torch.Tensor) and t.device != dev:
                        setattr(codec, name, t.to(dev))
    calibration = f"calibrated on {calib_windows} x {calib_seqlen} tokens of {calib_data} (a small calibration: " \
                  "enough for speed, not for quality)"
    kv, source = capture_kv(model, tokenizer, data, source_tokens)
    kv = [KV(p.keys.to(dev), p.values.to(dev)) for p in kv]
    rows = []
    threads = torch.get_num_threads()
    for context in contexts:
        log(f"context {context}: filling {len(methods)} caches ({source}) ...")
        entries = bench_context(model, tokenizer, methods, recipes, kv, context, batch, rounds, dev)
        new = _rows(entries, context, batch, dev, model_spec, source, threads, calibration)
        for row in new:  # the "fp16" row stores K/V in the model's dtype
            row["fp16_row_kv_dtype"] = str(model.dtype).replace("torch.", "")
        for row in new:
            log(f"  {row['method']:<24} attention {row['attention_ms']:8.3f} ms  step {row['step_ms']:8.2f} ms  "
                f"cache {row['cache_bytes'] / 2**20:8.1f} MiB  ratio {row.get('attention_ratio', float('nan')):.2f}")
        rows += new
        del entries
        gc.collect()
    return rows


BENCH_COLUMNS = [
    ("method", "method"), ("device", "device"), ("context", "context"), ("batch", "batch"),
    ("attention_ms", "attn ms"), ("attention_ratio", "attn/fp16"), ("attention_cpu_ratio", "attn cpu/fp16"),
    ("step_ms", "step ms"), ("step_ratio", "step/fp16"), ("step_cpu_ratio", "step cpu/fp16"),
    ("cache_bytes", "cache B"), ("memory_ratio", "fp16/cache"), ("peak_bytes", "peak B"),
    ("prefill_tokens_per_s", "fill tok/s"), ("attention_kernel", "kernel"),
]


def plot(rows: list[dict], path: str | Path) -> Path:
    """Latency vs context (attention alone, whole step), one line per method, log-log; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, key, title in ((axes[0], "attention_ms", "attention alone (one layer)"),
                           (axes[1], "step_ms", "whole-model decode step")):
        for method in methods:
            pts = sorted((r["context"], r[key]) for r in rows if r["method"] == method and math.isfinite(r[key]))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method,
                        linestyle="--" if method == "fp16" else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    first = rows[0] if rows else {}
    fig.suptitle(f"{first.get('model', '')} decode latency, {first.get('device_name', '')}, batch {first.get('batch', '')}, "
                 f"{first.get('threads', '')} threads", fontsize=10)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
