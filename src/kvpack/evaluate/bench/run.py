"""`run_bench`: build every cache the way generation builds it, time decode steps, measure memory held.

For each context (ascending) one chunked prefill through the model feeds every cache of that
context and of the longer ones (fill.TeeCache); beyond `model_prefill_tokens` the prompt's K/V are
repeated through the same update path without a model forward (fill.TeeCache.replay; rows say so).
Each finished cache then appends `decode_steps` decode steps through the model, and the caches of one
(context, batch) are timed in interleaved rounds (timing.time_rounds) with `timing_threads` threads.
"""
from __future__ import annotations

import copy
import gc
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from kvpack.evaluate.bench import baselines as base
from kvpack.evaluate.bench.fill import TeeCache, Target, decode_steps, prefill
from kvpack.evaluate.bench.peak import dynamic_cache_bytes, peak, reset_peak, weights_bytes
from kvpack.evaluate.bench.rows import add_ratios, timing_fields
from kvpack.evaluate.bench.timing import time_rounds
from kvpack.hf.attention import cache_kwargs
import platform
from kvpack.data import load_windows
from kvpack.cache.memory import fp16_cache_nbytes
from kvpack.cache.memory import fp16_cache_nbytes, held_bytes
from kvpack.evaluate.results import environment
from kvpack.hf.models import load_model, text_config
from kvpack.kernels import cpu as cpu_kernels
from kvpack.methods.names import parse_method
from kvpack.recipes.resolve import resolve_recipe
from kvpack.cache.cache import CompressedCache
from transformers import DynamicCache


@contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _isa(device: torch.device) -> dict:
    """The CPU's widest vector instruction set, the one the packed kernels were built for (KVPACK_CPU_ISA), and
    torch's CPU capability (what its SDPA dispatches to)."""
    if device.type != "cpu":
        return {}
    return {"cpu_instruction_set": cpu_kernels.instruction_set(), "kernel_isa": cpu_kernels.kernel_isa(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _prompt(tokenizer, data: str, tokens: int, vocab: int, device) -> tuple[torch.Tensor, str]:
    """ids [1, tokens] of real text (random ids if `data` cannot be read), and where they come from."""
    try:
        ids = load_windows(tokenizer, data, tokens, 1)[:1]
        if ids.shape[1] == tokens:
            return ids.to(device), f"{tokens} tokens of {data}"
    except Exception as exc:  # noqa: BLE001 - no corpus at hand
        reason = f"{type(exc).__name__}: {exc}"
    else:
        reason = "text too short"
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (1, tokens), generator=g).to(device), f"{tokens} random token ids ({reason})"


def _fits(method: str, dtype: torch.dtype | None, context: int, batch: int, config, budget: float) -> bool:
    """Whether a baseline's DynamicCache (its dtype's bytes) stays under `budget` bytes; compressed caches always."""

    if dtype is None:
        return True
    return fp16_cache_nbytes(config, context, batch) * torch.finfo(dtype).bits / 16 <= budget


def _memory(target: Target, device: torch.device) -> dict:
    """Bytes held (every reachable tensor), bytes memory_report counts, and a decode step's transient peak."""

    cache = target.cache
    start = reset_peak(device)
    decode_steps(target.model, cache, target.batch, 1)
    transient = max(0, peak(device) - start)
    out = {"bytes_16bit": fp16_cache_nbytes(target.model.config, cache.get_seq_length(), target.batch),
           "peak_step_bytes": weights_bytes(target.model) + transient, "step_transient_bytes": transient}
    if target.compressed:
        report = cache.memory_report()
        out.update(held_bytes=held_bytes(cache), report_bytes=report.tensor_bytes, cache_bytes=report.total,
                   report_parts=report.parts, model_bytes=report.model_total)
    else:
        out.update(held_bytes=dynamic_cache_bytes(cache), cache_bytes=dynamic_cache_bytes(cache), report_bytes=None)
    out["memory_ratio"] = out["bytes_16bit"] / max(out["cache_bytes"], 1)
    return out


def run_bench(model_spec: str = "smollm2-135m", device: str = "cpu", contexts=(2048, 8192, 32768), batch=1,
              methods=("kvquant-4bit-1pct",), rounds: int = 7, source_tokens: int | None = None,
              data: str = "wikitext2", calib_data: str = "c4[:500]", calib_windows: int = 16, calib_seqlen: int = 2048,
              recipe_dir: str | None = None, model=None, tokenizer=None, progress: bool = True, log=print,
              prefill_chunk: int = 2048, model_prefill_tokens: int | None = 8192, decode_warmup: int = 8,
              max_cache_gib: float = 4.0, timing_threads: int | None = None) -> list[dict]:
    """Bench `methods` next to the uncompressed baselines at every context and batch; returns rows.

    batch: an int or a list of ints. source_tokens: alias of model_prefill_tokens (older callers).
    model_prefill_tokens: prompt tokens run through the model (None: every context fully); longer contexts
    repeat them through the same cache path. max_cache_gib: baselines larger than this are skipped, and so is
    a (context, batch) where no baseline fits."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked but no CUDA device is available")
    batches = [batch] if isinstance(batch, int) else list(batch)
    contexts = sorted(set(int(c) for c in contexts))
    if source_tokens is not None and model_prefill_tokens == 8192:
        model_prefill_tokens = source_tokens
    baseline_names, kv_methods = base.split_methods(list(methods))
    if model is None:
        model, tokenizer = load_model(model_spec)
    model = model.to(dev).eval()
    models = {model.dtype: model}
    for name in baseline_names:  # baselines decode with the model in their storage dtype
        dtype = base.baseline_dtype(name)
        if dtype not in models:
            models[dtype] = copy.deepcopy(model).to(dtype)
    recipes = {m: resolve_recipe(model, tokenizer, parse_method(m), calib_data=calib_data,
                                 calib_windows=calib_windows, calib_seqlen=calib_seqlen, recipe_dir=recipe_dir,
                                 progress=progress) for m in kv_methods}
    calibration = f"calibrated on {calib_windows} x {calib_seqlen} tokens of {calib_data}"
    cfg = text_config(model.config)
    through_model = max(contexts) if model_prefill_tokens is None else min(max(contexts), model_prefill_tokens)
    ids, source = _prompt(tokenizer, data, through_model, cfg.vocab_size, dev)
    budget = max_cache_gib * 2**30

    targets, skipped = [], []
    for context in contexts:
        for b in batches:
            fits = [n for n in baseline_names if _fits(n, base.baseline_dtype(n), context, b, model.config, budget)]
            if not fits:
                skipped.append(f"context {context} batch {b}: no uncompressed baseline fits {max_cache_gib} GiB")
                continue
            skipped += [f"{n} at context {context} batch {b}: over {max_cache_gib} GiB" for n in baseline_names
                        if n not in fits]
            for name in fits:
                dtype = base.baseline_dtype(name)
                targets.append(Target(name, b, context, _dynamic(models[dtype]), models[dtype], dtype, False))
            for name in kv_methods:
                targets.append(Target(name, b, context, CompressedCache(model, recipes[name]), model, torch.float16,
                                      True))
    for line in skipped:
        log(f"skipped: {line}")
    tee = TeeCache(model.config, list(targets))
    filled, model_s, replay_from = 0, 0.0, None
    rows = []
    threads_fill = torch.get_num_threads()
    for context in contexts:
        done = [t for t in tee.targets if t.context == context]
        if not done:
            continue
        upto = min(context, through_model)
        if filled < upto:
            log(f"prefill through the model: tokens {filled}..{upto} in chunks of {prefill_chunk} ...")
            model_s += prefill(model, ids, tee, filled, upto, prefill_chunk)
            filled = upto
        if filled < context:
            replay_from = through_model
            log(f"replaying the prompt's K/V: tokens {filled}..{context} ...")
            tee.replay(model, filled, context, prefill_chunk)
            filled = context
        tee.targets = [t for t in tee.targets if t.context != context]
        update_s = sum(t.update_s for t in done)
        for t in done:
            decode_steps(t.model, t.cache, t.batch, decode_warmup)
        for b in batches:
            group = [t for t in done if t.batch == b]
            if not group:
                continue
            gc.collect()
            mem = [_memory(t, dev) for t in group]
            load = os.getloadavg()
            with _threads(timing_threads):
                threads = torch.get_num_threads()
                timings = time_rounds([(t.model, t.cache, t.batch) for t in group], rounds, dev)
            load_after = os.getloadavg()
            for t, m, tm in zip(group, mem, timings):
                fill = (f"chunked prefill through the model ({prefill_chunk}-token chunks) of {min(context, through_model)} "
                        f"prompt tokens, each layer's K/V handed to the cache's update() (one shared forward, "
                        f"batch-1 K/V repeated over {t.batch} rows)")
                if replay_from is not None and context > through_model:
                    fill += (f"; tokens {through_model}..{context} repeat those K/V (keys re-rotated to their positions) "
                             "through the same update() without a model forward")
                fill += f"; then {decode_warmup + 1} decode steps through the model"
                rows.append({
                    "method": t.method, "baseline": not t.compressed,
                    "storage_dtype": base.dtype_name(t.storage_dtype) if not t.compressed else "packed",
                    "model_dtype": base.dtype_name(t.model.dtype), "device": dev.type, "device_name": _device_name(dev),
                    **_isa(dev),
                    "context": context, "batch": t.batch, **timing_fields(tm), **m,
                    "cache_update_s": t.update_s, "prefill_model_s": model_s, "prefill_tokens_through_model": filled
                    if replay_from is None else through_model, "prefill_update_s_all_caches": update_s,
                    "threads": threads, "threads_fill": threads_fill, "loadavg_before": load[0],
                    "loadavg_after": load_after[0], "model": model_spec, "kv_source": source, "fill": fill,
                    "rounds": rounds, "calibration": calibration if t.compressed else None,
                    "skipped": skipped, "env": environment(),
                })
            log("  ".join(f"{r['method']} b{r['batch']}: attn {r['attention_ms']:.3f} ms step {r['step_ms']:.1f} ms"
                          for r in rows[-len(group):]))
        for t in done:
            t.cache = None
        del done
        gc.collect()
    return add_ratios(rows)


def _dynamic(model):
    return DynamicCache(config=model.config)
