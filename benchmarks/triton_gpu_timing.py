"""Decode attention of the packed Triton kernels vs torch SDPA on a GPU (written without one: run it where a GPU is).

One layer of SmolLM2's shape (3 KV heads x 64, 9 query heads) filled with `--contexts` tokens per batch row:
keys drawn around the layer's calibrated key ranges (pre-RoPE; the kernel rotates them from positions and
inv_freq, theta 1e5), values N(0, 1), encoded by the shipped recipes' codecs (kvpack-3bit: per-channel mixed
widths, kernels/triton_mixed.py; kvquant-3bit-1pct: one width, kernels/triton_decode.py), or by TurboQuant
(turboquant-<bits>: keys post-RoPE, kernels/triton_tq.py). Per (method, context,
batch): the kernel call as the cache makes it (Python included), the same call replayed from a CUDA graph (None
if capture fails: that is a finding), and torch SDPA over bf16 keys/values already rotated (flash with GQA where
torch takes it, else its default over repeated heads), each the median of `--iters` CUDA-event timings; and the
kernel's largest deviation from decode-then-attend at the smallest context (fp16 tensor-core dots).

    .venv/bin/python benchmarks/triton_gpu_timing.py [--contexts 8192,32768,65536,131072] [--batches 1,16]
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/triton_gpu_timing.py --device cpu --smoke   # logic only
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvpack.cache.stream import TokenStream
from kvpack.codecs.turboquant import TurboQuantCodec
from kvpack.hf.rope import apply_rope
from kvpack.kernels import triton_decode
from kvpack.recipes.bundled import SHIPPED_DIR
from kvpack.recipes.recipe import Recipe

THETA, HQ = 1e5, 9


def codecs(method: str, layer: int, device: torch.device):
    """(key codec, value codec, KV heads, head_dim, keys stored pre-RoPE) of a shipped recipe's layer, or of
    `turboquant-<bits>` (no calibration; keys post-RoPE, as that family stores them)."""
    if method.startswith("turboquant-"):
        bits = float(method.split("-", 1)[1])
        return TurboQuantCodec(bits, 64, seed=1).to(device), TurboQuantCodec(bits, 64, seed=2).to(device), 3, 64, False
    recipe = Recipe.load(SHIPPED_DIR / method)
    key, value = recipe.key_codecs[layer].to(device), recipe.value_codecs[layer].to(device)
    return key, value, key.heads, key.head_dim, True


def build(method: str, layer: int, batch: int, tokens: int, device: torch.device, block: int = 2048):
    """(key codec, value codec, keys stream, values stream, positions int32 [B, tokens] or None (keys post-RoPE),
    inv_freq [D / 2])."""
    key, value, heads, dim, pre_rope = codecs(method, layer, device)
    g = torch.Generator(device=device).manual_seed(layer)
    ks, vs = TokenStream(key, 1, 0), TokenStream(value, 1, 0)
    if pre_rope:
        zero, scale = key.zero.view(heads, 1, dim), key.scale.view(heads, 1, dim)
    else:
        zero, scale = torch.zeros((), device=device), torch.ones((), device=device)
    done = 0
    while done < tokens:
        n = min(block, tokens - done)
        ks.append(zero + scale * torch.randn(batch, heads, n, dim, generator=g, device=device))
        vs.append(torch.randn(batch, heads, n, dim, generator=g, device=device))
        done += n
    positions = torch.arange(tokens, dtype=torch.int32, device=device).expand(batch, -1).contiguous()
    inv_freq = THETA ** (-torch.arange(0, dim, 2, device=device).float() / dim)
    return key, value, ks, vs, positions if pre_rope else None, inv_freq


def rotated(ks, vs, positions, inv_freq, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded keys (RoPE applied unless positions is None) and values [B, H, N, D] in `dtype`: what an
    uncompressed cache holds."""
    k, v = ks.read(torch.float32), vs.read(torch.float32)
    if positions is None:
        return k.to(dtype), v.to(dtype)
    ang = positions[:, :, None].double() * inv_freq.double()
    emb = torch.cat([ang, ang], -1)
    return apply_rope(k, emb.cos().float(), emb.sin().float()).to(dtype), v.to(dtype)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(function of no arguments, label): torch SDPA of q [B, Hq, 1, D] over k/v [B, H, N, D], GQA-aware if it can."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        flash()
        return flash, "sdpa-flash-gqa"
    except (RuntimeError, TypeError, ImportError):
        per = q.shape[1] // k.shape[1]
        kr, vr = k.repeat_interleave(per, 1), v.repeat_interleave(per, 1)
        return (lambda: F.scaled_dot_product_attention(q, kr, vr)), "sdpa-default-repeated"


def timed(fn, iters: int) -> float:
    """Median milliseconds of fn() over `iters` runs (CUDA events; wall clock off the GPU)."""
    for _ in range(3):
        fn()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def graphed(fn):
    """fn captured in a CUDA graph (a function replaying it), or (None, why) when capture fails."""
    if not torch.cuda.is_available():
        return None, "no CUDA"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, ""
    except Exception as exc:  # noqa: BLE001 - capture failing is what this reports
        return None, f"{type(exc).__name__}: {exc}"[:300]


def run(method: str, tokens: int, batch: int, device: torch.device, iters: int, check: bool) -> dict:
    key, value, ks, vs, pos, inv = build(method, 10, batch, tokens, device)
    dim = ks.head.shape[-1]
    q = torch.randn(batch, HQ, 1, dim, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)

    def kernel():
        return triton_decode.stream_attention(ks, vs, key, value, q, None, dim ** -0.5, positions=pos, inv_freq=inv)

    out = kernel()
    row = {"method": method, "context": tokens, "batch": batch, "covered": out is not None}
    if out is None:
        return row
    kd, vd = rotated(ks, vs, pos, inv, q.dtype)
    base, label = sdpa(q, kd, vd)
    row |= {"kernel_ms": timed(kernel, iters), "baseline": label, "baseline_ms": timed(base, iters)}
    replay, why = graphed(kernel)
    row |= {"graph_ms": timed(replay, iters) if replay else None, "graph_error": why or None}
    row["kernel_vs_baseline"] = row["kernel_ms"] / row["baseline_ms"]
    row["graph_vs_baseline"] = row["graph_ms"] / row["baseline_ms"] if row["graph_ms"] else None
    if check:
        want = base().transpose(1, 2).float()
        row["max_abs_err_vs_decoded"] = float((out.float() - want).abs().max())
        row["max_abs_ref"] = float(want.abs().max())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="8192,32768,65536,131072")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--methods", default="kvpack-3bit,kvquant-3bit-1pct,turboquant-3.5")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (logic check, e.g. under TRITON_INTERPRET=1)")
    parser.add_argument("--out", default="results/gpu-timing.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    contexts = [40] if args.smoke else [int(c) for c in args.contexts.split(",")]
    batches = [1] if args.smoke else [int(b) for b in args.batches.split(",")]
    rows = []
    for method in args.methods.split(","):
        for batch in batches:
            for i, tokens in enumerate(contexts):
                rows.append(run(method, tokens, batch, device, 2 if args.smoke else args.iters, check=i == 0))
                print(json.dumps(rows[-1]), flush=True)
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        import triton

        env |= {"gpu": torch.cuda.get_device_name(device), "triton": triton.__version__}
    if not args.smoke:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
