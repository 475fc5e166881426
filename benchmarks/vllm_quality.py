"""Quality inside vLLM: WikiText-2 perplexity from `prompt_logprobs`, vLLM's own cache vs kvpack pages, same run.

The windows are the GPTQ/KVQuant protocol's (the test text tokenized once, non-overlapping windows of `seqlen`),
the first `--windows` of them: with the defaults (2 x 2048) the same windows as results/cache-real-vs-sim.json,
whose transformers real-cache deltas are copied next to the vLLM ones. Every token of a window is read back from
the pages (kvpack writes a chunk's tokens before attending to them), as in a simulated-quantization run.

    .venv-vllm/bin/python benchmarks/vllm_quality.py                       # -> results/vllm-quality.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_engine import capacity, engine_kwargs, environment, kvpack_entry, run_child  # noqa: E402

METHODS = ["kvpack-4bit", "kvpack-3bit", "kvpack-2bit", "kvquant-4bit-1pct", "kvquant-3bit-1pct"]
REAL_CACHE = {"wikitext2": Path("results/cache-real-vs-sim.json"), "c4[500:]": Path("results/cache-real-vs-sim-c4.json")}
DATA_ALIASES = {"c4": "c4[500:]"}
OUT = {"wikitext2": "results/vllm-quality.json", "c4[500:]": "results/vllm-quality-c4.json"}
# how the C4 references were made (main venv): float32, chunk 256 (kvpack writes a chunk before attending to it);
# bf16 as vLLM prefills the windows, one chunk each
REAL_CACHE_COMMAND = ("python benchmarks/cache_real_vs_sim.py --data 'c4[500:]' --ppl-out cache-real-vs-sim-c4.json "
                      "--methods fp16,kvpack-2bit,kvpack-3bit,kvpack-4bit --seqlen 2048 --windows 2 --chunk 256 "
                      "--calib-windows 16 --calib-seqlen 2048 --noise-seeds 0 --skip memory,generation; the same with "
                      "--dtype bfloat16 --chunk 2048")


def configs(dtypes: list[str], methods: list[str], key_outlier_slots: int | None = None,
            recipes: str | None = None) -> dict:
    """name -> configuration. With `recipes` (a `kvpack calibrate --out` folder, one subfolder per method), a method
    whose subfolder exists is served from that recipe (`{"recipe": DIR}`), e.g. ':post-rope' variants no recipe
    ships for; `method` names it for the transformers reference."""
    extra = {} if key_outlier_slots is None else {"key_outlier_slots": key_outlier_slots}
    out = {}
    for dtype in dtypes:
        out[f"vllm-{dtype}"] = {"dtype": dtype}
        for m in methods:
            out[f"{m}-{dtype}"] = {"dtype": dtype, "method": m, "kvpack": {**kvpack_entry(m, recipes), **extra}}
    return out


def one(model: str, spec: dict, data: str, seqlen: int, windows: int) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvpack.data import load_windows

    tok = AutoTokenizer.from_pretrained(model)
    ids = load_windows(tok, data, seqlen, windows)
    llm = LLM(model=model, max_model_len=seqlen + 16, enforce_eager=True, **engine_kwargs(spec))
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    prompts = [TokensPrompt(prompt_token_ids=w.tolist()) for w in ids]
    nll, count = [], 0
    for window, out in zip(ids.tolist(), llm.generate(prompts, params, use_tqdm=False)):
        lps = out.prompt_logprobs
        total = -sum(lps[i][window[i]].logprob for i in range(1, len(window)))
        nll.append(total / (len(window) - 1))
        count += len(window) - 1
    result = {"ppl": math.exp(sum(nll) / len(nll)), "window_nll": nll, "tokens_scored": count, **capacity(llm)}
    llm.llm_engine.engine_core.shutdown()
    return result


def real_cache_deltas(data: str, seqlen: int, windows: int, dtype: str = "float32") -> dict:
    """method -> transformers real-cache perplexity delta (%) vs fp16 from the corpus's REAL_CACHE file
    (rows of the same data, seqlen, number of windows and model dtype only; rows without a dtype ran in float32).
    Where the file holds several prefill chunk sizes, the rows prefilled as vLLM prefills these windows are taken:
    one chunk per window (`chunk` == seqlen; vLLM's CPU engine schedules 4096 tokens a step for `LLM`), else the
    largest chunk there is."""
    path = REAL_CACHE.get(data)
    if path is None or not path.is_file():
        return {}
    rows = [r for r in json.loads(path.read_text()) if r.get("kind", "ppl") == "ppl" and "real_ppl" in r
            and r.get("data", "wikitext2") == data and r.get("seqlen") == seqlen and r.get("windows") == windows
            and r.get("dtype", "float32") == dtype]
    chunks = {r.get("chunk") or 0 for r in rows if r.get("method") == "fp16"}
    if chunks:
        chunk = seqlen if seqlen in chunks else max(chunks)
        rows = [r for r in rows if (r.get("chunk") or 0) == chunk]
    base = next((r["real_ppl"] for r in rows if r.get("method") == "fp16"), None)
    return {r["method"]: {"real_ppl": r["real_ppl"], "delta_pct": 100 * (r["real_ppl"] / base - 1), "dtype": dtype,
                          "windows": r["windows"], "seqlen": r["seqlen"], "chunk": r.get("chunk")}
            for r in rows if base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default="wikitext2")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--kv-gib", type=int, default=2)
    parser.add_argument("--key-outlier-slots", type=int, default=None, help="kvpack option (default: the codec's)")
    parser.add_argument("--recipes", default=None,
                        help="folder of saved recipes (kvpack calibrate --out), one subfolder per method: served as "
                             "{'recipe': DIR/METHOD}")
    parser.add_argument("--out", default=None, help="default: results/vllm-quality.json, -c4.json for --data c4")
    parser.add_argument("--annotate", action="store_true",
                        help="no engine: re-read --out and redo its transformers references and gaps (e.g. after a new "
                             "reference run); the rest of the file stays as measured")
    args = parser.parse_args()
    args.data = DATA_ALIASES.get(args.data, args.data)
    if args.out is None:
        args.out = OUT.get(args.data, "results/vllm-quality-" + "".join(c if c.isalnum() else "-" for c in args.data) + ".json")
    if args.model is None:
        from kvpack.hf.models import model_path

        args.model = str(model_path("smollm2-135m"))
    if args.annotate:
        annotate(args)
        return
    table = configs(args.dtypes.split(","), args.methods.split(","), args.key_outlier_slots, args.recipes)
    if args.one:
        print("RESULT " + json.dumps(one(args.model, table[args.one], args.data, args.seqlen, args.windows)), flush=True)
        return
    rows = []
    child_args = ["--model", args.model, "--data", args.data, "--seqlen", str(args.seqlen), "--windows",
                  str(args.windows), "--dtypes", args.dtypes, "--methods", args.methods]
    if args.key_outlier_slots is not None:
        child_args += ["--key-outlier-slots", str(args.key_outlier_slots)]
    if args.recipes is not None:
        child_args += ["--recipes", args.recipes]
    for name, spec in table.items():
        row = {**run_child(__file__, name, child_args, env={"VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib)}), **spec}
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("config", "ppl", "seconds", "error")}), flush=True)
        write(args, rows)  # after every configuration: a long run leaves what it measured


def annotate(args) -> None:
    """Redo the reference fields of the rows in `args.out` (`add_references`), keeping what was measured."""
    path = Path(args.out)
    out = json.loads(path.read_text())
    args.data, args.seqlen, args.windows = out["data"], out["seqlen"], out["windows"]
    add_references(args, out["rows"])
    out["real_cache_reference"] = str(REAL_CACHE.get(args.data))
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"annotated {path}")


def write(args, rows: list[dict]) -> None:
    add_references(args, rows)
    out = {"benchmark": "vllm-quality", "command": "python benchmarks/vllm_quality.py " + " ".join(sys.argv[1:]),
           "model": args.model, "data": args.data, "seqlen": args.seqlen, "windows": args.windows,
           "real_cache_reference": str(REAL_CACHE.get(args.data)), **environment(), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


def add_references(args, rows: list[dict]) -> None:
    """Each kvpack row's delta next to the transformers real-cache delta of the same preset: in the row's own dtype
    where that reference exists (`transformers_real_cache`, `delta_gap_pp`: like for like), and in float32
    (`delta_gap_pp_vs_float32`) when the row ran in another dtype."""
    references = {d: real_cache_deltas(args.data, args.seqlen, args.windows, d)
                  for d in {"float32", *(r["dtype"] for r in rows)}}
    for row in rows:
        base = next((r.get("ppl") for r in rows if r["config"] == f"vllm-{row['dtype']}"), None)
        if base and row.get("ppl"):
            row["delta_pct_vs_vllm_same_dtype"] = 100 * (row["ppl"] / base - 1)
        method = row.get("method") or row.get("kvpack", {}).get("method")
        if "delta_pct_vs_vllm_same_dtype" not in row:
            continue
        delta = row["delta_pct_vs_vllm_same_dtype"]
        same, fp32 = references[row["dtype"]].get(method), references["float32"].get(method)
        if same or fp32:
            row["transformers_real_cache"] = same or fp32
            row["delta_gap_pp"] = delta - (same or fp32)["delta_pct"]
        if fp32 and row["dtype"] != "float32":
            row["delta_gap_pp_vs_float32"] = delta - fp32["delta_pct"]


if __name__ == "__main__":
    main()
