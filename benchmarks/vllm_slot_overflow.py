"""How many key outliers do not fit a fixed number of slots per token, and what the slots cost in page bytes.

Keys' outliers (elements beyond the calibrated per-channel range) vary per token; vLLM pages hold a fixed number
per token and clamp the rest (`kvpack.integrations.vllm.slots`). This runs the default model (transformers) on
WikiText-2 windows, takes every layer's pre-RoPE keys (k_proj output, sink token excluded) and, for each slot
count, reports the share of key outliers clamped and the page bytes per token relative to bf16, for fixed slots per
token and for a per-page pool of the same count per token on average (pages of 128 tokens cut per layer along the
windows' tokens, so a page may straddle two windows).

    python benchmarks/vllm_slot_overflow.py                         # -> results/vllm-slot-overflow.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import kvpack
from kvpack.integrations.vllm.slots import LayerSlots, nuq_part, per_token_bytes
from kvpack.recipes.bundled import SHIPPED_DIR
from kvpack.recipes.recipe import Recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="kvpack-4bit,kvpack-3bit,kvpack-2bit")
    parser.add_argument("--slots", default="2,3,4,8")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--out", default="results/vllm-slot-overflow.json")
    args = parser.parse_args()
    model, tok = kvpack.load_model("smollm2-135m")
    ids = kvpack.load_windows(tok, "wikitext2", args.seqlen, args.windows)
    keys: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(
        lambda m, a, o, i=i: keys.setdefault(i, []).append(o.detach()[0, 1:])) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for window in ids:
            model(window.unsqueeze(0))
    for h in hooks:
        h.remove()
    rows = []
    for method in args.methods.split(","):
        recipe = Recipe.load(SHIPPED_DIR / method)
        counts = []  # per layer: outliers per token
        for i, codec in enumerate(recipe.key_codecs):
            k = torch.cat(keys[i]).view(-1, codec.heads, codec.head_dim).transpose(0, 1)
            _, mask, _, _ = codec.normalize(k)
            counts.append(mask.sum((0, 2)))
        c = torch.cat(counts)
        for slots in map(int, args.slots.split(",")):
            layers = [LayerSlots(nuq_part(kc, slots), nuq_part(vc, None), recipe.settings.sink_tokens, torch.bfloat16)
                      for kc, vc in zip(recipe.key_codecs, recipe.value_codecs)]
            per = per_token_bytes(layers, 128, 2)
            rows.append({"method": method, "key_outliers": "token", "key_outlier_slots": slots,
                         "key_outliers_per_token_mean": float(c.float().mean()),
                         "tokens_over_slots_pct": 100 * float((c > slots).float().mean()),
                         "outliers_clamped_pct": 100 * float((c - slots).clamp(min=0).sum() / c.sum().clamp(min=1)),
                         "page_bytes_per_token_layer": per, "x_bf16": 2 * 3 * 64 * 2 / per})
            print(json.dumps(rows[-1]), flush=True)
            # the per-page pool: `slots` entries per token on average, shared by a page's 128 tokens (per window)
            pages = [x[: x.numel() // block * block].view(-1, block).sum(1) for x in counts for block in [128]]
            per_page = torch.cat([p.view(-1) for p in pages])
            clamped = (per_page - slots * 128).clamp(min=0).sum()
            layers = [LayerSlots(nuq_part(kc, 0), nuq_part(vc, None), recipe.settings.sink_tokens, torch.bfloat16,
                                 slots * 128) for kc, vc in zip(recipe.key_codecs, recipe.value_codecs)]
            per = per_token_bytes(layers, 128, 2)
            rows.append({"method": method, "key_outliers": "page", "key_outlier_slots": slots,
                         "key_outliers_per_token_mean": float(c.float().mean()),
                         "pages_over_pool_pct": 100 * float((per_page > slots * 128).float().mean()),
                         "outliers_clamped_pct": 100 * float(clamped / per_page.sum().clamp(min=1)),
                         "page_bytes_per_token_layer": per, "x_bf16": 2 * 3 * 64 * 2 / per})
            print(json.dumps(rows[-1]), flush=True)
    out = {"benchmark": "vllm-slot-overflow", "command": "python benchmarks/vllm_slot_overflow.py " + " ".join(sys.argv[1:]),
           "data": "wikitext2", "seqlen": args.seqlen, "windows": args.windows, "block_size": 128,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
