"""Decode-step attention alone (one C call per layer) of packed caches vs torch SDPA on the same K/V, for kernel work.

`build`: prefill `--prefill` tokens of wikitext2 through the model into every method's cache (and an fp32
DynamicCache), repeat them to `--context` as the bench does (fill.TeeCache.replay), and save the caches under DIR.
`time`: load them and time, in interleaved rounds, layers 0 / middle / last: the packed attention
(dispatch.layer_attention) and SDPA on fp32 and bf16 copies of the uncompressed K/V (the prefilled tokens repeated
to the context, as the packed caches hold them); `--library LABEL=PATH` times another build of the kernels (an
earlier commit's, same ABI) in the same rounds, so before and after share the machine's state. Prints medians in ms; with
`--json`, writes rows. Numbers for docs come from `kvpack bench`; this is the quick loop.

    python benchmarks/cpu_attention_speed.py build /tmp/kvcaches --context 8192 --methods kvpack-3bit,kvquant-3bit-1pct
    python benchmarks/cpu_attention_speed.py time /tmp/kvcaches --threads 1
    # an earlier commit's kernels, built into the kernel cache from a worktree, timed next to this checkout's:
    git worktree add /tmp/before COMMIT
    PYTHONPATH=/tmp/before/src python -c "from kvpack.kernels import cpu; cpu.load(); print(cpu.library_path())"
    python benchmarks/cpu_attention_speed.py time /tmp/kvcaches --threads 1 --label now --library before=PATH
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch


def build(args) -> None:
    from kvpack.cache.cache import CompressedCache
    from kvpack.evaluate.bench.fill import TeeCache, Target, prefill
    from kvpack.data import load_windows
    from kvpack.hf.models import load_model
    from kvpack.methods.names import parse_method
    from kvpack.recipes.resolve import resolve_recipe

    model, tok = load_model(args.model)
    model.eval()
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    targets = [Target(m, 1, args.context, CompressedCache(model, resolve_recipe(model, tok, parse_method(m), progress=False)),
                      model, torch.float16, True) for m in methods]
    tee = TeeCache(model.config, targets)
    ids = load_windows(tok, "wikitext2", args.prefill, 1)[:1]
    prefill(model, ids, tee, 0, args.prefill, 2048)
    if args.context > args.prefill:
        tee.replay(model, args.prefill, args.context, 2048)
    for t in targets:
        t.cache.save(out / f"{t.method}.kvcache")
    torch.save([(layer.keys.float(), layer.values.float()) for layer in tee.layers], out / "dynamic.pt")
    (out / "meta.json").write_text(json.dumps({"methods": methods, "context": args.context, "model": args.model}))


def _repeat_to(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """x [B, H, T, D] (the prefilled tokens) repeated along T to `tokens`, as the packed caches were filled."""
    reps = -(-tokens // x.shape[-2])
    return x.repeat(1, 1, reps, 1)[..., :tokens, :].contiguous()


def _with_library(cpu, lib, fn):
    """fn run with the kernel library `lib` (None: the one this checkout builds)."""
    if lib is None:
        return fn

    def call():
        with cpu.using(lib):
            return fn()
    return call


def _median_ms(fn, reps: int) -> tuple[float, float]:
    """Median (wall ms, this thread's CPU ms) of `reps` calls: on a busy machine the CPU time is the steadier."""
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall.append(1000 * (time.perf_counter() - t0))
        cpu.append(1000 * (time.thread_time() - c0))
    return statistics.median(wall), statistics.median(cpu)


@torch.no_grad()
def run_timing(args) -> None:
    from kvpack.cache.cache import CompressedCache
    from kvpack.hf.attention import attention_layers
    from kvpack.hf.models import load_model
    from kvpack.kernels import cpu, dispatch
    from kvpack.methods.names import parse_method
    from kvpack.recipes.resolve import resolve_recipe
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if args.threads:
        torch.set_num_threads(args.threads)
    d = Path(args.dir)
    meta = json.loads((d / "meta.json").read_text())
    model, tok = load_model(meta["model"])
    layers = attention_layers(model)
    n = len(layers)
    probe = sorted({0, n // 2, n - 1})
    hq, dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    query = torch.randn(1, hq, 1, dim, generator=torch.Generator().manual_seed(0))
    calls: dict[str, list] = {}
    kv = [tuple(_repeat_to(x, meta["context"]) for x in pair) for pair in torch.load(d / "dynamic.pt")]
    for dtype in (torch.float32, torch.bfloat16):
        name = f"sdpa-{str(dtype).split('.')[-1]}"
        calls[name] = [(lambda i=i, k=kv[i][0].to(dtype), v=kv[i][1].to(dtype), q=query.to(dtype):
                        sdpa_attention_forward(layers[i], q, k, v, None, scaling=layers[i].scaling)) for i in probe]
    methods = args.methods.split(",") if args.methods else meta["methods"]
    libraries = {args.label: None} | {label: cpu.open_library(Path(path))
                                      for label, path in (x.split("=", 1) for x in args.library)}
    code = {}  # call name -> which code it times
    for m in methods:
        recipe = resolve_recipe(model, tok, parse_method(m), progress=False)
        cache = CompressedCache.load(d / f"{m}.kvcache", model, recipe)
        state = cache.packed
        for label, lib in libraries.items():
            name = m if lib is None else f"{m} [{label}]"
            code[name] = label
            calls[name] = [_with_library(cpu, lib, lambda i=i, c=cache, s=state: dispatch.layer_attention(
                c.layers[i], query, None, scaling=layers[i].scaling, backend=s.backend, rope=s.rope)) for i in probe]
        paths = []
        dispatch.layer_attention(cache.layers[0], query, None, scaling=layers[0].scaling, backend=state.backend,
                                 rope=state.rope, paths=paths)
        if paths != [("layer", "cpu")]:
            print(f"warning: {m} took {paths}")
    results = {k: [] for k in calls}
    cpu_ms = {k: [] for k in calls}
    for fns in calls.values():
        for f in fns:
            f()
    for _ in range(args.rounds):
        for k, fns in calls.items():
            times = [_median_ms(f, args.reps) for f in fns]
            results[k].append(statistics.mean(t[0] for t in times))
            cpu_ms[k].append(statistics.mean(t[1] for t in times))
    best = min(statistics.median(results[k]) for k in calls if k.startswith("sdpa"))
    best_cpu = min(statistics.median(cpu_ms[k]) for k in calls if k.startswith("sdpa"))
    rows = []
    for k, v in results.items():
        ms, cms = statistics.median(v), statistics.median(cpu_ms[k])
        rows.append({"method": k.split(" [")[0], "code": code.get(k, args.label), "context": meta["context"], "attention_ms": ms, "ratio": ms / best,
                     "attention_cpu_ms": cms, "cpu_ratio": cms / best_cpu, "threads": torch.get_num_threads(),
                     "kernel_isa": getattr(cpu, "kernel_isa", lambda: None)(), "loadavg": os.getloadavg()[0]})
        print(f"{k:24s} {ms:8.3f} ms {ms / best:6.2f}x   CPU {cms:8.3f} ms {cms / best_cpu:6.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["build", "time"])
    p.add_argument("dir")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default="")
    p.add_argument("--label", default="", help="what code was timed (stored in each row)")
    p.add_argument("--library", action="append", default=[], metavar="LABEL=PATH",
                   help="also time the packed methods with this compiled kernel library (same ABI), in the same rounds")
    args = p.parse_args()
    build(args) if args.action == "build" else run_timing(args)


if __name__ == "__main__":
    main()
