"""KV capacity vLLM itself reports ("KV cache size: N tokens") for its own caches and for kvpack pages.

Each configuration starts a real vLLM engine (CPU build, `.venv-vllm`) in its own process with
VLLM_CPU_KVCACHE_SPACE=1 (GiB) on the default model, reads the capacity line vLLM logs, and checks it against
`num_gpu_blocks * block_size`. A configuration vLLM refuses (e.g. its fp8 cache on a CPU without AVX-512) is
recorded with its error.

    .venv-vllm/bin/python benchmarks/vllm_capacity.py            # -> results/vllm-capacity.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "vllm-bf16": {"dtype": "bfloat16"},
    "vllm-fp8": {"dtype": "bfloat16", "kv_cache_dtype": "fp8"},
    "kvpack-fp16 (lossless slots)": {"dtype": "bfloat16", "kvpack": {"method": "fp16"}},
    "kvpack-4bit": {"dtype": "bfloat16", "kvpack": {"method": "kvpack-4bit"}},
    "kvpack-3bit": {"dtype": "bfloat16", "kvpack": {"method": "kvpack-3bit"}},
    "kvpack-2bit": {"dtype": "bfloat16", "kvpack": {"method": "kvpack-2bit"}},
    "kvquant-4bit-1pct": {"dtype": "bfloat16", "kvpack": {"method": "kvquant-4bit-1pct"}},
    "kvquant-3bit-1pct": {"dtype": "bfloat16", "kvpack": {"method": "kvquant-3bit-1pct"}},
    "kvquant-2bit-1pct": {"dtype": "bfloat16", "kvpack": {"method": "kvquant-2bit-1pct"}},
    "vllm-fp32": {"dtype": "float32"},
}
TARGETS = {"kvpack-4bit": 3.5, "kvpack-3bit": 4.5, "kvpack-2bit": 6.0}
CAPACITY_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")


def one(model: str, spec: dict, max_model_len: int) -> dict:
    """Start one engine (in this process) and return what it planned."""
    from vllm import LLM

    extra = {"additional_config": {"kvpack": spec["kvpack"]}} if "kvpack" in spec else {}
    if "kv_cache_dtype" in spec:
        extra["kv_cache_dtype"] = spec["kv_cache_dtype"]
    llm = LLM(model=model, dtype=spec["dtype"], max_model_len=max_model_len, enforce_eager=True, **extra)
    cache = llm.llm_engine.vllm_config.cache_config
    out = {"num_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
           "tokens": cache.num_gpu_blocks * cache.block_size}
    if "kvpack" in spec:
        from kvpack.integrations.vllm.layout import build_layout

        out["layout"] = build_layout(llm.llm_engine.vllm_config).describe()
    llm.llm_engine.engine_core.shutdown()
    return out


def run_child(name: str, model: str, max_model_len: int, kv_gib: int) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_gib))
    cmd = [sys.executable, __file__, "--one", name, "--model", model, "--max-model-len", str(max_model_len)]
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    text = proc.stdout + proc.stderr
    row = {"config": name, **{k: v for k, v in CONFIGS[name].items()}, "seconds": round(time.time() - start, 1)}
    result = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not result:
        errors = [line for line in text.splitlines() if "Error" in line or "error" in line]
        row["error"] = errors[-1][-400:] if errors else f"exit {proc.returncode}"
        return row
    row.update(json.loads(result[-1][len("RESULT "):]))
    logged = CAPACITY_LINE.findall(text)
    row["vllm_log_tokens"] = int(logged[-1].replace(",", "")) if logged else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help="model folder (default: kvpack model-path smollm2-135m)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", default="results/vllm-capacity.json")
    args = parser.parse_args()
    if args.model is None:
        from kvpack.hf.models import model_path

        args.model = str(model_path("smollm2-135m"))
    if args.one:
        print("RESULT " + json.dumps(one(args.model, CONFIGS[args.one], args.max_model_len)), flush=True)
        return
    rows = []
    for name in args.configs.split(","):
        row = run_child(name, args.model, args.max_model_len, args.kv_gib)
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("config", "tokens", "vllm_log_tokens", "error")}), flush=True)
    base = next((r["tokens"] for r in rows if r["config"] == "vllm-bf16" and "tokens" in r), None)
    for row in rows:
        if base and "tokens" in row:
            row["x_bf16"] = round(row["tokens"] / base, 3)
        if row["config"] in TARGETS:
            row["target_x_bf16"] = TARGETS[row["config"]]
            row["meets_target"] = bool(row.get("x_bf16", 0) >= TARGETS[row["config"]])
    import torch
    import vllm

    out = {"benchmark": "vllm-capacity", "command": "python benchmarks/vllm_capacity.py " + " ".join(sys.argv[1:]),
           "model": args.model, "VLLM_CPU_KVCACHE_SPACE_GiB": args.kv_gib, "max_model_len": args.max_model_len,
           "vllm": vllm.__version__, "torch": torch.__version__,
           "cpu_avx512": bool(torch.cpu._is_avx512_supported()), "cpu_amx": bool(torch.cpu._is_amx_tile_supported()),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
