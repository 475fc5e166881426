"""kvpack's CompressedCache next to Hugging Face's own QuantizedCache (HQQ and quanto backends) on the
same streaming protocol: each WikiText-2 window fed token by token (teacher-forced) through the
cache; perplexity, bytes held per token (measured from the tensors each cache holds at the end of
the window, residual windows included, in the model's dtype as they are really stored) and decode
time per token. Writes results/hf-quantized-cache.json.

    flock /tmp/kvpack-heavy.lock .venv/bin/python benchmarks/hf_quantized_cache.py --seqlen 512 --windows 1

A backend that cannot run here is reported with its exact error instead of numbers. HQQ runs with
axis 0: with axis 1 (its documented choice) it fails on SmolLM2's 3 KV heads in hqq 0.2.8
(`hqq/core/quantize.py` dequantize: "The size of tensor a (4) must match the size of tensor b (3)").
quanto JIT-compiles a C++ extension on first use (minutes on a busy CPU).
"""
from __future__ import annotations

import argparse
import math
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache, QuantizedCache

from kvpack import load_model, load_windows
from kvpack.cache.cache import CompressedCache
from kvpack.cache.memory import fp16_cache_nbytes
from kvpack.evaluate.results import environment, write_rows
from kvpack.hf.attention import cache_kwargs
from kvpack.recipes.recipe import Recipe


def tensor_bytes(obj, seen: set | None = None) -> int:
    """Bytes of every tensor reachable from obj (tensor subclasses such as quanto's are unflattened)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def hf_cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for attr in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += tensor_bytes(getattr(layer, attr, None))
    return total


@torch.no_grad()
def stream(model, ids: torch.Tensor, cache) -> tuple[float, int, float]:
    """(summed NLL, tokens, seconds per decode step) of ids [1, n] fed one token at a time."""
    nll, steps = 0.0, ids.shape[1] - 1
    start = time.perf_counter()
    for t in range(steps):
        logits = model(ids[:, t:t + 1], **cache_kwargs(cache), use_cache=True).logits.float()
        nll += float(F.cross_entropy(logits[0], ids[0, t + 1:t + 2], reduction="sum"))
    return nll, steps, (time.perf_counter() - start) / steps


def configs(model) -> list[tuple[str, callable]]:
    layers = model.config.num_hidden_layers
    out = [("DynamicCache (model dtype)", lambda: DynamicCache(config=model.config))]
    for bits in (4, 2):
        out.append((f"hf-hqq-int{bits} g64 r128", lambda b=bits: QuantizedCache(
            backend="hqq", config=model.config, nbits=b, axis_key=0, axis_value=0, q_group_size=64, residual_length=128)))
        out.append((f"hf-quanto-int{bits} g64 r128", lambda b=bits: QuantizedCache(
            backend="quanto", config=model.config, nbits=b, axis_key=0, axis_value=0, q_group_size=64, residual_length=128)))
        for method in (f"kivi-{bits}", f"int{bits}:pre-rope:key-channel:g64:recent128"):
            out.append((f"kvpack {method}", lambda m=method: CompressedCache(model, Recipe.baseline(m, layers))))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--only", default="", help="substring filter on the config names")
    p.add_argument("--out", type=Path, default=Path("results/hf-quantized-cache.json"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    windows = load_windows(tok, "wikitext2", args.seqlen, args.windows)
    rows = []
    for name, make in configs(model):
        if args.only and args.only not in name:
            continue
        row = {"cache": name, "model": "smollm2-135m", "model_dtype": str(model.dtype), "data": "wikitext2",
               "seqlen": args.seqlen, "windows": args.windows, "env": environment()}
        try:
            nll, n, per_step, held = 0.0, 0, [], []
            for w in windows:
                cache = make()
                a, b, s = stream(model, w.unsqueeze(0), cache)
                nll, n = nll + a, n + b
                per_step.append(s)
                held.append(cache.memory_report().total if isinstance(cache, CompressedCache) else hf_cache_bytes(cache))
            tokens = args.seqlen - 1
            fp16 = fp16_cache_nbytes(model.config, tokens)
            row.update(ppl=math.exp(nll / n), bytes=sum(held) / len(held), fp16_bytes=fp16,
                       bytes_per_token_per_layer=sum(held) / len(held) / tokens / model.config.num_hidden_layers,
                       bits_per_element=16 * sum(held) / len(held) / fp16, ms_per_token=1000 * sum(per_step) / len(per_step))
        except Exception as exc:  # report why a backend cannot run here
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc(limit=3)
        rows.append(row)
        print({k: row.get(k) for k in ("cache", "ppl", "bits_per_element", "ms_per_token", "error")}, flush=True)
        write_rows(args.out, rows)


if __name__ == "__main__":
    main()
