"""Ahead-of-time compile report of the Triton decode kernels for sm_80 and sm_90 (no GPU needed).

Compiles with Triton's CUDA backend and its bundled ptxas, then records per kernel and target what ptxas
allocated: registers per thread, spill stores/loads (bytes), stack frame, shared memory, num_warps,
num_stages. "after": the split-K flash-decoding kernels of kvpack.kernels.triton_decode (as launched), among
them mixed_split (kvpack.kernels.triton_mixed: per-channel mixed widths, the kvpack presets; widths are run-time
data, so it is compiled once per head_dim and query group);
"before": the per-run kernels of kvpack.kernels.triton_attention (launch defaults: 4 warps, 3 stages) at
the same head_dim, bits and query rows (RVQ: 8 x 2048 codes, groups of 32, at 4 query rows only: at 32
rows ptxas needs minutes per kernel). No timings: no GPU was lent, GPU speed is not measured.

    .venv/bin/python benchmarks/triton_compile_report.py [--out results/triton-compile.json]
    .venv/bin/python benchmarks/triton_compile_report.py --before-from results/triton-compile.json  # after rows only
    .venv/bin/python benchmarks/triton_compile_report.py --pages-only  # the vLLM page kernels, other rows kept

"vllm_pages": the kernels of kvpack.integrations.vllm.triton_pages (attention straight from the vLLM plug-in's
packed pages: decode = one query token, split-K; prefill = query blocks of 32 rows; merge),
for 8 KV heads x 4 query heads each, pages of 16 tokens, bf16 model, three slot layouts: nuq3 keys with per-channel
ranges and the per-page key-outlier pool, pre-RoPE, one sink (kvpack-3bit's shape); the same with 4 key outlier
slots per token instead of the pool (key_outliers="token"); raw fp16 slots (the lossless "fp16" method).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402

from kvpack.kernels import triton_attention as legacy  # noqa: E402
from kvpack.kernels import triton_decode as td  # noqa: E402
from kvpack.integrations.vllm import triton_pages as tp  # noqa: E402

DIMS = (64, 128)
BITS = (2, 3, 4)
GROUPS = ((4, 1), (32, 8))  # (query rows G, query tokens Q): 4 query heads per KV head x 1 or 8 tokens
ARCHS = (80, 90)
LEGACY_LAUNCH = {"num_warps": 4, "num_stages": 3}  # what triton_attention's launches get by default


def legacy_configs(dim: int, bits: int, groups: int) -> dict[str, tuple]:
    """The per-run kernels with the constexprs triton_attention launches them with (RVQ: 8 x 2048 codes, groups of 32)."""
    gp = legacy._pow2(groups)
    base = dict(D=dim, G=groups, GP=gp, BLOCK=legacy.BLOCK_N)
    rvq = dict(DEPTH=8, C=2048, GS=32, CBITS=11, PERM=True)
    return {
        "nuq_keys": (legacy._nuq_keys_kernel, {**base, "BITS": bits, "ROPE": True}),
        "nuq_key_outliers": (legacy._nuq_key_outliers_kernel, {**base, "BITS": bits, "ROPE": True}),
        "nuq_values": (legacy._nuq_values_kernel, {**base, "BITS": bits}),
        "nuq_value_outliers": (legacy._nuq_value_outliers_kernel, {**base, "BITS": bits}),
        "rvq_keys": (legacy._rvq_keys_kernel, {**base, **rvq, "ROPE": True}),
        "rvq_values": (legacy._rvq_values_kernel, {**base, **rvq}),
    }


def before_rows() -> list[dict]:
    rows = []
    for dim in DIMS:
        for groups, _ in GROUPS:
            for bits in BITS:
                for name, (fn, consts) in legacy_configs(dim, bits, groups).items():
                    if name.startswith("rvq") and (bits != BITS[0] or groups > 4):  # ptxas takes minutes at G=32
                        continue
                    for arch in ARCHS:
                        stats = td.aot_stats(fn, consts, arch, **LEGACY_LAUNCH)
                        rows.append({"kernel": name, "target": f"sm_{arch}", "head_dim": dim,
                                     "bits": None if name.startswith("rvq") else bits, "groups": groups,
                                     "padded_groups": consts["GP"], "block_tokens": consts["BLOCK"], **stats})
                        print(json.dumps(rows[-1]), flush=True)
    return rows


PAGE_HEADS, PAGE_GROUP, PAGE_BLOCK = 8, 4, 16


def page_layers(dim: int) -> dict:
    """The three page layouts of the report at head_dim `dim` (synthetic codecs: compiles depend on the slot
    layout, not on the calibrated values)."""
    import torch

    from kvpack.codecs.nuq import NuqCodec
    from kvpack.integrations.vllm.slots import LayerSlots, nuq_part, raw_part

    h = PAGE_HEADS
    levels = torch.linspace(-1, 1, 8)
    kc = NuqCodec(levels, "channel", h, dim, 0.01, zero=torch.zeros(h, dim), scale=torch.ones(h, dim))
    vc = NuqCodec(levels, "token", h, dim, 0.01, span="all")
    return {
        "nuq3-pool": (LayerSlots(nuq_part(kc, 0), nuq_part(vc, None), 1, torch.bfloat16, 4 * PAGE_BLOCK), True),
        "nuq3-token-slots": (LayerSlots(nuq_part(kc, 4), nuq_part(vc, None), 1, torch.bfloat16), True),
        "fp16-raw": (LayerSlots(raw_part(h, dim, torch.bfloat16), raw_part(h, dim, torch.bfloat16), 0,
                                torch.bfloat16), False),
    }


def pages_rows() -> list[dict]:
    import torch

    rows = []
    for dim in DIMS:
        for method, (layer, pre_rope) in page_layers(dim).items():
            tables = tp.layer_tables(layer, torch.device("cpu"))
            for name, (fn, sig, consts, launch) in tp.aot_configs(tables, PAGE_GROUP, PAGE_BLOCK, pre_rope).items():
                if name == "pages_merge" and method != "nuq3-pool":  # the merge does not read pages
                    continue
                for arch in ARCHS:
                    stats = tp.aot_stats(fn, sig, consts, arch, **launch)
                    rows.append({"kernel": name, "method": None if name == "pages_merge" else method,
                                 "target": f"sm_{arch}", "head_dim": dim, "groups": PAGE_GROUP,
                                 "rows": consts.get("BM"), "block_tokens": consts.get("BN"),
                                 "pool_chunk": consts.get("PE") if consts.get("POOL") else None, **stats})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def pages_section(rows: list[dict]) -> dict:
    return {"kernels": ("kvpack.integrations.vllm.triton_pages (attention from the vLLM plug-in's packed pages: "
                        "decode split-K, prefill query blocks, merge)"),
            "summary": summary([{**r, "kernel": r["kernel"] + (f"[{r['method']}]" if r["method"] else "")}
                                for r in rows]), "rows": rows}


def summary(rows: list[dict]) -> dict:
    """Per kernel: register range, worst spill stores, targets, whether every compile is free of spills."""
    out: dict = {}
    for r in rows:
        s = out.setdefault(r["kernel"], {"registers": [999, 0], "max_spill_stores": 0, "max_stack": 0, "compiles": 0})
        s["registers"] = [min(s["registers"][0], r["registers"]), max(s["registers"][1], r["registers"])]
        s["max_spill_stores"] = max(s["max_spill_stores"], r["spill_stores"])
        s["max_stack"] = max(s["max_stack"], r["stack"])
        s["compiles"] += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/triton-compile.json")
    parser.add_argument("--skip-before", action="store_true", help="only the split-K kernels")
    parser.add_argument("--before-from", help="take the 'before' rows (per-run kernels, unchanged) from this earlier "
                        "report instead of compiling them again (their G=32, head_dim 128 compiles take ptxas minutes "
                        "each)")
    parser.add_argument("--pages-only", action="store_true", help="compile only the vLLM page kernels and update "
                        "their section of --out, keeping its other rows")
    args = parser.parse_args()
    ok, why = td.aot_available()
    if not ok:
        raise SystemExit(f"cannot compile for sm_80/sm_90 here: {why}")
    if args.pages_only:
        result = json.loads(Path(args.out).read_text())
        result["vllm_pages"] = pages_section(pages_rows())
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({"vllm_pages": result["vllm_pages"]["summary"]}, indent=1))
        return
    after = td.aot_rows(dims=DIMS, bits=BITS, groups=GROUPS, archs=ARCHS)
    for row in after:
        print(json.dumps(row), flush=True)
    before_note = "compiled in this run"
    if args.before_from:
        earlier = json.loads(Path(args.before_from).read_text())
        before = earlier["before"]["rows"]
        before_note = f"carried over from {args.before_from} (triton {earlier['env']['triton']}): kernels unchanged"
    else:
        before = [] if args.skip_before else before_rows()
    result = {
        "note": ("Ahead-of-time compile, no GPU: registers per thread and spills as the bundled ptxas allocates them. "
                 "GPU speed not measured: no GPU was lent."),
        "env": {"triton": triton.__version__, "python": platform.python_version()},
        "register_budget": 128,
        "after": {"kernels": ("kvpack.kernels.triton_decode (split-K flash-decoding, one launch per segment + reduce; "
                              "mixed_split: kvpack.kernels.triton_mixed, the kvpack presets)"),
                  "summary": summary(after), "rows": after},
        "before": {"kernels": "kvpack.kernels.triton_attention (per-run key_scores / value_accum)",
                   "source": before_note, "summary": summary(before), "rows": before},
        "vllm_pages": pages_section(pages_rows()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"after": result["after"]["summary"], "before": result["before"]["summary"]}, indent=1))


if __name__ == "__main__":
    main()
