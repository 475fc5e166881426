"""TurboQuant on a model: simulated perplexity, KL and top-1 agreement vs the unquantized model.

    KVPACK_THREADS=1 flock /tmp/kvpack-heavy.lock .venv/bin/python benchmarks/turboquant_explore.py \
        --methods fp16,turboquant-2.5bit,turboquant-2.5bit:qjl,turboquant-3.5bit,turboquant-3.5bit:qjl \
        --windows 4 --json results/turboquant-wikitext2.json

Methods are `turboquant-<bits>bit` with options `:qjl` (keys: bits - 1 MSE bits + a 1-bit QJL
residual sketch, the paper's TurboQuant-prod), `:pre-rope` (keys quantized before RoPE; default
after, as in the paper) and `:rescale` (decoded vectors keep their norm), or any other method
name kvpack knows. TurboQuant recipes are built here from the codec (seed 0 for keys, 1 for
values, one rotation for all layers), the layout the `turboquant` family uses. Rows: method,
bits_per_element (everything stored, codebooks/rotations amortized over the window), ppl,
delta_pct vs the first method, kl, top1, windows, mode.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

import torch

from kvpack.codecs.turboquant import TurboQuantCodec
from kvpack.data import load_windows
from kvpack.evaluate.perplexity import simulated_perplexity
from kvpack.hf.models import load_model
from kvpack.methods import MethodSettings
from kvpack.recipes.recipe import Recipe

_NAME = re.compile(r"^turboquant-(?P<bits>\d+(\.\d+)?)bit$")


def turboquant_recipe(method: str, layers: int, head_dim: int) -> Recipe:
    """A recipe for `turboquant-<b>bit[:qjl][:pre-rope][:rescale]`: one key and one value codec for every layer."""
    preset, *options = method.split(":")
    match = _NAME.match(preset)
    unknown = set(options) - {"qjl", "pre-rope", "post-rope", "rescale"}
    if not match or unknown:
        raise ValueError(f"not a turboquant method: {method!r}")
    bits, rescale = float(match["bits"]), "rescale" in options
    keys = TurboQuantCodec(bits, head_dim, seed=0, qjl="qjl" in options, rescale=rescale)
    values = TurboQuantCodec(bits, head_dim, seed=1, rescale=rescale)
    settings = MethodSettings(name=method, family="turboquant", pre_rope="pre-rope" in options)
    return Recipe(settings, [keys] * layers, [values] * layers)


def recipe_for(method: str, model) -> Recipe:
    cfg = model.config
    layers = cfg.num_hidden_layers
    if method.startswith("turboquant-"):
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return turboquant_recipe(method, layers, head_dim)
    return Recipe.baseline(method, layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wikitext2")
    parser.add_argument("--methods", default="fp16,turboquant-2.5bit,turboquant-2.5bit:qjl,turboquant-3.5bit,turboquant-3.5bit:qjl")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--json", type=Path, default=Path("results/turboquant-wikitext2.json"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("KVPACK_THREADS", "1")))
    model, tokenizer = load_model(args.model)
    windows = load_windows(tokenizer, args.data, args.seqlen, args.windows)
    rows: list[dict] = []
    for method in args.methods.split(","):
        recipe = recipe_for(method, model)
        start = time.perf_counter()
        result = simulated_perplexity(model, windows, recipe, progress=False)
        base = rows[0]["ppl"] if rows else result.ppl
        rows.append({
            "method": method, "bits_per_element": result.bits_per_element, "ppl": result.ppl, "nll": result.nll,
            "delta_pct": 100 * (result.ppl / base - 1), "kl": result.kl, "top1": result.top1,
            "model": args.model, "data": args.data, "seqlen": args.seqlen, "windows": result.windows,
            "tokens": result.tokens, "mode": "simulated", "seconds": time.perf_counter() - start,
            "key_codec": recipe.key_codecs[0].name, "value_codec": recipe.value_codecs[0].name,
            "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.machine()},
        })
        print(json.dumps({k: rows[-1][k] for k in ("method", "bits_per_element", "ppl", "delta_pct", "kl", "top1")}), flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
