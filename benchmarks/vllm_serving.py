"""Serving inside vLLM: many concurrent requests with little KV memory, vLLM's own cache vs kvpack pages.

N requests of P prompt tokens (distinct WikiText-2 windows, so no prefix is shared) and G greedy new tokens are
submitted at once to `LLM.generate`. Scenario "tight": `kv_cache_memory_bytes` sized so vLLM's own bf16 cache holds
about a third of the requests' tokens (it must queue or preempt; kvpack's pages hold them all). Scenario "roomy":
VLLM_CPU_KVCACHE_SPACE=1, where every configuration holds them all (throughput next to vLLM's own attention).
Reported: wall time, output tokens/s, preemptions (vLLM's counter), the capacity vLLM planned. vLLM's engine core
runs in a process of its own (its default; `--in-process`: in the process that calls generate, as
benchmarks/vllm_time_split.py runs it), recorded as `engine_core`.

    .venv-vllm/bin/python benchmarks/vllm_serving.py                       # -> results/vllm-serving.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_engine import capacity, engine_kwargs, environment, kvpack_entry, run_child  # noqa: E402

CONFIGS = {
    "vllm-bf16": {"dtype": "bfloat16"},
    "vllm-fp32": {"dtype": "float32"},
    "kvpack-3bit-bf16": {"dtype": "bfloat16", "kvpack": {"method": "kvpack-3bit"}},
    "kvpack-3bit-fp32": {"dtype": "float32", "kvpack": {"method": "kvpack-3bit"}},
}
BF16_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # default model: layers x (K, V) x KV heads x head_dim x bf16
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def config_spec(name: str, recipes: str | None = None) -> dict:
    """A configuration of CONFIGS, or METHOD-bf16 / METHOD-fp32 for another kvpack method: served from
    `recipes`/METHOD where that folder exists (a `kvpack calibrate --out` folder, e.g. ':post-rope' variants)."""
    if name in CONFIGS:
        return CONFIGS[name]
    method, _, dtype = name.rpartition("-")
    if not method or dtype not in DTYPES:
        raise SystemExit(f"unknown configuration {name!r}: one of {', '.join(CONFIGS)} or METHOD-bf16 / METHOD-fp32")
    return {"dtype": DTYPES[dtype], "method": method, "kvpack": kvpack_entry(method, recipes)}


def metric(llm, name: str) -> float | None:
    try:
        return sum(getattr(m, "value", 0) or 0 for m in llm.get_metrics() if m.name == name)
    except Exception:  # metrics unavailable in this build
        return None


def one(model: str, spec: dict, requests: int, prompt: int, new: int, kv_bytes: int | None) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvpack.data import load_windows

    ids = load_windows(AutoTokenizer.from_pretrained(model), "wikitext2", prompt, requests)
    if ids.shape[0] < requests:
        raise SystemExit(f"only {ids.shape[0]} windows of {prompt} tokens")
    extra = {"kv_cache_memory_bytes": kv_bytes} if kv_bytes else {}
    llm = LLM(model=model, max_model_len=prompt + new + 16, enforce_eager=True, disable_log_stats=False,
              **engine_kwargs(spec), **extra)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=w.tolist()) for w in ids]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {"wall_seconds": wall, "output_tokens": generated, "output_tokens_per_s": generated / wall,
              "preemptions": metric(llm, "vllm:num_preemptions"), **capacity(llm),
              "first_tokens": [list(o.outputs[0].token_ids[:8]) for o in outs[:2]]}
    result["requests_that_fit"] = result["capacity_tokens"] // (prompt + new)
    llm.llm_engine.engine_core.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--scenario", default="tight,roomy")
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--kv-bytes", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every configuration (every other round in reverse order); x vLLM per round")
    parser.add_argument("--recipes", default=None, help="folder of saved recipes, one subfolder per method (config_spec)")
    parser.add_argument("--in-process", action="store_true",
                        help="vLLM's engine core in the process that calls generate (VLLM_ENABLE_V1_MULTIPROCESSING=0) "
                             "instead of a process of its own, vLLM's default")
    parser.add_argument("--out", default="results/vllm-serving.json")
    args = parser.parse_args()
    if args.model is None:
        from kvpack.hf.models import model_path

        args.model = str(model_path("smollm2-135m"))
    if args.one:
        print("RESULT " + json.dumps(one(args.model, config_spec(args.one, args.recipes), args.requests, args.prompt, args.new,
                                         args.kv_bytes)), flush=True)
        return
    # a third of the requests' tokens in vLLM's own bf16 layout
    tight = BF16_BYTES_PER_TOKEN * (args.prompt + args.new) * args.requests // 3
    rows = []
    names = args.configs.split(",")
    for scenario, round_ in ((s, r) for s in args.scenario.split(",") for r in range(args.repeat)):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            child = ["--model", args.model, "--requests", str(args.requests), "--prompt", str(args.prompt),
                     "--new", str(args.new)] + (["--recipes", args.recipes] if args.recipes else [])
            env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
            if scenario == "tight":
                child += ["--kv-bytes", str(tight)]
                env = {"VLLM_CPU_KVCACHE_SPACE": None}  # it would override kv_cache_memory_bytes
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if args.in_process else None
            row = {"scenario": scenario, "round": round_, **run_child(__file__, name, child, env=env),
                   **config_spec(name, args.recipes)}
            if scenario == "tight":
                row["kv_cache_memory_bytes"] = tight
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("scenario", "config", "wall_seconds", "output_tokens_per_s",
                                                      "preemptions", "capacity_tokens", "error")}), flush=True)
    for row in rows:
        base = next((r for r in rows if r["scenario"] == row["scenario"] and r["round"] == row["round"]
                     and r["config"] == f"vllm-{'bf16' if row['dtype'] == 'bfloat16' else 'fp32'}"), None)
        if base and base.get("output_tokens_per_s") and row.get("output_tokens_per_s"):
            row["throughput_x_vllm_same_dtype"] = row["output_tokens_per_s"] / base["output_tokens_per_s"]
    out = {"benchmark": "vllm-serving", "command": "python benchmarks/vllm_serving.py " + " ".join(sys.argv[1:]),
           "model": args.model, "requests": args.requests, "prompt_tokens": args.prompt, "new_tokens": args.new,
           "engine_core": "in-process" if args.in_process else "own process", **environment(), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
