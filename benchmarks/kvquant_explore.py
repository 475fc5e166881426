"""Screen KVQuant variants on a small setting: collect calibration activations once, fit each
variant, evaluate simulated perplexity next to fp16 on the same windows. Appends JSON lines.

    flock /tmp/kvpack-heavy.lock .venv/bin/python benchmarks/kvquant_explore.py \
        --calib 'c4[:500]' --calib-windows 8 --eval wikitext2 --eval-windows 4 \
        --methods kvquant-3bit-1pct,kvquant-3bit-1pct:plain --out benchmarks/kvquant_explore.jsonl

Activations are cached under /tmp (keyed by model, data, windows, RoPE side, sink tokens), so
later runs only pay for fitting and evaluation. Screening only: the final tables come from
`kvpack eval`, which calibrates through `kvpack.recipes.calibrate` exactly.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from kvpack.recipes.calibrate import calibration_windows, needs_fisher
from kvpack.recipes.collect import collect_activations
from kvpack.data import load_windows
from kvpack.evaluate.perplexity import simulated_perplexity
from kvpack.methods.kvquant.fit import fit_kvquant_recipe
from kvpack.methods.names import parse_method
from kvpack.hf.models import load_model
from kvpack.recipes.recipe import Recipe
from kvpack.recipes.io import model_identity


def activations(model, ids, pre_rope: bool, sink: int, cache_dir: Path):
    key = hashlib.sha256(ids.numpy().tobytes() + f"{pre_rope}-{sink}".encode()).hexdigest()[:16]
    path = cache_dir / f"acts-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    start = time.perf_counter()
    acts, timing = collect_activations(model, ids, fisher=True, sink_tokens=sink, pre_rope=pre_rope)
    print(f"collected in {time.perf_counter() - start:.0f} s (forward {timing.forward_s:.0f} s, backward {timing.backward_s:.0f} s)")
    torch.save(acts, path)
    return acts


def fisher_proxy(recipe: Recipe, acts, heads: int) -> tuple[float, float, list[float]]:
    """Sum of F * (x - decode(encode(x)))^2 over held-out rows, keys and values: ~2x the loss increase."""
    from kvpack.methods.kvquant.fit import blocks

    total_k = total_v = 0.0
    per_layer = []
    for i, layer in enumerate(acts):
        errs = []
        for codec, rows, fisher in ((recipe.key_codecs[i], layer.keys, layer.key_fisher),
                                    (recipe.value_codecs[i], layer.values, layer.value_fisher)):
            x = blocks(rows, layer.heads, heads)
            f = blocks(fisher, layer.heads, heads)
            errs.append(float((f * (codec.decode(codec.encode(x)) - x) ** 2).sum()))
        total_k += errs[0]
        total_v += errs[1]
        per_layer.append(errs[0] + errs[1])
    return total_k, total_v, per_layer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="c4[:500]")
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=2048)
    parser.add_argument("--eval", default="wikitext2")
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--methods", required=True)
    parser.add_argument("--out", default="benchmarks/kvquant_explore.jsonl")
    parser.add_argument("--cache-dir", default="/tmp/kvq")
    parser.add_argument("--proxy-only", action="store_true", help="only the Fisher proxy, no perplexity")
    parser.add_argument("--proxy-data", default="c4[500:]")
    parser.add_argument("--proxy-windows", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args.model)
    calib = calibration_windows(tokenizer, args.calib, args.calib_windows, args.calib_seqlen)
    windows = load_windows(tokenizer, args.eval, args.seqlen, args.eval_windows)
    heads = model.config.num_key_value_heads
    proxy_ids = calibration_windows(tokenizer, args.proxy_data, args.proxy_windows, args.calib_seqlen)
    proxy_acts = {}
    out = Path(args.out)
    base = {"model": args.model, "calib": args.calib, "calib_windows": args.calib_windows, "calib_seqlen": args.calib_seqlen,
            "eval": args.eval, "eval_windows": args.eval_windows, "seqlen": args.seqlen}
    fp16_path = cache_dir / f"fp16-{hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]}.json"
    if args.proxy_only:
        fp16 = float("nan")
    elif fp16_path.is_file():
        fp16 = json.loads(fp16_path.read_text())["ppl"]
    else:
        fp16 = simulated_perplexity(model, windows, Recipe.baseline("fp16", model.config.num_hidden_layers)).ppl
        fp16_path.write_text(json.dumps({"ppl": fp16}))
    print(f"fp16 {fp16:.4f}")
    for method in [m for m in args.methods.split(",") if m]:
        settings = parse_method(method)
        start = time.perf_counter()
        if settings.family == "kvquant":
            acts = activations(model, calib, settings.pre_rope, min(settings.sink_tokens, 1), cache_dir)  # sink4 reuses sink1 rows (screening)
            keys, values, info = fit_kvquant_recipe(model, acts, settings, progress=False)
            recipe = Recipe(settings, keys, values, model_identity(model), {"timing_s": info["timing_s"], "fisher": needs_fisher(settings)})
        else:
            recipe = Recipe.baseline(settings, model.config.num_hidden_layers)
        fit_s = time.perf_counter() - start
        side = (settings.pre_rope, min(settings.sink_tokens, 1))
        if side not in proxy_acts:
            proxy_acts[side] = activations(model, proxy_ids, *side, cache_dir)
        pk, pv, per_layer = fisher_proxy(recipe, proxy_acts[side], heads)
        row = {**base, "method": settings.name, "proxy_k": pk, "proxy_v": pv, "proxy_layers": per_layer, "fit_s": fit_s}
        text = f"{settings.name:55s} proxy K {pk:.3e} V {pv:.3e}"
        if not args.proxy_only:
            result = simulated_perplexity(model, windows, recipe)
            row.update({"ppl": result.ppl, "fp16": fp16, "delta_pct": 100 * (result.ppl / fp16 - 1),
                        "bits": result.bits_per_element, "eval_s": result.seconds})
            text += f"  ppl {result.ppl:.4f} ({row['delta_pct']:+.2f}%)  bits {result.bits_per_element:.3f}"
        print(text + f"  fit {fit_s:.0f} s", flush=True)
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
