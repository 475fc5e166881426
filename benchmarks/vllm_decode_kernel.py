"""One decode step, layer after layer, as vLLM's engine runs it: kvpack's packed pages (`kernel.attend`, the C++
read path) next to vLLM's own CPU attention op (`cpu_attention_with_kv_cache` over its cache in the model's dtype),
same requests, same threads, this process (no engine). A microscope for the decode-step share of a serving run
(benchmarks/vllm_time_split.py).

Keys and values are the default model's own, every layer's: one transformers forward per WikiText-2 window of
`--context` tokens (post-RoPE keys, as vLLM hands them), request r holding window r % windows; kvpack writes them
into its pages (`write_tokens`, block tables shuffled), vLLM's op gets them in its cache layout. Each row: the median
wall time of `--repeat` interleaved rounds (every configuration one step a round, after two warm-up rounds, so
drifts in machine load hit all alike) divided by the layers (`ms`: one layer's call, with every layer's pages held as
in an engine, so they are read from memory, not cache), and the ratio to vLLM's op in the same dtype.

    .venv-vllm/bin/python benchmarks/vllm_decode_kernel.py --out results/vllm-decode-kernel.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def real_kv(windows: int, context: int, layers: int) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]], object]:
    """Post-RoPE keys and values [context, Hkv, D] (float32) of the first `layers` layers ([layer][window]) for
    `windows` WikiText-2 windows, and the model's config."""
    from kvpack.data import load_windows
    from kvpack.hf.attention import cache_kwargs
    from kvpack.hf.models import load_model
    from transformers import DynamicCache

    model, tokenizer = load_model()
    ids = load_windows(tokenizer, "wikitext2", context, windows)
    keys, values = [[] for _ in range(layers)], [[] for _ in range(layers)]
    with torch.no_grad():
        for window in ids:
            cache = DynamicCache(config=model.config)
            model(window.unsqueeze(0), **cache_kwargs(cache), use_cache=True)
            for layer in range(layers):
                keys[layer].append(cache.layers[layer].keys[0].transpose(0, 1).float().contiguous())
                values[layer].append(cache.layers[layer].values[0].transpose(0, 1).float().contiguous())
    return keys, values, model.config


def kvpack_step(method: str, dtype: torch.dtype, keys, values, hf, batch: int, block: int, query: torch.Tensor,
                scale: float, recipes: str | None = None):
    """A callable running kvpack's decode step of every layer in `keys` over pages holding the requests' tokens
    (the recipe `recipes`/METHOD where that folder exists, e.g. a ':post-rope' variant)."""
    from kvpack.integrations.vllm import kernel
    from kvpack.integrations.vllm.config import parse_entry
    from kvpack.integrations.vllm.layout import layout_for
    from kvpack.integrations.vllm.pages import PagePool
    from kvpack.integrations.vllm.recipe import load_recipe
    from kvpack.integrations.vllm.write import write_tokens
    from kvpack.hf.models import model_path

    from vllm_engine import kvpack_entry

    config = parse_entry(kvpack_entry(method, recipes))
    recipe = load_recipe(config, hf, model_path("smollm2-135m"))
    context, heads, dim = keys[0][0].shape
    layout = layout_for(config, recipe, hf, heads, dim, dtype, block, context + 1)
    per = -(-context // block)
    blocks = batch * per
    buffer = torch.zeros(len(layout.layers) * blocks * block * layout.page_content_bytes(), dtype=torch.uint8)
    pool = PagePool(buffer.view(len(layout.layers), blocks, 1, block, -1)[0], layout.layers)
    table = torch.randperm(blocks, generator=torch.Generator().manual_seed(0)).view(batch, per).to(torch.int32)
    pos = torch.arange(context)
    for layer in range(len(keys)):
        for r in range(batch):
            k, v = keys[layer][r % len(keys[layer])].to(dtype), values[layer][r % len(values[layer])].to(dtype)
            write_tokens(layout, pool, layer, k, v, table[r, pos // block].long() * block + pos % block, pos)
    meta = SimpleNamespace(query_start_loc=torch.arange(batch + 1), seq_lens=torch.full((batch,), context),
                           block_table=table)
    out = torch.empty_like(query)

    def step():
        for layer in range(len(keys)):
            assert kernel.attend(layout, pool, layer, query, meta, scale, out)

    return step, layout.describe()


def vllm_step(dtype: torch.dtype, keys, values, batch: int, block: int, query: torch.Tensor, scale: float):
    """A callable running vLLM's CPU attention op for the same decode step over its own cache in `dtype`, laid out as
    vLLM's backend lays it out (`native_prefill.stage`)."""
    from vllm import _custom_ops as ops

    from kvpack.integrations.vllm.native_prefill import stage

    context, heads, dim = keys[0][0].shape
    lens = [context] * batch
    caches = []
    for layer_keys, layer_values in zip(keys, values):
        k = torch.cat([layer_keys[r % len(layer_keys)] for r in range(batch)])
        v = torch.cat([layer_values[r % len(layer_values)] for r in range(batch)])
        sc = stage(k.to(dtype), v.to(dtype), lens, block)
        if sc is None:
            raise RuntimeError("vLLM's CPU ops refused to stage a cache (see the warning above)")
        caches.append((sc.key_cache, sc.value_cache))
    table, isa = sc.table, sc.isa
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    plan = ops.cpu_attn_get_scheduler_metadata(batch, query.shape[1], heads, dim, seq_lens, dtype, qsl, True, -1, isa,
                                               False)
    out = torch.empty_like(query)

    def step():
        for key_cache, value_cache in caches:
            ops.cpu_attention_with_kv_cache(query, key_cache, value_cache, out, qsl, seq_lens, scale, True, None, -1,
                                            table, 0.0, plan, None)

    return step, isa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="kvpack-4bit,kvpack-3bit,kvpack-2bit")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=1056, help="tokens per request (1K prompt + 32 steps)")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--layers", type=int, default=None, help="layers held and attended (default: all)")
    parser.add_argument("--block", type=int, default=128, help="tokens per page (vLLM's CPU default)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=20, help="timed rounds (every configuration once a round)")
    parser.add_argument("--recipes", default=None, help="folder of saved recipes, one subfolder per method")
    parser.add_argument("--out", default="results/vllm-decode-kernel.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from vllm_engine import environment

    from kvpack.evaluate.bench.timing import median, timed

    from transformers import AutoConfig

    from kvpack.hf.models import model_path

    layers = args.layers or AutoConfig.from_pretrained(model_path("smollm2-135m")).num_hidden_layers
    keys, values, hf = real_kv(args.windows, args.context, layers)
    heads, dim = keys[0][0].shape[1:]
    q_heads = hf.num_attention_heads
    scale = dim ** -0.5
    entries = []  # (row, step): every configuration built first, then timed in interleaved rounds
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        query = torch.randn(args.batch, q_heads, dim, generator=torch.Generator().manual_seed(1)).to(dtype)
        step, isa = vllm_step(dtype, keys, values, args.batch, args.block, query, scale)
        entries.append(({"config": f"vllm-{dtype_name}", "dtype": dtype_name, "vllm_isa": isa}, step))
        for method in args.methods.split(","):
            step, layout = kvpack_step(method, dtype, keys, values, hf, args.batch, args.block, query, scale,
                                       args.recipes)
            entries.append(({"config": f"{method}-{dtype_name}", "dtype": dtype_name,
                             "page_content_bytes": layout["page_content_bytes"]}, step))
    times = [[] for _ in entries]
    for round_ in range(args.repeat + 2):  # two warm-up rounds
        for (_, step), log in zip(entries, times):
            wall, _ = timed(step, torch.device("cpu"))
            if round_ >= 2:
                log.append(wall / layers)
    rows = [{**row, "ms": median(log)} for (row, _), log in zip(entries, times)]
    for row in rows:
        base = next(r for r in rows if r["config"] == f"vllm-{row['dtype']}")
        row["x_vllm"] = row["ms"] / base["ms"]
        print(json.dumps(row), flush=True)
    out = {"benchmark": "vllm-decode-kernel", "command": "python benchmarks/vllm_decode_kernel.py " + " ".join(sys.argv[1:]),
           "batch": args.batch, "context": args.context, "layers": layers, "block_size": args.block,
           "threads": args.threads, "q_heads": q_heads, "kv_heads": heads, "head_dim": dim, **environment(), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
