"""How far each method's stored keys and values are from the fp16 ones on a retrieval prompt.

    KVPACK_THREADS=1 .venv/bin/python benchmarks/retrieval_kv_error.py --methods kivi-2,kvpack-2bit \
        --length 2048 --json results/retrieval-kv-error-2k.json

The prompt (trial 0 of --task) is prefilled into an fp16 DynamicCache and into each method's CompressedCache with
prefill="exact", so every layer of every cache sees the same inputs and the difference is the quantizer alone.
Per layer: squared error of the stored keys (post-RoPE, as attention reads them) and values over their squared
norm, all stored tokens (fp16 sink and recent window included); the row holds the mean over layers and the worst
layer.
"""
from __future__ import annotations

import argparse

import torch
from transformers import DynamicCache

from kvpack.cache.cache import CompressedCache
from kvpack.evaluate.results import environment, write_rows
from kvpack.evaluate.retrieval.tasks import make_trial
from kvpack.evaluate.retrieval.text import Haystack
from kvpack.hf.attention import cache_kwargs
from kvpack.hf.models import load_model
from kvpack.methods.names import parse_method
from kvpack.recipes.resolve import resolve_recipe


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """sum((x - ref)^2) / sum(ref^2)."""
    return float(((x.float() - ref.float()) ** 2).sum() / (ref.float() ** 2).sum())


def stored(cache: CompressedCache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's stored keys (post-RoPE) and values, dequantized."""
    layer = cache.layers[i]
    rope = cache.rope_for(i, layer.first_slot, layer.get_seq_length()) if cache.pre_rope else None
    return layer.read_all(rope)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="kivi-2,kvpack-2bit")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="single_needle")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--haystack", default="c4[500:]")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(args.model)
    trial = make_trial(tok, Haystack(tok, args.haystack), args.task, args.length, 0, [0, 0.25, 0.5, 0.75, 1], 0)
    ids = torch.tensor([trial.ids])
    fp16 = DynamicCache(config=model.config)
    model(ids, **cache_kwargs(fp16), use_cache=True)
    rows = []
    for name in args.methods.split(","):
        recipe = resolve_recipe(model, tok, parse_method(name), calib_data="c4[:500]", calib_windows=args.calib_windows,
                                calib_seqlen=2048, recipe_dir=None, progress=False)
        cache = CompressedCache(model, recipe, prefill="exact")
        model(ids, **cache_kwargs(cache), use_cache=True)
        keys, values = [], []
        for i, ref in enumerate(fp16.layers):
            k, v = stored(cache, i)
            keys.append(relative_error(k, ref.keys))
            values.append(relative_error(v, ref.values))
        rows.append({"method": name, "task": args.task, "length": args.length, "model": args.model,
                     "key_rel_err": round(sum(keys) / len(keys), 4), "key_rel_err_worst": round(max(keys), 4),
                     "value_rel_err": round(sum(values) / len(values), 4), "value_rel_err_worst": round(max(values), 4),
                     "env": environment()})
        print(rows[-1]["method"], rows[-1]["key_rel_err"], rows[-1]["value_rel_err"], flush=True)
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
