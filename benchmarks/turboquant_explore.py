"""TurboQuant on a model: simulated perplexity, KL and top-1 agreement vs the unquantized model.

    KVPACK_THREADS=1 flock /tmp/kvpack-heavy.lock .venv/bin/python benchmarks/turboquant_explore.py \
        --methods fp16,turboquant-2.5bit,turboquant-2.5bit:qjl,turboquant-3.5bit,turboquant-3.5bit:qjl \
        --windows 4 --json results/turboquant-wikitext2.json

Rotation ablation (one switch per row, calibrated pieces fitted on --calib-data only):

    KVPACK_THREADS=1 flock /tmp/kvpack-heavy.lock .venv/bin/python benchmarks/turboquant_explore.py \
        --methods fp16,turboquant-3bit,turboquant-3bit:fitted,kvquant-3bit-1pct,kvquant-3bit-1pct+turboquant-3bit \
        --windows 4 --calib-windows 4 --json results/rotation-ablation.json

Methods are `turboquant-<bits>bit` with the family's options (`:qjl`: keys get bits - 1 MSE bits
+ a 1-bit QJL residual sketch, the paper's TurboQuant-prod; `:pre-rope`: keys quantized before
RoPE, default after as in the paper; `:rescale`: decoded vectors keep their norm; generic
`:sink<N>` ...), any other method name kvpack knows (calibrated ones on --calib-data, cached),
and two constructions of this script:
- `<turboquant name>:fitted`: per layer, the Lloyd-Max levels are replaced by Fisher-weighted 1-D
  k-means levels fitted to the rotated unit vectors of calibration keys (taken where the method
  quantizes them) and values; each vector weighs norm^2 * ||dL/dx||^2 (the rotation-invariant
  part of its Fisher information), rotation and everything else unchanged.
- `<turboquant name>:centered`: per layer and KV head, the mean calibration key (where the method
  quantizes keys) and mean value are subtracted before the norm and rotation and added back after
  decoding (stored fp16, counted); with `:centered:fitted` the levels are fitted after centering.
- `A+B`: keys stored as method A stores them (A's settings: where keys are taken, fp16 tokens),
  values as method B stores them.
TurboQuant codecs are built for the model's head_dim (seed 0 for keys, 1 for values, one rotation
for all layers): what the `turboquant` family builds. Rows: method, bits_per_element (everything
stored, codebooks/rotations amortized over the window), ppl, delta_pct vs the first method, kl,
top1, windows, mode.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from kvpack.codecs.kmeans import weighted_kmeans_1d
from kvpack.codecs.turboquant import TurboQuantCodec
from kvpack.data import load_windows
from kvpack.evaluate.perplexity import simulated_perplexity
from kvpack.hf.models import load_model
from kvpack.methods import needs_calibration, parse_method
from kvpack.recipes.calibrate import cached_calibration, calibration_windows
from kvpack.recipes.collect import collect_activations
from kvpack.recipes.io import head_dim_of
from kvpack.recipes.recipe import Recipe


class Calibration:
    """What calibrated rows need: the calibration windows and, once per key position, Fisher-weighted activations."""

    def __init__(self, model, tokenizer, data: str, windows: int, seqlen: int):
        self.model, self.tokenizer, self.data, self.windows, self.seqlen = model, tokenizer, data, windows, seqlen
        self._acts: dict[bool, list] = {}

    def activations(self, pre_rope: bool) -> list:
        if pre_rope not in self._acts:
            ids = calibration_windows(self.tokenizer, self.data, self.windows, self.seqlen)
            self._acts[pre_rope], _ = collect_activations(self.model, ids, fisher=True, sink_tokens=0, pre_rope=pre_rope,
                                                          max_rows=32768, progress=False)
        return self._acts[pre_rope]


def head_means(rows: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """Mean row per KV head: rows [n, head_dim], heads [n] -> [heads, head_dim]."""
    count = int(heads.max()) + 1
    sums = torch.zeros(count, rows.shape[-1]).index_add_(0, heads, rows)
    return sums / torch.bincount(heads, minlength=count).clamp_min(1)[:, None].float()


def fitted_levels(codec: TurboQuantCodec, rows: torch.Tensor, fisher: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per code width, Fisher-weighted k-means levels of the rotated unit vectors of rows [n, head_dim]."""
    norm = rows.norm(dim=-1, keepdim=True)
    y = codec.rotation.rotate(rows / norm.clamp_min(1e-30))
    weight = (norm**2 * fisher.sum(-1, keepdim=True)).expand_as(y)
    levels = {}
    for _, width, cols in codec._parts():
        levels[width] = weighted_kmeans_1d(y[:, cols], 1 << width, weight[:, cols])
    return levels


def calibrated_recipe(recipe: Recipe, calib: Calibration, centered: bool, fitted: bool) -> Recipe:
    """`recipe` (TurboQuant) with per-layer centers and/or fitted levels from calibration activations
    (see the module docstring)."""
    acts = calib.activations(recipe.settings.pre_rope)
    keys, values = [], []
    suffix = ("-centered" if centered else "") + ("-fitted" if fitted else "")
    for layer, a in enumerate(acts):
        for codec, rows, fisher, out in ((recipe.key_codecs[layer], a.keys, a.key_fisher, keys),
                                         (recipe.value_codecs[layer], a.values, a.value_fisher, values)):
            if codec.qjl and fitted:
                raise ValueError("fitted levels are not combined with the QJL sketch here")
            center = head_means(rows, a.heads) if centered else None
            if center is not None:
                rows = rows - center.half().float()[a.heads]
            levels = fitted_levels(codec, rows, fisher) if fitted else None
            out.append(TurboQuantCodec(codec.bits, codec.head_dim, codec.seed, qjl=codec.qjl, rescale=codec.rescale,
                                       levels=levels, center=center, name=codec.name + suffix))
    return Recipe(recipe.settings, keys, values)


def recipe_for(method: str, model, calib: Calibration) -> Recipe:
    """The recipe of a method name of this script (see the module docstring)."""
    if "+" in method:
        key_method, value_method = method.split("+")
        keys, values = recipe_for(key_method, model, calib), recipe_for(value_method, model, calib)
        return Recipe(keys.settings, keys.key_codecs, values.value_codecs)
    name, own = method, set()
    while name.endswith((":fitted", ":centered")):
        name, _, modifier = name.rpartition(":")
        own.add(modifier)
    settings = parse_method(name)
    layers = model.config.num_hidden_layers
    if needs_calibration(settings):
        recipe = cached_calibration(model, calib.tokenizer, settings, calib.data, calib.windows, calib.seqlen, progress=False)
    else:
        recipe = Recipe.baseline(settings, layers)
    if settings.family == "turboquant":  # built for the model's head_dim, as the family's codecs bind on first use
        head_dim = head_dim_of(model.config)
        recipe = Recipe(settings, [c.bind(head_dim) for c in recipe.key_codecs],
                        [c.bind(head_dim) for c in recipe.value_codecs])
    return calibrated_recipe(recipe, calib, "centered" in own, "fitted" in own) if own else recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wikitext2")
    parser.add_argument("--methods", default="fp16,turboquant-2.5bit,turboquant-2.5bit:qjl,turboquant-3.5bit,turboquant-3.5bit:qjl")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--json", type=Path, default=Path("results/turboquant-wikitext2.json"))
    parser.add_argument("--calib-data", default="c4[:500]")
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--append", action="store_true",
                        help="add rows to --json (same model, data, seqlen, windows); deltas vs its first row")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("KVPACK_THREADS", "1")))
    model, tokenizer = load_model(args.model)
    windows = load_windows(tokenizer, args.data, args.seqlen, args.windows)
    calib = Calibration(model, tokenizer, args.calib_data, args.calib_windows, args.seqlen)
    rows: list[dict] = json.loads(args.json.read_text()) if args.append and args.json.is_file() else []
    for row in rows:
        if (row["model"], row["data"], row["seqlen"], row["windows"]) != (args.model, args.data, args.seqlen, len(windows)):
            raise SystemExit(f"{args.json} holds rows of another model/data/seqlen/window count; drop --append")
    for method in args.methods.split(","):
        start = time.perf_counter()
        recipe = recipe_for(method, model, calib)
        result = simulated_perplexity(model, windows, recipe, progress=False)
        seconds = time.perf_counter() - start
        base = rows[0]["ppl"] if rows else result.ppl
        calibrated = any(w in method for w in ("kvquant", "fitted", "centered"))
        rows.append({
            "method": method, "bits_per_element": result.bits_per_element, "ppl": result.ppl, "nll": result.nll,
            "delta_pct": 100 * (result.ppl / base - 1), "kl": result.kl, "top1": result.top1,
            "model": args.model, "data": args.data, "seqlen": args.seqlen, "windows": result.windows,
            "tokens": result.tokens, "mode": "simulated", "seconds": seconds,
            "key_codec": recipe.key_codecs[0].name, "value_codec": recipe.value_codecs[0].name,
            "pre_rope": recipe.settings.pre_rope, "sink_tokens": recipe.settings.sink_tokens,
            "calibration": f"{args.calib_data} {args.calib_windows}x{args.seqlen}" if calibrated else None,
            "command": " ".join(["benchmarks/turboquant_explore.py", *sys.argv[1:]]),
            "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.machine()},
        })
        print(json.dumps({k: rows[-1][k] for k in ("method", "bits_per_element", "ppl", "delta_pct", "kl", "top1")}), flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
