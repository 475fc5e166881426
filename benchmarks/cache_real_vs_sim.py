"""The real compressed cache on SmolLM2: simulated vs streamed perplexity, bytes per token vs an fp16
DynamicCache at several lengths, greedy-generation agreement with fp16. Writes JSON rows to results/.

    flock /tmp/kvpack-heavy.lock .venv/bin/python benchmarks/cache_real_vs_sim.py \
        --methods fp16,int4:pre-rope:sink1,kivi-2,kvquant-4bit-1pct --seqlen 512 --windows 1 --chunk 1 \
        --memory-lengths 2048,8192 --gen-tokens 128

Calibrated methods use the recipe `kvpack eval` would use (`resolve_recipe`: calibrated on
`--calib-windows` windows of `--calib-seqlen` tokens of `--calib-data`, cached on disk), so with
`--calib-windows 16 --calib-seqlen 2048` the recipes are those of the perplexity tables.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvpack import load_model, load_windows
from kvpack.cache.cache import CompressedCache
from kvpack.data import load_corpus, tokenize
from kvpack.evaluate.perplexity import simulated_perplexity
from kvpack.evaluate.results import environment, write_rows
from kvpack.evaluate.streaming import streaming_perplexity
from kvpack.hf.attention import cache_kwargs
from kvpack.recipes.recipe import Recipe
from kvpack.recipes.resolve import resolve_recipe
from kvpack.recipes.simulate import Simulator


def _append(path: Path, row: dict) -> None:
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows = [r for r in rows if not (r["method"] == row["method"] and r.get("kind") == row.get("kind")
                                    and r.get("tokens") == row.get("tokens") and r.get("chunk") == row.get("chunk")
                                    and r.get("dtype", "float32") == row.get("dtype", "float32"))]
    write_rows(path, rows + [row])


class Perturbed(Simulator):
    """Simulation whose keys/values are first multiplied by (1 + rel * N(0, 1)) noise: the size of the float
    noise by which a one-token forward differs from a whole-window one (k_proj/v_proj ~1e-6 relative)."""

    def __init__(self, recipe, rel: float, seed: int):
        super().__init__(recipe)
        self.rel = rel
        self.gen = torch.Generator().manual_seed(seed)

    def _noisy(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.rel * torch.randn(x.shape, generator=self.gen, dtype=x.dtype))

    def __call__(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
        return super().__call__(layer_idx, self._noisy(key), self._noisy(value))


def perturbed_ppls(model, windows: torch.Tensor, recipe, seeds: int, rel: float) -> list[float]:
    """Simulated perplexity of `windows` under `seeds` independent perturbations of relative size `rel`:
    how far float noise alone moves the number, through the quantizer's rounding decisions."""
    return [simulated_perplexity(model, windows, recipe, progress=False, simulator=Perturbed(recipe, rel, seed)).ppl
            for seed in range(seeds)]


def noise_band(noisy: list[float], sim_ppl: float) -> dict:
    """Lowest/highest perturbed perplexity relative to the unperturbed one (None without perturbed runs)."""
    return {"min_rel_diff": min(noisy) / sim_ppl - 1 if noisy else None,
            "max_rel_diff": max(noisy) / sim_ppl - 1 if noisy else None}


@torch.no_grad()
def memory_rows(model, recipe, ids: torch.Tensor, lengths: list[int], prefill_chunk: int = 512) -> list[dict]:
    """Prefill up to each length (in chunks), then measure the cache."""
    rows = []
    cache = CompressedCache(model, recipe)
    done = 0
    for length in sorted(lengths):
        while done < length:
            step = min(prefill_chunk, length - done)
            model(ids[:, done:done + step], **cache_kwargs(cache), use_cache=True)
            done += step
        rep = cache.memory_report()
        rows.append({"kind": "memory", "method": recipe.method, "tokens": length, "bytes": rep.total,
                     "fp16_bytes": rep.fp16_total, "ratio": rep.ratio, "bits_per_element": rep.bits_per_element,
                     "per_token_per_layer": rep.per_token_per_layer, "reserved": rep.reserved})
    return rows


@torch.no_grad()
def generation_row(model, recipe, prompt: torch.Tensor, reference: torch.Tensor, new_tokens: int) -> dict:
    start = time.perf_counter()
    out = model.generate(prompt, **cache_kwargs(CompressedCache(model, recipe)), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False)[0, prompt.shape[1]:]
    same = (out == reference).long()
    first_diff = int((same == 0).nonzero()[0]) if bool((same == 0).any()) else new_tokens
    return {"kind": "generation", "method": recipe.method, "tokens": new_tokens, "prompt_tokens": prompt.shape[1],
            "agreement": float(same.float().mean()), "first_divergence": first_diff, "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="fp16,int4:pre-rope:sink1,nf4:pre-rope:sink1,kivi-2,kivi-4")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--chunk", type=int, default=1)
    p.add_argument("--memory-lengths", default="2048,8192")
    p.add_argument("--gen-prompt", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--calib-data", default="c4[:500]")
    p.add_argument("--recipes", type=Path, help="folder of saved recipes, one subfolder per method name; used when present")
    p.add_argument("--calib-windows", type=int, default=4)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--noise-seeds", type=int, default=8,
                   help="simulations under 1e-6 relative K/V noise, to show how far float noise alone moves the number")
    p.add_argument("--noise", type=float, default=1e-6)
    p.add_argument("--skip", default="", help="comma list of parts to skip: ppl,memory,generation; 'real' = only the simulation and its noise band (noise-band.json)")
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--data", default="wikitext2", help="corpus spec of the perplexity windows (e.g. 'c4[500:]')")
    p.add_argument("--ppl-out", default="cache-real-vs-sim.json", help="file under --out for the perplexity rows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's dtype (the shipped recipes serve every dtype): bfloat16 to compare with vLLM's bf16 runs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    model, tok = load_model(dtype=getattr(torch, args.dtype))
    windows = load_windows(tok, args.data, args.seqlen, args.windows)
    text_ids = tokenize(tok, load_corpus("wikitext2").text).unsqueeze(0)
    lengths = [int(x) for x in args.memory_lengths.split(",") if x]
    prompt = text_ids[:, : args.gen_prompt]
    reference = model.generate(prompt, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                               do_sample=False)[0, prompt.shape[1]:] if "generation" not in skip else None
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        saved = None if args.recipes is None else args.recipes / "".join(c if c.isalnum() or c in "-_." else "_" for c in method)
        if saved is not None and saved.is_dir():
            recipe = Recipe.load(saved, model)  # e.g. fitted by benchmarks/rvq_explore.py --save-recipes
        else:
            recipe = resolve_recipe(model, tok, method, calib_data=args.calib_data, calib_windows=args.calib_windows,
                                    calib_seqlen=args.calib_seqlen, progress=False)
        calib = None if not recipe.calibration else {
            "windows": recipe.calibration.get("windows"), "seqlen": recipe.calibration.get("seqlen"),
            "data": recipe.calibration.get("data"), "seconds": time.perf_counter() - t0}
        if "ppl" not in skip:
            sim = simulated_perplexity(model, windows, recipe, progress=False)
            noisy = perturbed_ppls(model, windows, recipe, args.noise_seeds, args.noise)
            band = noise_band(noisy, sim.ppl)
        if "ppl" not in skip and "real" in skip:  # the simulation and its float-noise band only, at any number of windows
            row = {"kind": "noise-band", "method": recipe.method, "data": "wikitext2", "seqlen": args.seqlen,
                   "windows": args.windows, "sim_ppl": sim.ppl, "noise_rel": args.noise, "noisy_ppls": noisy, **band,
                   "spread_pct": 100 * (max(noisy + [sim.ppl]) - min(noisy + [sim.ppl])) / sim.ppl,
                   "calibration": calib, "env": environment()}
            _append(args.out / "noise-band.json", row)
            print(json.dumps({k: row[k] for k in ("method", "windows", "sim_ppl", "min_rel_diff", "max_rel_diff", "spread_pct")}), flush=True)
        if "ppl" not in skip and "real" not in skip:
            real = streaming_perplexity(model, windows, recipe, chunk=args.chunk, progress=False)
            row = {"kind": "ppl", "method": recipe.method, "data": args.data, "dtype": args.dtype, "seqlen": args.seqlen,
                   "windows": args.windows, "tokens": real.tokens, "chunk": args.chunk,
                   "sim_ppl": sim.ppl, "real_ppl": real.ppl, "rel_diff": real.ppl / sim.ppl - 1,
                   "sim_bits": sim.bits_per_element, "real_bits": real.bits_per_element,
                   "noise": {"rel": args.noise, "ppls": noisy, **band},
                   "sim_seconds": sim.seconds, "real_seconds": real.seconds, "calibration": calib, "env": environment()}
            _append(args.out / args.ppl_out, row)
            print(json.dumps({k: row[k] for k in ("method", "sim_ppl", "real_ppl", "rel_diff", "noise", "real_bits")}), flush=True)
        if "memory" not in skip:
            for row in memory_rows(model, recipe, text_ids, lengths):
                row["calibration"] = calib
                _append(args.out / "cache-memory.json", row)
                print(json.dumps({k: row[k] for k in ("method", "tokens", "ratio", "bits_per_element")}), flush=True)
        if "generation" not in skip:
            row = generation_row(model, recipe, prompt, reference, args.gen_tokens)
            row["calibration"] = calib
            _append(args.out / "cache-generation.json", row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
