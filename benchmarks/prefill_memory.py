"""Chunked prefill on SmolLM2: time and peak RSS through the real compressed cache, with packed (blockwise)
attention vs decode-then-attend (KVPACK_PACKED_ATTENTION=0), next to an uncompressed DynamicCache.

    KVPACK_THREADS=1 .venv/bin/python benchmarks/prefill_memory.py --tokens 8192 --chunk 512 \
        --method kvquant-4bit-1pct --calib-windows 2 --calib-seqlen 512
    .venv/bin/python benchmarks/prefill_memory.py --method kvpack-4bit,kvpack-3bit,kvpack-2bit \
        --modes dynamic-fp32,packed --out results/prefill-8k-kvpack.json

Each mode runs in its own process (peak RSS is per process): the model and recipe are loaded, a short
warm-up prefill runs (kernel builds, allocator), the peak RSS counter is reset (/proc/self/clear_refs),
then `tokens` tokens of WikiText-2 are fed `chunk` at a time (logits of the last position only, as
generate's prefill). Reported: wall and CPU seconds of the timed prefill (CPU seconds are less sensitive to other
jobs on a shared machine; the 1-minute load average is recorded), peak RSS during it, RSS before it, and the
bytes the cache holds afterwards. Writes results/prefill-memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from kvpack import load_model, load_windows
from kvpack.cache.cache import CompressedCache
from kvpack.evaluate.results import environment, write_rows
from kvpack.hf.attention import cache_kwargs
from kvpack.recipes.resolve import resolve_recipe

MODES = ("dynamic-fp32", "packed", "decode-then-attend")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _make_cache(mode: str, model, recipe):
    if mode == "dynamic-fp32":
        return DynamicCache(config=model.config)
    return CompressedCache(model, recipe, packed_attention=mode == "packed")


@torch.no_grad()
def _prefill(model, cache, ids: torch.Tensor, chunk: int) -> None:
    for start in range(0, ids.shape[1], chunk):
        model(ids[:, start:start + chunk], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)


def _cache_bytes(cache) -> int:
    if isinstance(cache, CompressedCache):
        return int(cache.memory_report().total)
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def child(args) -> dict:
    """One mode in this process: the measurement row."""
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    recipe = resolve_recipe(model, tok, args.method, calib_windows=args.calib_windows, calib_seqlen=args.calib_seqlen,
                            progress=False)
    ids = load_windows(tok, args.data, args.tokens, max_windows=1)[:1]
    _prefill(model, _make_cache(args.child, model, recipe), ids[:, : 2 * args.chunk], args.chunk)  # warm-up
    cache = _make_cache(args.child, model, recipe)
    reset = _reset_peak()
    before = _status_kib("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    _prefill(model, cache, ids, args.chunk)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _status_kib("VmHWM")
    row = {"mode": args.child, "method": "fp32 (DynamicCache)" if args.child == "dynamic-fp32" else args.method,
           "tokens": args.tokens, "chunk": args.chunk, "threads": args.threads, "seconds": round(seconds, 3),
           "cpu_seconds": round(cpu_seconds, 3), "load_average_1min": round(os.getloadavg()[0], 2),
           "peak_rss_mib": round(peak / 1024, 1), "rss_before_mib": round(before / 1024, 1),
           "peak_minus_before_mib": round((peak - before) / 1024, 1), "peak_reset": reset,
           "cache_bytes": _cache_bytes(cache)}
    if isinstance(cache, CompressedCache) and cache.packed is not None:
        row["blockwise_calls"] = cache.packed.blockwise_calls
        row["window_tokens"] = cache.packed.window_tokens
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wikitext2")
    parser.add_argument("--method", default="kvquant-4bit-1pct", help="one method, or several separated by commas")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=2048)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=Path("results/prefill-memory.json"))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    methods = args.method.split(",")  # the uncompressed cache runs once, the other modes once per method
    jobs = [(mode, m) for mode in args.modes.split(",") for m in (methods[:1] if mode == "dynamic-fp32" else methods)]
    for mode, method in jobs:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", mode, "--method", method]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if done.returncode:
            sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = next((r for r in rows if r["mode"] == "dynamic-fp32"), None)
    for row in rows:
        if base is not None:
            row["seconds_vs_dynamic"] = round(row["seconds"] / base["seconds"], 3)
            row["cpu_seconds_vs_dynamic"] = round(row["cpu_seconds"] / base["cpu_seconds"], 3)
            row["peak_minus_before_vs_dynamic"] = round(row["peak_minus_before_mib"] / max(base["peak_minus_before_mib"], 0.1), 3)
        row["environment"] = environment()
        row["calibration"] = {"windows": args.calib_windows, "seqlen": args.calib_seqlen}
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
