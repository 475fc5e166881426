"""Every dtype x attention implementation x method family, through the real cache, next to the same model's
DynamicCache (kvpack.evaluate.dtype_matrix.run_cell).

    python benchmarks/dtype_matrix.py --model tiny --json results/dtype-matrix.json        # tiny Llama + Gemma 2
    python benchmarks/dtype_matrix.py --json results/dtype-matrix-smollm2.json             # the default model

--model tiny: randomly initialized 2-layer Llama (GQA) and Gemma 2 (softcap, a sliding-window layer) of
benchmarks/architectures.py, every calibrated method fitted on 3 x 64 tokens of random words (kvpack-3bit as
kvpack-3bit:budget48: its codebooks paid from 48 tokens of codes, the length these models see); 32 prompt
tokens, 12 decode steps.

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
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
from architectures import calibration_text, tiny_model, word_tokenizer  # benchmarks/architectures.py
from tqdm import tqdm

import kvpack
from kvpack.evaluate.dtype_matrix import ATTENTIONS, DTYPES, model_in, run_cell
from kvpack.evaluate.results import environment, write_rows
from kvpack.methods import needs_calibration, parse_method
from kvpack.recipes import Recipe

TINY_METHODS = ["fp16:pre-rope:sink1", "int4:pre-rope:key-channel:g8", "kivi-2:recent8:g8", "kvquant-3bit-1pct",
                "kvpack-3bit:budget48", "rvq-d2-c16-g8:1pct", "turboquant-3.5bit"]
METHODS = ["fp16:pre-rope:sink1", "kivi-4", "kvquant-3bit-1pct", "kvpack-3bit", "turboquant-3.5bit", "rvq-d4-c256-g32"]
MODEL_NAME = "smollm2-135m (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="results/dtype-matrix.json")
    parser.add_argument("--prefill", type=int, default=192)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rvq-data", default="c4[:500]", help="calibration text of the RVQ row (2 windows of 1024)")
    parser.add_argument("--model", default="smollm2-135m", help="'tiny' (tiny Llama and Gemma 2) or smollm2-135m")
    args = parser.parse_args()
    rows = tiny_rows() if args.model == "tiny" else default_model_rows(args)
    write_rows(args.json, rows)
    for r in rows:
        print(r.get("model_name", ""), r["dtype"], r["attention"], r["method"], r.get("top1"),
              r.get("max_logit_diff_vs_decoded"), r.get("paths"), r.get("error", ""))


def _cell(model, recipe, ids, prefill: int, row: dict) -> dict:
    """One cell as a result row: run_cell's numbers, or the error it raised (a crash is a result here)."""
    started = time.perf_counter()
    try:
        cell = run_cell(model, recipe, ids, prefill, block_tokens=8 if ids.shape[1] < 128 else 128)
        row |= cell | {"paths": ", ".join(f"{p} x{n}" for p, n in sorted(cell["paths"].items()))}
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row | {"seconds": round(time.perf_counter() - started, 2), "prefill": prefill, "environment": environment()}


def tiny_rows() -> list[dict]:
    """The matrix on the tiny Llama (sdpa and eager) and Gemma 2 (eager: its attention) of architectures.py."""
    text = calibration_text(Path(tempfile.mkdtemp()) / "calib.txt")
    ids = torch.randint(3, 120, (1, 44), generator=torch.Generator().manual_seed(5))
    rows = []
    for arch, attentions in (("llama", ATTENTIONS), ("gemma2", ("eager",))):
        base = tiny_model(arch, {})
        recipes = {}
        for method in TINY_METHODS:
            settings = parse_method(method)
            recipes[method] = (kvpack.calibrate(base, word_tokenizer(), settings, data=str(text), windows=3, seqlen=64,
                                                progress=False) if needs_calibration(settings)
                               else Recipe.baseline(settings, base.config.num_hidden_layers))
        for dtype in DTYPES:
            for attn in attentions:
                model = model_in(base, DTYPES[dtype], attn)
                for method, recipe in recipes.items():
                    rows.append(_cell(model, recipe, ids, 32, {"model_name": f"tiny {arch}", "dtype": dtype,
                                                               "attention": attn, "method": method}))
    return rows


def default_model_rows(args) -> list[dict]:
    """The matrix on the default model (shipped recipes via kvpack.recipe_for; RVQ calibrated on a small sample)."""
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
        rows.append(_cell(model, recipes[method], ids, args.prefill, {"model_name": MODEL_NAME, "dtype": dtype,
                                                                      "attention": attn, "method": method}))
        del model
    return rows

if __name__ == "__main__":
    main()
