"""Memory really held by kvpack-{4,3,2}bit caches next to the bits the quality table reports.

For each preset (the recipes shipped for the default model) and length: a cache is filled with WikiText-2
tokens, a prompt of `tokens - steps` tokens in chunks of `chunk` (one model forward per chunk feeds every
preset's cache through its own `update()`, evaluate/bench/fill.py), then `steps` one-token decode steps
through the model with the cache itself (so it holds what generation leaves: a prompt run and a run of
one-token blocks); then measured three ways:
- `memory_report()`: the cache's own parts (`cache_bytes`) and the per-model state its recipe holds once
  (`model_bytes`: codebooks at their stored size, the tables the kernels derive, Python objects);
- a walk of every tensor reachable from the cache and its recipe, each storage once (`held_tensor_bytes`),
  plus `sys.getsizeof` of every Python object (`python_bytes`): `held_bytes` is their sum;
- the quality table's count for the same length (results/quality-wikitext2.json, seqlen 2048):
  `fixed_bytes + marginal_bits_per_element * elements / 8` (`table_bytes`), and its marginal part alone
  (`table_marginal_bytes`, what each cache adds when the per-model state is counted once).
A second cache of the same recipe checks that the per-model state is held once (`second_cache`).

    python benchmarks/preset_memory.py --lengths 64,256,2048 --json results/preset-memory.json
    python benchmarks/preset_memory.py --lengths 8192 --pair-tokens 0 --json results/preset-memory-8k.json
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from kvpack.cache.cache import CompressedCache
from kvpack.cache.memory import held_storages, model_state, python_bytes
from kvpack.data import load_windows
from kvpack.evaluate.bench.fill import Target, TeeCache, prefill
from kvpack.hf.attention import cache_kwargs
from kvpack.hf.models import load_model
from kvpack.recipes.resolve import resolve_recipe

PRESETS = ("kvpack-4bit", "kvpack-3bit", "kvpack-2bit")


def table_rows(path: Path) -> dict[str, dict]:
    """method -> the quality table's simulated WikiText-2 row (bits, fixed bytes, marginal bits)."""
    rows = json.loads(path.read_text())
    return {r["method"]: r for r in rows if r.get("mode", "simulated") == "simulated"}


@torch.no_grad()
def fill(model, recipes: list, ids: torch.Tensor, steps: int, chunk: int) -> list[CompressedCache]:
    """One cache per recipe, each holding ids [1, T]: T - steps prompt tokens in chunks of `chunk` (one shared
    forward), then `steps` decode steps through the model with each cache."""
    caches = [CompressedCache(model, recipe) for recipe in recipes]
    prompt = ids.shape[1] - steps
    targets = [Target(recipe.method, 1, prompt, cache, model, torch.float16, True) for recipe, cache in zip(recipes, caches)]
    prefill(model, ids, TeeCache(model.config, targets), 0, prompt, chunk)
    for cache in caches:
        for t in range(prompt, ids.shape[1]):
            model(ids[:, t:t + 1], **cache_kwargs(cache), use_cache=True)
    return caches


def held(caches: list[CompressedCache]) -> tuple[int, int]:
    """(bytes of every tensor reachable from `caches` and their recipe, each storage once; Python object bytes)."""
    model = caches[0].model_ref
    sources = [c.log.source for c in caches if c.log is not None]
    tensors = sum(held_storages(caches, stop=(model, *sources)).values())
    return tensors, python_bytes(caches, stop=(model, *sources))


def measure(cache: CompressedCache, table: dict) -> dict:
    rep = cache.memory_report()
    tensors, python = held([cache])
    elements = rep.fp16_total // 2
    table_marginal = table["marginal_bits_per_element"] * elements / 8
    table_bytes = table["fixed_bytes"] + table_marginal
    return {
        "tokens": rep.tokens, "fp16_bytes": rep.fp16_total,
        "cache_bytes": rep.total, "cache_parts": rep.parts,
        "model_bytes": rep.model_total, "model_parts": rep.model_parts,
        "held_tensor_bytes": tensors, "python_bytes": python, "held_bytes": tensors + python,
        "report_held_bytes": rep.held,
        "stored_bits_per_element": rep.bits_per_element, "held_bits_per_element": 8 * (tensors + python) / elements,
        "cache_bits_per_element": 8 * rep.total / elements,
        "table_bits_per_element_2048": table["bits_per_element"], "table_fixed_bytes": table["fixed_bytes"],
        "table_marginal_bits_per_element": table["marginal_bits_per_element"],
        "table_bytes": table_bytes, "table_marginal_bytes": table_marginal,
        "held_vs_table": (tensors + python) / table_bytes,
        "cache_vs_table_marginal": rep.total / table_marginal,
        "cache_vs_fp16": rep.total / rep.fp16_total,
        "held_vs_fp16": (tensors + python) / rep.fp16_total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--lengths", default="64,256,2048,8192")
    ap.add_argument("--steps", type=int, default=8, help="one-token decode steps at the end of each fill")
    ap.add_argument("--chunk", type=int, default=2048, help="prompt tokens per forward")
    ap.add_argument("--pair-tokens", type=int, default=256, help="length of the two-cache check (0: none)")
    ap.add_argument("--table", default="results/quality-wikitext2.json")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    tables = table_rows(Path(args.table))
    lengths = [int(n) for n in args.lengths.split(",")]
    ids = load_windows(tok, "wikitext2", max(*lengths, args.pair_tokens), 1)[:1]
    out = {"model": "smollm2-135m", "data": "wikitext2", "steps": args.steps, "table": args.table,
           "machine": platform.processor() or platform.machine(), "rows": [], "per_model": {}, "second_cache": {}}
    presets = args.presets.split(",")
    recipes = {p: resolve_recipe(model, tok, p, progress=False) for p in presets}
    rows = []
    for n in lengths:
        caches = fill(model, [recipes[p] for p in presets], ids[:, :n], min(args.steps, n // 2), args.chunk)
        for preset, cache in zip(presets, caches):
            row = {"method": preset} | measure(cache, tables[preset])
            rows.append(row)
            print(f"{preset} {n:>5} tokens: cache {row['cache_bytes'] / 2**20:7.3f} MiB ({row['cache_vs_fp16']:.3f}x fp16, "
                  f"{row['cache_vs_table_marginal']:.3f}x the table's marginal bits); held with the model's state "
                  f"{row['held_bytes'] / 2**20:7.3f} MiB = {row['held_vs_table']:.3f}x the table's bytes "
                  f"({row['held_bits_per_element']:.3f} bits/element; per model {row['model_bytes'] / 2**10:.0f} KiB)",
                  flush=True)
        del caches
        out["rows"] = sorted(rows, key=lambda r: (presets.index(r["method"]), r["tokens"]))
        for preset in presets:
            first = next(r for r in out["rows"] if r["method"] == preset)
            out["per_model"][preset] = first["model_parts"] | {"total": first["model_bytes"]}
        write(out, args.json)
    # the per-model state is held once: a second cache of the same recipe adds only its own parts
    n = args.pair_tokens
    for preset in presets if n else ():
        pair = fill(model, [recipes[preset]] * 2, ids[:, :n], min(args.steps, n // 2), args.chunk)
        reports = [c.memory_report() for c in pair]
        tensors, python = held(pair)
        out["second_cache"][preset] = {
            "tokens": n, "cache_bytes": [r.total for r in reports], "model_bytes": [r.model_total for r in reports],
            "held_bytes_both": tensors + python,
            "sum_cache_bytes_plus_model_once": sum(r.total for r in reports) + reports[0].model_total,
            "model_tensor_bytes": sum(held_storages(model_state(pair[0]), stop=(model,)).values()),
        }
        write(out, args.json)


def write(out: dict, path: str | None) -> None:
    """Write the results so far (after every length: long lengths take a while)."""
    if path:
        Path(path).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
