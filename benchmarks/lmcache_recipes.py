"""Calibrate (once) the SmolLM2 recipes the LMCache serde benchmark uses; each lands in its own folder.

    KVPACK_DATA=/work/shared/data .venv/bin/python benchmarks/lmcache_recipes.py [--out DIR] [METHOD ...]

Defaults: kvquant-4bit-1pct and kvquant-3bit-1pct (pre-RoPE keys, used when LMCache hands the serde
the chunk's cached_positions) and their ':post-rope' variants (the fallback for chunks without them),
on 16 C4 windows of 2048 tokens (results/lmcache-serde.json used `--windows 4`: 16 windows of Fisher
collection need ~7 GB, more than this shared machine had free). Folders that already hold a recipe are kept.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

DEFAULT_METHODS = ["kvquant-3bit-1pct", "kvquant-3bit-1pct:post-rope", "kvquant-4bit-1pct", "kvquant-4bit-1pct:post-rope"]
DEFAULT_OUT = Path(os.environ.get("KVPACK_LMCACHE_RECIPES", Path.home() / ".cache" / "kvpack" / "lmcache-recipes"))


def recipe_dir(out: Path, method: str) -> Path:
    return out / method.replace(":", "_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="*", default=DEFAULT_METHODS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--data", default="c4[:500]")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("KVPACK_THREADS", "1")))
    import kvpack

    model = tok = None
    for method in args.methods:
        target = recipe_dir(args.out, method)
        if (target / "recipe.json").is_file():
            print(f"{method}: kept {target}")
            continue
        if model is None:
            model, tok = kvpack.load_model("smollm2-135m")
        recipe = kvpack.calibrate(model, tok, method, data=args.data, windows=args.windows, seqlen=args.seqlen)
        recipe.save(target)
        print(f"{method}: wrote {target}")


if __name__ == "__main__":
    main()
