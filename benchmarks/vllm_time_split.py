"""Where the KV work of a serving run goes: one configuration of benchmarks/vllm_serving.py with vLLM's engine core in
this process, the KV functions wrapped in timers (wall seconds, summed over layers and steps).

kvpack: the page writer (`write_tokens`), the decode-step kernel (`kernel.attend` less its prefill part), the prefill
chunks (`_attend_dense`: pages decoded by `kernel.dense`, then `native_prefill.stage` into vLLM's cache layout and
`native_prefill.run`, vLLM's kernel, or SDPA).
vLLM: its attention op `cpu_attention_with_kv_cache` (prefill and decode together; its cache writes are a copy).
`kv_work_s`: vLLM's attention op, or kvpack's writer plus its attention (prefill and decode steps).
`--new 1` runs the prompts alone, so the two runs split prefill from decode steps.

    .venv-vllm/bin/python benchmarks/vllm_time_split.py --out results/vllm-time-split.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TIMES: dict[str, float] = collections.defaultdict(float)
CALLS: collections.Counter = collections.Counter()


def timed(owner, name: str, label: str) -> None:
    """Replace owner.name by the same function that adds its wall time to TIMES[label]."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            TIMES[label] += time.perf_counter() - start
            CALLS[label] += 1

    setattr(owner, name, wrapper)


def instrument() -> None:
    """Timers on kvpack's KV functions and on vLLM's CPU attention op (as the backends call them)."""
    import torch.nn.functional as F
    import vllm.v1.attention.backends.cpu_attn as cpu_attn

    from kvpack.integrations.vllm import backend, kernel, native_prefill

    timed(backend, "write_tokens", "kvpack_write")
    timed(backend, "attend", "kvpack_attend")
    timed(kernel, "_attend_dense", "kvpack_prefill")
    timed(kernel, "dense", "kvpack_prefill_page_decode")
    timed(native_prefill, "stage", "kvpack_prefill_stage")
    timed(native_prefill, "run", "kvpack_prefill_vllm_kernel")
    timed(F, "scaled_dot_product_attention", "kvpack_prefill_sdpa")
    timed(cpu_attn.ops, "cpu_attention_with_kv_cache", "vllm_attention")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), as the rows' machine."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "unknown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="vllm-bf16,kvpack-3bit-bf16")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", default="64,1", help="new tokens per request, one run each")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="results/vllm-time-split.json")
    args = parser.parse_args()
    if args.one:  # child: one configuration, engine core in this process
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm_serving import CONFIGS, one

        from kvpack.hf.models import model_path

        instrument()
        name, new = args.one.split(":")
        result = one(str(model_path("smollm2-135m")), CONFIGS[name], args.requests, args.prompt, int(new), None)
        print("RESULT " + json.dumps({"wall_seconds": result["wall_seconds"], "timers": dict(TIMES),
                                     "calls": dict(CALLS)}), flush=True)
        return
    from vllm_engine import environment, run_child

    rows = []
    for new in args.new.split(","):
        for name in args.configs.split(","):
            child = ["--requests", str(args.requests), "--prompt", str(args.prompt)]
            row = {**run_child(__file__, f"{name}:{new}", child), "config": name, "new_tokens": int(new)}
            seconds = row.pop("timers", {}) or {}
            if "kvpack_attend" in seconds:  # kvpack: vLLM's op runs inside its prefill (native_prefill), not apart
                seconds.pop("vllm_attention", None)
                seconds["kvpack_decode_steps"] = seconds["kvpack_attend"] - seconds.get("kvpack_prefill", 0.0)
                row["kv_work_s"] = seconds["kvpack_attend"] + seconds.get("kvpack_write", 0.0)
            else:
                row["kv_work_s"] = seconds.get("vllm_attention", 0.0)
            row.update({f"{k}_s": v for k, v in seconds.items()})
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "calls"}), flush=True)
    out = {"benchmark": "vllm-time-split", "command": "python benchmarks/vllm_time_split.py " + " ".join(sys.argv[1:]),
           "requests": args.requests, "prompt_tokens": args.prompt, "cpu": cpu_model(), **environment(), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
