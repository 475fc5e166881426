"""Shared by the vLLM benchmarks: run one engine configuration in its own process and collect its JSON result.

A benchmark script calls `run_configs(__file__, ...)`; each configuration re-runs the script with `--one NAME`,
which starts a vLLM engine, does the measurement and prints `RESULT {json}`. One process per engine: memory is
returned between configurations and a failed configuration is recorded with its error.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

CAPACITY_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")


def kvpack_entry(method: str, recipes: str | None = None) -> dict:
    """The `kvpack` entry serving `method`: its saved recipe `recipes`/METHOD where that folder exists (a `kvpack
    calibrate --out` folder, e.g. ':post-rope' variants no recipe ships for), else the method by name."""
    folder = Path(recipes) / method if recipes else None
    return {"recipe": str(folder)} if folder is not None and folder.is_dir() else {"method": method}


def engine_kwargs(spec: dict) -> dict:
    """LLM(...) keyword arguments of a configuration {dtype, kv_cache_dtype?, kvpack?}."""
    extra = {"dtype": spec["dtype"]}
    if "kvpack" in spec:
        extra["additional_config"] = {"kvpack": spec["kvpack"]}
    if "kv_cache_dtype" in spec:
        extra["kv_cache_dtype"] = spec["kv_cache_dtype"]
    return extra


def capacity(llm) -> dict:
    cache = llm.llm_engine.vllm_config.cache_config
    return {"num_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
            "capacity_tokens": cache.num_gpu_blocks * cache.block_size}


def run_child(script: str, name: str, args: list[str], env: dict | None = None, timeout: int = 1800) -> dict:
    """Run `script --one name *args` (environment `env` on top of this one; a None value unsets the variable) and
    return its RESULT (or the error), with seconds and vLLM's capacity line."""
    start = time.time()
    child_env = dict(os.environ, **{k: v for k, v in (env or {}).items() if v is not None})
    for key in [k for k, v in (env or {}).items() if v is None]:  # None: unset (vLLM reads "" as a number)
        child_env.pop(key, None)
    proc = subprocess.run([sys.executable, script, "--one", name, *args], env=child_env,
                          capture_output=True, text=True, timeout=timeout)
    text = proc.stdout + proc.stderr
    row = {"config": name, "seconds": round(time.time() - start, 1)}
    result = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not result:
        errors = [line for line in text.splitlines() if "Error" in line or "error" in line]
        message = errors[-1][-400:] if errors else f"exit {proc.returncode}"
        if not result:
            row["error"] = message
            row["log_tail"] = text[-1500:]  # what the child printed last, to tell why
            return row
        # the measurement finished (RESULT printed) and the process died after it, e.g. in vLLM's shutdown
        row["exit_after_result"] = {"code": proc.returncode, "message": message}
    row.update(json.loads(result[-1][len("RESULT "):]))
    logged = CAPACITY_LINE.findall(text)
    row["vllm_log_tokens"] = int(logged[-1].replace(",", "")) if logged else None
    return row


def environment() -> dict:
    """Where a vLLM benchmark ran: versions, the CPU model and its instruction set (kvpack's detection), cores."""
    import torch
    import vllm

    from kvpack.kernels import cpu

    return {"vllm": vllm.__version__, "torch": torch.__version__, "cpu": cpu.cpu_model(),
            "instruction_set": cpu.instruction_set(), "cpu_avx512": bool(torch.cpu._is_avx512_supported()),
            "cpu_amx": bool(torch.cpu._is_amx_tile_supported()), "cores": os.cpu_count(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
