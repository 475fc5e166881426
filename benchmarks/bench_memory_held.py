"""Bytes a CompressedCache holds (every reachable tensor, each storage once) next to what `memory_report`
counts, right after a prefill and after decode steps.

    python benchmarks/bench_memory_held.py --method kvquant-4bit-1pct --tokens 2048 --steps 8 --json results/bench-cpu-memory-held.json
"""
from __future__ import annotations

import argparse
import json

import torch

from kvpack.cache.cache import CompressedCache
from kvpack.cache.memory import held_bytes
from kvpack.hf.attention import cache_kwargs
from kvpack.hf.models import load_model
from kvpack.methods.names import parse_method
from kvpack.recipes.resolve import resolve_recipe


def _row(cache, when: str) -> dict:
    rep = cache.memory_report()
    held = held_bytes(cache)
    codecs = cache.recipe.key_codecs + cache.recipe.value_codecs
    # what memory_report counted before it counted capacity, RoPE tables and every codebook copy
    legacy = sum(rep.parts[p] for p in ("codes", "scales", "outliers", "other", "sink_window", "positions")) + \
        sum(c.shared_nbytes() for c in {id(c): c for c in codecs}.values())
    tokens = cache.get_seq_length()
    return {"when": when, "tokens": tokens, "held_bytes": held, "report_bytes": rep.total, "legacy_report_bytes": legacy,
            "held_per_token": held / tokens, "report_per_token": rep.total / tokens,
            "held_vs_16bit": rep.fp16_total / held, "report_vs_16bit": rep.ratio, "parts": rep.parts}


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="kvquant-4bit-1pct")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m")
    recipe = resolve_recipe(model, tok, parse_method(args.method), calib_data="c4[:500]", calib_windows=2,
                            calib_seqlen=512, progress=False)
    from kvpack.data import load_windows

    ids = load_windows(tok, "wikitext2", args.tokens, 1)[:1]
    cache = CompressedCache(model, recipe)
    model(ids, **cache_kwargs(cache), use_cache=True)  # the prompt in one forward
    rows = [_row(cache, "after prefill")]
    for _ in range(args.steps):
        model(ids[:, :1], **cache_kwargs(cache), use_cache=True)
    rows.append(_row(cache, f"after {args.steps} decode steps"))
    for r in rows:
        print(f"{r['when']:<22} held {r['held_bytes'] / 2**20:7.2f} MiB ({r['held_vs_16bit']:.2f}x < 16-bit)  "
              f"memory_report {r['report_bytes'] / 2**20:7.2f} MiB  (previously counted {r['legacy_report_bytes'] / 2**20:.2f} MiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"method": args.method, **r} for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
