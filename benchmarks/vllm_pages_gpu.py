"""Standalone GPU check of the vLLM plug-in's CUDA path, without vLLM: real page layouts on the device, the write
path (slot codec's torch code on the device) and the Triton page kernels (kvpack.integrations.vllm.triton_pages)
against the torch reference (read.attend over a CPU copy of the same pages), timed next to torch SDPA on bf16 K/V
of the same length.

Per method (kvpack-3bit, kvquant-3bit-1pct, fp16: layer 0 of the shipped recipes, SmolLM2-135M's 3 KV heads x 64,
9 query heads, bf16, pages of 16 tokens):
- check: 3 requests of a few hundred tokens written in prefill chunks and decode steps on the GPU; the written bytes
  are compared with the CPU write path's (fraction equal: float order on the GPU may move a code), then decode and
  chunked-prefill attention with the Triton kernels vs read.attend over a CPU copy of the GPU pages (max abs error);
- timing (CUDA events, median): decode step attention at each context x batch (Triton, and bf16 SDPA over
  [batch, 9, L, 64] K/V), and the write of one decode step and of one 512-token prefill chunk.

    .venv/bin/python benchmarks/vllm_pages_gpu.py --out results/vllm-pages-gpu.json
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/vllm_pages_gpu.py --device cpu --contexts 64 --batches 1 \
        --reps 1 --out /tmp/pages.json   # a dry run of this script on the CPU (interpreter; timings meaningless)
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from kvpack.integrations.vllm import cuda_read
from kvpack.integrations.vllm.config import KvpackVllmConfig
from kvpack.integrations.vllm.layout import EngineLayout
from kvpack.integrations.vllm.pages import PagePool
from kvpack.integrations.vllm.read import attend
from kvpack.integrations.vllm.rope import RopeTable
from kvpack.integrations.vllm.slots import LayerSlots, nuq_part, raw_part
from kvpack.integrations.vllm.write import write_tokens
from kvpack.recipes.bundled import SHIPPED_DIR
from kvpack.recipes.recipe import Recipe

BLOCK, HEADS, DIM, GROUP = 16, 3, 64, 3
METHODS = ("kvpack-3bit", "kvquant-3bit-1pct", "fp16")


def rope_table(max_len: int, base: float = 100000.0) -> RopeTable:
    """rotate_half RoPE at SmolLM2's base, without a model config."""
    rope = object.__new__(RopeTable)
    inv = 1.0 / base ** (torch.arange(0, DIM, 2).float() / DIM)
    emb = torch.arange(max_len).float()[:, None] * inv[None, :]
    emb = torch.cat([emb, emb], 1)
    rope.cos, rope.sin = emb.cos(), emb.sin()
    return rope


def make_layout(method: str, max_len: int) -> EngineLayout:
    dtype = torch.bfloat16
    if method == "fp16":
        layers = [LayerSlots(raw_part(HEADS, DIM, dtype), raw_part(HEADS, DIM, dtype), 0, dtype)]
        return EngineLayout(KvpackVllmConfig(method=method), None, layers, dtype, None, BLOCK)
    recipe = Recipe.load(SHIPPED_DIR / method)
    kc, vc = recipe.key_codecs[0], recipe.value_codecs[0]
    layers = [LayerSlots(nuq_part(kc, 0), nuq_part(vc, None), recipe.settings.sink_tokens, dtype, 4 * BLOCK)]
    return EngineLayout(KvpackVllmConfig(method=method), recipe, layers, dtype, rope_table(max_len), BLOCK)


def new_pool(layout: EngineLayout, blocks: int, device) -> PagePool:
    c = layout.page_content_bytes()
    return PagePool(torch.zeros(blocks * BLOCK * c, dtype=torch.uint8, device=device).view(blocks, 1, BLOCK, c),
                    layout.layers)


def cpu_pool(layout: EngineLayout, pool: PagePool) -> PagePool:
    """A PagePool over a CPU copy of `pool`'s buffer."""
    c = layout.page_content_bytes()
    buffer = torch.empty(0, dtype=torch.uint8, device=pool.slots[0].device).set_(pool.slots[0].untyped_storage())
    return PagePool(buffer.cpu()[: pool.blocks * BLOCK * c].view(pool.blocks, 1, BLOCK, c), layout.layers)


def kv(tokens: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randn(tokens, HEADS, DIM, generator=g) * 2
    k[torch.rand(tokens, HEADS, DIM, generator=g) < 0.02] *= 15
    return k.to(torch.bfloat16), torch.randn(tokens, HEADS, DIM, generator=g).to(torch.bfloat16)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int) -> float:
    """Median milliseconds of fn() (CUDA events on the GPU, wall clock elsewhere), after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def check(method: str, device, lens: list[int]) -> dict:
    """Write on the device and on the CPU, compare bytes; attend with Triton vs read.attend (decode, prefill)."""
    g = torch.Generator().manual_seed(0)
    layout = make_layout(method, max(lens) + 64)
    twin = cuda_read.device_layout(layout, torch.device(device))
    pages = [math.ceil(n / BLOCK) for n in lens]
    blocks = sum(pages) + 1
    perm = torch.randperm(blocks - 1, generator=g) + 1  # scattered pages, block 0 unused
    table = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    at = 0
    for r, p in enumerate(pages):
        table[r, :p] = perm[at: at + p].to(torch.int32)
        at += p
    gpu, ref = new_pool(layout, blocks, device), new_pool(layout, blocks, "cpu")
    prefill_q = [1, min(48, lens[1] - 1), min(7, lens[2])]  # the last step: decode, chunk, chunk
    steps = []
    for r, n in enumerate(lens):
        k, v = kv(n, g)
        cut = n - prefill_q[r]
        chunks = [(a, min(a + 160, cut)) for a in range(0, cut, 160)] + [(cut, n)]
        steps.append((r, k, v, chunks))
    for r, k, v, chunks in steps:
        for a, b in chunks:
            pos = torch.arange(a, b)
            slots = table[r, pos // BLOCK].long() * BLOCK + pos % BLOCK
            write_tokens(layout, ref, 0, k[a:b], v[a:b], slots, pos)
            write_tokens(twin.layout, gpu, 0, k[a:b].to(device), v[a:b].to(device), slots.to(device), pos.to(device))
    sync(device)
    back = cpu_pool(layout, gpu)
    same = {"slots": float((back.slots[0] == ref.slots[0]).float().mean()),
            "sinks": float((back.sinks[0] == ref.sinks[0]).float().mean()) if ref.sinks[0].numel() else 1.0,
            "pools": float((back.pools[0] == ref.pools[0]).float().mean()) if ref.pools[0].numel() else 1.0}
    out = {"method": method, "lens": lens, "bytes_equal_gpu_vs_cpu_write": same}
    for name, q_lens in (("decode", [1, 1, 1]), ("chunked_prefill", prefill_q)):
        meta = SimpleNamespace(query_start_loc=torch.tensor([0] + q_lens).cumsum(0), seq_lens=torch.tensor(lens),
                               block_table=table)
        query = torch.randn(sum(q_lens), HEADS * GROUP, DIM, generator=g).to(torch.bfloat16)
        want = torch.zeros(query.shape)
        attend(layout, back, 0, query, meta, DIM ** -0.5, want)
        got = torch.zeros(query.shape, device=device)
        dmeta = SimpleNamespace(query_start_loc=meta.query_start_loc.to(device), seq_lens=meta.seq_lens.to(device),
                                block_table=table.to(device), max_query_len=max(q_lens), max_seq_len=max(lens))
        cuda_read.attend(twin, gpu, 0, query.to(device), dmeta, DIM ** -0.5, got)
        err = float((got.cpu() - want).abs().max())
        out[f"{name}_max_abs_err"] = err
        out[f"{name}_ok"] = err < 1e-3
    return out


def timing(method: str, device, context: int, batch: int, reps: int) -> dict:
    """Decode-step attention (Triton pages vs bf16 SDPA) and writes, `batch` requests of `context` tokens."""
    layout = make_layout(method, context + 1024)
    dev = torch.device(device)
    twin = cuda_read.device_layout(layout, dev)
    per = math.ceil(context / BLOCK)
    pool = new_pool(layout, batch * per + 1, dev)
    table = (torch.arange(batch * per, device=dev).view(batch, per) + 1).to(torch.int32)
    g = torch.Generator().manual_seed(1)
    chunk = 4096
    for r in range(batch):  # fill the pages (not timed)
        for a in range(0, context, chunk):
            b = min(a + chunk, context)
            k, v = kv(b - a, g)
            pos = torch.arange(a, b, device=dev)
            slots = table[r, pos // BLOCK].long() * BLOCK + pos % BLOCK
            write_tokens(twin.layout, pool, 0, k.to(dev), v.to(dev), slots, pos)
    lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    meta = SimpleNamespace(query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=dev), seq_lens=lens,
                           block_table=table, max_query_len=1, max_seq_len=context)
    query = torch.randn(batch, HEADS * GROUP, DIM, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(query)
    row = {"method": method, "context": context, "batch": batch,
           "pages_decode_ms": timed(lambda: cuda_read.attend(twin, pool, 0, query, meta, DIM ** -0.5, out), dev, reps)}
    kk = torch.randn(batch, HEADS * GROUP, context, DIM, device=dev, dtype=torch.bfloat16)
    vv = torch.randn_like(kk)
    qq = query.view(batch, HEADS * GROUP, 1, DIM)
    row["sdpa_bf16_decode_ms"] = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv), dev, reps)
    row["pages_vs_sdpa"] = row["pages_decode_ms"] / row["sdpa_bf16_decode_ms"]
    row["page_bytes_per_token"] = layout.page_content_bytes()
    row["bf16_bytes_per_token"] = 2 * HEADS * DIM * 2
    del kk, vv
    # writes: one decode step (a token per request, at the end of its context) and one 512-token prefill chunk
    k1, v1 = (t.to(dev) for t in kv(batch, g))
    pos1 = torch.full((batch,), context - 1, device=dev)
    slots1 = table[:, (context - 1) // BLOCK].long() * BLOCK + (context - 1) % BLOCK
    row["write_decode_step_ms"] = timed(lambda: write_tokens(twin.layout, pool, 0, k1, v1, slots1, pos1), dev, reps)
    n = min(512, context)
    kp, vp = (t.to(dev) for t in kv(n, g))
    posp = torch.arange(context - n, context, device=dev)
    slotsp = table[0, posp // BLOCK].long() * BLOCK + posp % BLOCK
    row["write_prefill_512_ms"] = timed(lambda: write_tokens(twin.layout, pool, 0, kp, vp, slotsp, posp), dev, reps)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--contexts", default="1024,8192,32768")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--check-lens", default="300,200,90")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default="results/vllm-pages-gpu.json")
    args = parser.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu under TRITON_INTERPRET=1 for a dry run")
    methods = args.methods.split(",")
    lens = [int(x) for x in args.check_lens.split(",")]
    result = {
        "env": {"torch": torch.__version__, "python": platform.python_version(), "device": str(dev),
                "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None},
        "shape": {"kv_heads": HEADS, "query_heads": HEADS * GROUP, "head_dim": DIM, "block_size": BLOCK,
                  "dtype": "bfloat16", "layer": 0},
        "checks": [], "timings": [],
    }
    for method in methods:
        result["checks"].append(check(method, dev, lens))
        print(json.dumps(result["checks"][-1]), flush=True)
    for method in methods:
        for context in (int(x) for x in args.contexts.split(",")):
            for batch in (int(x) for x in args.batches.split(",")):
                result["timings"].append(timing(method, dev, context, batch, args.reps))
                print(json.dumps(result["timings"][-1]), flush=True)
    result["all_checks_ok"] = all(c["decode_ok"] and c["chunked_prefill_ok"] for c in result["checks"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"all_checks_ok": result["all_checks_ok"], "out": args.out}))
    if not result["all_checks_ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
