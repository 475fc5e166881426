"""Bytes a CompressedCache holds on SmolLM2's shapes at long lengths, without running the model: each
layer's cache is fed random K/V [1, 3, tokens, 64] (with the model's own rotary cos/sin for pre-RoPE
recipes) in prefill chunks, then `memory_report()` measures the tensors held. Valid for codecs whose
stored bytes do not depend on the values (int-N, nf-N, KIVI, fp16); data-dependent outlier shares
(KVQuant keys) need the real model (benchmarks/cache_real_vs_sim.py). Writes results/cache-memory-shapes.json.

    .venv/bin/python benchmarks/cache_memory_shapes.py --methods fp16,int4:pre-rope:sink1,kivi-2 --lengths 2048,8192
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kvpack import load_model
from kvpack.cache.cache import CompressedCache
from kvpack.evaluate.results import write_rows
from kvpack.recipes.recipe import Recipe


@torch.no_grad()
def measure(model, method: str, lengths: list[int], chunk: int = 512) -> list[dict]:
    cfg = model.config
    layers, heads, dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    cache = CompressedCache(model, Recipe.baseline(method, layers))
    rotary = model.model.rotary_emb
    g = torch.Generator().manual_seed(0)
    rows, done = [], 0
    for length in sorted(lengths):
        while done < length:
            q = min(chunk, length - done)
            pos = torch.arange(done, done + q).unsqueeze(0)
            cos, sin = rotary(torch.empty(1), pos)
            for i in range(layers):
                k, v = torch.randn(1, heads, q, dim, generator=g), torch.randn(1, heads, q, dim, generator=g)
                cache._kvpack_receive_rope(i, (cos, sin), pos)
                cache.update(k, v, i)
            done += q
        rep = cache.memory_report()
        rows.append({"kind": "memory-shapes", "method": method, "tokens": length, "bytes": rep.total,
                     "fp16_bytes": rep.fp16_total, "ratio": rep.ratio, "bits_per_element": rep.bits_per_element,
                     "per_token_per_layer": rep.per_token_per_layer, "reserved": rep.reserved})
        print(rows[-1]["method"], length, f"ratio {rep.ratio:.3f}  bits {rep.bits_per_element:.3f}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="fp16,int4:pre-rope:sink1,nf4:pre-rope:sink1,int3:pre-rope:sink1,kivi-4,kivi-2")
    p.add_argument("--lengths", default="2048,8192")
    p.add_argument("--out", type=Path, default=Path("results/cache-memory-shapes.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model()
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for method in args.methods.split(","):
        rows += measure(model, method, lengths)
        write_rows(args.out, rows)


if __name__ == "__main__":
    main()
