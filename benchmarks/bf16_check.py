"""The same recipe on the model in float32 and in bfloat16, simulated and through the real cache.

    python benchmarks/bf16_check.py --method kvquant-4bit-1pct --windows 2 --json results/bf16-check.json

The recipe is resolved once on the float32 model (shipped, cached, or calibrated on c4[:500], 16 windows of
2048) and used unchanged for the bf16 model. Rows: fp16 (lossless storage) and the method, per model dtype
and mode (simulated: quantize-dequantize inside one forward; real: each window streamed through
CompressedCache in chunks of --chunk tokens, attention over the packed storage), on the first WikiText-2 windows
of 2048 tokens.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import kvpack
from kvpack.evaluate.perplexity import simulated_perplexity
from kvpack.evaluate.results import environment
from kvpack.evaluate.streaming import streaming_perplexity
from kvpack.recipes import Recipe, resolve_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="kvquant-4bit-1pct")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--modes", default="simulated,real")
    parser.add_argument("--chunk", type=int, default=64, help="real mode: tokens fed per forward (1 = token by token)")
    parser.add_argument("--json", type=Path, default=Path("results/bf16-check.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    model, tok = kvpack.load_model("smollm2-135m")
    recipe = resolve_recipe(model, tok, args.method, calib_data="c4[:500]", calib_windows=16, calib_seqlen=2048)
    windows = kvpack.load_windows(tok, "wikitext2", args.seqlen, args.windows)
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        for rec in (Recipe.baseline("fp16", model.config.num_hidden_layers), recipe):
            for mode in args.modes.split(","):
                if mode == "simulated":
                    result = simulated_perplexity(model, windows, rec, progress=True)
                else:
                    result = streaming_perplexity(model, windows, rec, chunk=args.chunk, progress=True)
                row = {"method": rec.method, "model_dtype": str(dtype).removeprefix("torch."), "mode": mode,
                       "ppl": result.ppl, "bits_per_element": result.bits_per_element, "kl": getattr(result, "kl", None),
                       "top1": getattr(result, "top1", None), "windows": len(windows), "seqlen": args.seqlen,
                       "data": "wikitext2", "model": "smollm2-135m", "seconds": result.seconds,
                       "chunk": args.chunk if mode == "real" else None,
                       "calibration": {k: (rec.calibration or {}).get(k) for k in ("data", "windows", "seqlen")}}
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("method", "model_dtype", "mode", "ppl", "bits_per_element")}))
                args.json.write_text(json.dumps({"command": "python benchmarks/bf16_check.py " + " ".join(
                    f"--{k} {v}" for k, v in vars(args).items()), "env": environment(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
