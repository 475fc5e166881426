"""Small-scale RVQ exploration on SmolLM2: calibrate several rvq-* methods on the same collected
activations (collected once, cached), then simulated perplexity on the first windows of an eval set.

    flock /tmp/kvpack-heavy.lock .venv/bin/python benchmarks/rvq_explore.py \
        --methods rvq-d8-c2048-g32,rvq-d8-c2048-g32:key-contiguous --calib-windows 8 --eval-windows 4 \
        --json results/rvq-explore.json

Calibration: the first --calib-windows windows of --calib-data (default c4[:500]); recipes are
saved under --recipes/<method> and reused when present (delete them to refit). Rows of the result
JSON: method, ppl, delta vs fp16, bits per element (codes + scale + outliers, and with the
codebooks amortized over the evaluated context as the simulator counts them), fit time.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvpack.collect import LayerActivations, collect_activations
from kvpack.data import load_windows
from kvpack.evaluate.perplexity import simulated_perplexity
from kvpack.methods import parse_method
from kvpack.models import load_model
from kvpack.recipe import Recipe
from kvpack.recipe_io import model_identity
from kvpack.rvq_train import RVQTrainConfig, fit_rvq_recipe


def activations(model, tokenizer, data: str, windows: int, seqlen: int, cache: Path) -> list[LayerActivations]:
    """Collected pre-RoPE K/V rows (all tokens after the first), cached in `cache`."""
    if cache.is_file():
        return [LayerActivations(keys=k, values=v, heads=h) for k, v, h in torch.load(cache)]
    ids = load_windows(tokenizer, data, seqlen, windows)
    start = time.perf_counter()
    acts, _ = collect_activations(model, ids, fisher=False, sink_tokens=1, max_rows=None, progress=False)
    print(f"collected {windows} x {seqlen} tokens of {data} in {time.perf_counter() - start:.0f} s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save([(a.keys, a.values, a.heads) for a in acts], cache)
    return acts


def recipe_for(model, acts, method: str, folder: Path, config: RVQTrainConfig) -> tuple[Recipe, float | None]:
    """Load the saved recipe of `method` or fit and save it; returns (recipe, fit seconds or None)."""
    settings = parse_method(method)
    if settings.family != "rvq":
        return Recipe.baseline(settings, len(acts)), None
    if (folder / "recipe.json").is_file():
        recipe = Recipe.load(folder, model)
        return recipe, recipe.calibration.get("timing_s", {}).get("rvq_fit")
    keys, values, info = fit_rvq_recipe(model, acts, settings, config, progress=False)
    recipe = Recipe(settings, keys, values, model_identity(model), info)
    recipe.save(folder)
    return recipe, info["timing_s"]["rvq_fit"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", required=True)
    parser.add_argument("--calib-data", default="c4[:500]")
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--eval-data", default="wikitext2")
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rvq_dev"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-fp16", action="store_true", help="skip the fp16 row")
    parser.add_argument("--fit-only", action="store_true",
                        help="fit and save the recipes, evaluate nothing (fitting does not run the model: no lock needed)")
    args = parser.parse_args()

    model, tokenizer = load_model()
    cache = args.work / f"acts-{args.calib_data.replace('[', '_').replace(':', '-').replace(']', '')}-{args.calib_windows}x{args.seqlen}.pt"
    acts = activations(model, tokenizer, args.calib_data, args.calib_windows, args.seqlen, cache)
    windows = load_windows(tokenizer, args.eval_data, args.seqlen, args.eval_windows)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.no_fp16 and not args.fit_only and "fp16" not in methods:
        methods.insert(0, "fp16")
    rows, base = [], None
    for method in methods:
        safe = method.replace(":", "__")
        recipe, fit_s = recipe_for(model, acts, method, args.work / "recipes" / f"{safe}-{args.calib_windows}w", RVQTrainConfig())
        if args.fit_only:
            print(f"{method}: fitted in {fit_s:.0f} s" if fit_s else f"{method}: nothing to fit", flush=True)
            continue
        result = simulated_perplexity(model, windows, recipe, progress=False)
        codes_bits = None
        if recipe.settings.family == "rvq":
            x = acts[0].keys[: 3 * 64].view(1, 3, 64, -1)
            codes_bits = recipe.key_codecs[0].encode(x).bits_per_element()
        base = result.ppl if method == "fp16" else base
        row = {"method": method, "ppl": result.ppl, "delta_pct": None if base is None else 100 * (result.ppl / base - 1),
               "bits_per_element_simulated": result.bits_per_element, "bits_codes_scale": codes_bits,
               "fit_s": fit_s, "eval_s": result.seconds, "eval": f"{args.eval_data}[:{args.eval_windows}x{args.seqlen}]",
               "calib": f"{args.calib_data} {args.calib_windows}x{args.seqlen}",
               "heldout_rel_error_keys": recipe.calibration.get("mean", {}).get("keys_heldout_rel_error", [None])[-1],
               "heldout_rel_error_values": recipe.calibration.get("mean", {}).get("values_heldout_rel_error", [None])[-1]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.is_file() else []
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(old + rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
