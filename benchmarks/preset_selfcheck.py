"""The held-out check of the kvpack presets' switches on a real model, and what it buys on WikiText-2.

For each preset: calibrate it (the check runs: candidates fitted on the first windows, scored on the held-out
ones, the kept configuration refitted on all), the faithful `kvquant-<N>bit-1pct` and the unchecked preset (every
switch named: `kvquant-<N>bit-1pct:fisher-s2:alloc-global:qnorm`) on the same calibration windows (activations and
Fisher collected once), then the simulated WikiText-2 perplexity of the three next to fp16 on the first
`--eval-windows` windows. With `--eval-windows 0` only the check runs (no final fit, no evaluation): what the
check would keep on a calibration, e.g. the shipped recipes' (`--calib-windows 16`).

    python benchmarks/preset_selfcheck.py --presets kvpack-3bit --calib-windows 4 --eval-windows 4 \
        --json results/preset-selfcheck.json
    python benchmarks/preset_selfcheck.py --presets kvpack-4bit,kvpack-2bit --calib-windows 4 --eval-windows 0 \
        --json results/preset-selfcheck-decisions.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvpack.data import load_windows
from kvpack.evaluate.perplexity import simulated_perplexities
from kvpack.evaluate.results import environment
from kvpack.hf.models import load_model
from kvpack.methods import parse_method
from kvpack.methods.kvpack.config import base_name
from kvpack.recipes.calibrate import calibrate_windows, calibration_windows
from kvpack.recipes.collect import collect_activations
from kvpack.recipes.recipe import Recipe
from kvpack.recipes.select import select_switches


def candidate_rows(record: dict, preset: str) -> list[dict]:
    """One row per candidate of a selection record (method "<preset> candidate: <switches>"), for the docs table."""
    rows = []
    for row in record.get("candidates", []):
        label = " +".join(row["switches"]) or "faithful"
        rows.append({"method": f"{preset} candidate: {label}", "fitted_as": row["method"], "heldout_kl": row["kl"],
                     "heldout_nll": row["nll"], "kept": "yes" if row["method"] == record["method"] else "",
                     "fit_s": row["fit_s"], "heldout_windows": len(record["heldout_windows"]),
                     "calib_windows": len(record["fit_windows"]) + len(record["heldout_windows"])})
    return rows


def check_only(model, ids: torch.Tensor, activations: list, preset: str, data: str) -> dict:
    """The check's record for `preset` on windows ids with their `activations` (no final fit)."""
    _, record = select_switches(model, ids, activations, parse_method(preset), progress=True)
    return {"method": preset, "role": "check only", "calibration": {"data": data, "windows": int(ids.shape[0]),
            "seqlen": int(ids.shape[1])}, "fitted_as": record["method"], "selection": record}


def compare(model, tokenizer, ids: torch.Tensor, preset: str, data: str, eval_windows: int, seqlen: int) -> list[dict]:
    """Rows for fp16, the faithful configuration, the unchecked and the checked preset on WikiText-2."""
    bits = parse_method(preset).bits
    names = [f"kvquant-{bits}bit-1pct", base_name(bits), preset]
    recipes = [Recipe.baseline("fp16", model.config.num_hidden_layers)]
    recipes += [calibrate_windows(model, ids, parse_method(name), data) for name in names]
    windows = load_windows(tokenizer, "wikitext2", seqlen, eval_windows)
    start = time.perf_counter()
    results = simulated_perplexities(model, windows, recipes, progress=True)
    base = results[0].ppl
    rows = []
    for role, recipe, result in zip(("fp16", "faithful", "unchecked", "checked"), recipes, results):
        rows.append({
            "method": result.method, "role": role, "ppl": result.ppl, "nll": result.nll,
            "delta_pct": 100 * (result.ppl / base - 1), "kl": result.kl, "top1": result.top1,
            "bits_per_element": result.bits_per_element, "data": "wikitext2", "seqlen": seqlen,
            "windows": result.windows, "mode": "simulated",
            "calibration": {"data": data, "windows": int(ids.shape[0]), "seqlen": int(ids.shape[1])},
            "fitted_as": recipe.calibration.get("selection", {}).get("method", recipe.method),
            "selection": recipe.calibration.get("selection"),
        })
    print(f"evaluated in {time.perf_counter() - start:.0f} s")
    return rows + candidate_rows(recipes[-1].calibration["selection"], preset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--presets", default="kvpack-3bit")
    parser.add_argument("--calib-data", default="c4[:500]")
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    ids = calibration_windows(tokenizer, args.calib_data, args.calib_windows, args.seqlen, model=model)
    rows = []
    presets = args.presets.split(",")
    if not args.eval_windows:  # one collection for every preset (same windows, sink token and pre-RoPE keys)
        settings = parse_method(presets[0])
        activations, _ = collect_activations(model, ids, fisher=True, sink_tokens=settings.sink_tokens)
    for preset in presets:
        if args.eval_windows:
            rows += compare(model, tokenizer, ids, preset, args.calib_data, args.eval_windows, args.seqlen)
        else:
            row = check_only(model, ids, activations, preset, args.calib_data)
            rows += [row, *candidate_rows(row["selection"], preset)]
    for row in rows:
        row.update(model=args.model, env=environment())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
