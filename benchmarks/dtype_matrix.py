"""The default model in every dtype x attention implementation x method family, through the real cache, next to
the same model's DynamicCache (kvpack.evaluate.dtype_matrix.run_cell).

    python benchmarks/dtype_matrix.py --json results/dtype-matrix.json

Per cell: SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to float32, then cast to the cell's dtype) with the
cell's attention implementation; a prefill of --prefill tokens of the text kvpack ships, then --steps
teacher-forced decode steps. top1 = agreement of the next-token predictions with the DynamicCache of the same
model (dtype, attention); max_diff = largest logit difference between packed attention and decode-then-attend
over the same stored bits; paths = which code read the decode steps. Recipes come from kvpack.recipe_for (the
shipped ones, for every dtype); the RVQ row is calibrated here on a small sample (--rvq-data), since the
matrix checks mechanics, not RVQ's best quality.
"""
from __future__ import annotations

import argparse
import time
from importlib import resources

import torch
from tqdm import tqdm

import kvpack
from kvpack.evaluate.dtype_matrix import ATTENTIONS, DTYPES, model_in, run_cell
from kvpack.evaluate.results import environment, write_rows

METHODS = ["fp16:pre-rope:sink1", "kivi-4", "kvquant-3bit-1pct", "kvpack-3bit", "turboquant-3.5bit", "rvq-d4-c256-g32"]
MODEL_NAME = "smollm2-135m (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="results/dtype-matrix.json")
    parser.add_argument("--prefill", type=int, default=192)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rvq-data", default="c4[:500]", help="calibration text of the RVQ row (2 windows of 1024)")
    args = parser.parse_args()

    base, tok = kvpack.load_model("smollm2-135m")
    text = resources.files("kvpack.texts").joinpath("kv-cache-guide.txt").read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, :args.prefill + args.steps]
    recipes = {}
    for method in args.methods.split(","):
        if method.startswith("rvq"):
            recipes[method] = kvpack.calibrate(base, tok, method, data=args.rvq_data, windows=2, seqlen=1024, progress=False)
        else:
            recipes[method] = kvpack.recipe_for(base, tok, method, progress=False)
    rows = []
    cells = [(d, a, m) for d in DTYPES for a in ATTENTIONS for m in recipes]
    for dtype, attn, method in tqdm(cells, desc="dtype x attention x method"):
        model = model_in(base, DTYPES[dtype], attn)
        started = time.perf_counter()
        try:
            cell = run_cell(model, recipes[method], ids, args.prefill)
            row = {"dtype": dtype, "attention": attn, "method": method, **cell}
            row["paths"] = ", ".join(f"{p} x{n}" for p, n in sorted(cell["paths"].items()))
        except Exception as exc:  # a crash is a result of this matrix: record it, go on
            row = {"dtype": dtype, "attention": attn, "method": method, "error": f"{type(exc).__name__}: {exc}"}
        row |= {"seconds": round(time.perf_counter() - started, 2), "model": MODEL_NAME, "prefill": args.prefill,
                "environment": environment()}
        rows.append(row)
        del model
    write_rows(args.json, rows)
    for r in rows:
        print(r["dtype"], r["attention"], r["method"], r.get("top1"), r.get("max_logit_diff_vs_decoded"), r.get("paths"),
              r.get("error", ""))


if __name__ == "__main__":
    main()
