"""Which half of a preset loses retrieval, its keys or its values: the keys of one recipe with the values of another.

    KVPACK_THREADS=1 python benchmarks/retrieval_kv_split.py --keys kvpack-3bit --values kvpack-4bit \
        --reuse results/retrieval-2k-presets-multikey.json --trials 200 \
        --json results/retrieval-2k-split-k3v4-multikey.json

The mixed recipe (named `K:<keys>+V:<values>`, the keys' settings: RoPE side, sink, recent window) answers the
trials of `--reuse` (a `kvpack eval --task retrieval` file of the same task and length): the fp16, keys' and
values' rows of those trials are copied from it, not run again, so every row of the result answered the same
prompts. Writes the rows (`--json`) and the table (`<json stem>-table.json`) as `kvpack eval` does.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from kvpack.evaluate import retrieval
from kvpack.evaluate.results import environment, read_rows, write_rows
from kvpack.evaluate.retrieval.run import DEFAULTS, run_retrieval
from kvpack.hf.models import load_model
from kvpack.recipes.recipe import Recipe
from kvpack.recipes.resolve import resolve_recipe


def split_recipe(keys: Recipe, values: Recipe) -> Recipe:
    """keys' settings and key codecs with values' value codecs."""
    if keys.num_layers != values.num_layers or keys.settings.pre_rope != values.settings.pre_rope:
        raise ValueError(f"'{keys.method}' and '{values.method}' do not store the same layers the same way")
    return Recipe(keys.settings, list(keys.key_codecs), list(values.value_codecs), dict(keys.model_identity),
                  {"keys": keys.method, "values": values.method})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", required=True, help="method whose key codecs are used")
    ap.add_argument("--values", required=True, help="method whose value codecs are used")
    ap.add_argument("--reuse", required=True, help="kvpack eval --task retrieval JSON with fp16 and both methods' rows")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--minutes", type=float)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("KVPACK_THREADS", 0)),
                    help="torch threads (default: $KVPACK_THREADS as `kvpack` reads it, else torch's choice)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    old = read_rows(args.reuse)
    fp16 = next(r for r in old if r["method"] == "fp16")
    task, length, seed, haystack, depths = fp16["task"], fp16["length"], fp16["seed"], fp16["haystack"], fp16["depths"]
    prefill = fp16.get("prefill", DEFAULTS["prefill"])
    model, tok = load_model(args.model)
    parts = {m: resolve_recipe(model, tok, m, progress=False) for m in (args.keys, args.values)}
    name = f"K:{args.keys}+V:{args.values}"
    out = Path(args.json)
    kept = read_rows(out) if out.is_file() else []
    rows = [r for r in kept if r["method"] == name]
    for r in old:  # the reused rows, cut to the trials asked for
        if r["method"] in ("fp16", args.keys, args.values):
            rows.append(r | {"results": [x for x in r["results"] if x["index"] < args.trials]})
    rows = run_retrieval(model, tok, {"fp16": None, name: split_recipe(parts[args.keys], parts[args.values])}, [task],
                         [length], depths, args.trials, seed, haystack, fp16["model"], rows,
                         lambda rs: write_rows(out, rs), progress=True, extra={"env": environment()},
                         minutes=args.minutes, prefill=prefill)
    write_rows(out, rows)
    print(retrieval.table(rows))
    write_rows(out.with_name(out.stem + "-table.json"), retrieval.pivot(rows))


if __name__ == "__main__":
    main()
