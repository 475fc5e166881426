"""Encode / decode speed of the residual-VQ codec on this CPU (vectors per second).

A "vector" is one token of one KV head (head_dim channels). Codebooks are random (speed does not
depend on their values); x is one layer's block [1, kv_heads, tokens, head_dim] as the cache
holds it. Writes results/rvq-speed.json.

    .venv/bin/python benchmarks/rvq_speed.py [--tokens 2048] [--threads 1 2] [--out results/rvq-speed.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from kvpack.codecs import rvq
from kvpack.codecs.rvq import RVQCodec

PRESETS = [(8, 2048, 32), (4, 2048, 32), (8, 1024, 64), (6, 1024, 32), (1, 2048, 32)]


def best_of(fn, repeats: int) -> float:
    """Fastest wall time of `repeats` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(depth: int, size: int, group: int, tokens: int, heads: int, head_dim: int, threads: int, repeats: int) -> dict:
    codec = RVQCodec(torch.randn(depth, size, group), head_dim, "strided")
    x = torch.randn(1, heads, tokens, head_dim)
    rvq.SEARCH_THREADS = threads  # what KVPACK_RVQ_THREADS sets
    enc = codec.encode(x)
    t_enc = best_of(lambda: codec.encode(x), repeats)
    t_dec = best_of(lambda: codec.decode(enc), repeats)
    vectors = heads * tokens
    return {
        "method": f"rvq-d{depth}-c{size}-g{group}", "threads": threads, "tokens": tokens, "kv_heads": heads,
        "head_dim": head_dim, "vectors": vectors, "encode_s": t_enc, "decode_s": t_dec,
        "encode_vectors_per_s": vectors / t_enc, "decode_vectors_per_s": vectors / t_dec,
        "encode_gflops": vectors * (head_dim // group) * depth * size * group * 2 / t_enc / 1e9,
        "bits_per_element": enc.bits_per_element(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="search threads (KVPACK_RVQ_THREADS)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/rvq-speed.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for depth, size, group in PRESETS:
        for threads in args.threads:
            row = measure(depth, size, group, args.tokens, args.heads, args.head_dim, threads, args.repeats)
            rows.append(row)
            print(f"{row['method']:18s} threads {threads}: encode {row['encode_vectors_per_s']:9.0f} vec/s "
                  f"({row['encode_gflops']:.1f} GFLOP/s)  decode {row['decode_vectors_per_s']:10.0f} vec/s", flush=True)
    env = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "cpu_count": torch.get_num_threads(), "load_avg_1m": __import__("os").getloadavg()[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "env": env, "note": "one layer's block, best of repeats"}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
