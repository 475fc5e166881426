"""Total cache bytes of one sequence at 2K / 8K / 32K tokens for the methods of a quality table, from
what the table measured at its window length: `fixed_bytes` (codebooks, rotations, ranges: paid
once per model) plus `marginal_bits_per_element` (codes, scales, outliers, fp16 sink tokens) times
the elements cached. Codes and scales grow exactly linearly with tokens for RVQ (no outliers by
default); sink tokens and data-dependent outlier counts make other rows approximate. Next to it the
bytes of an fp16 cache of the same length. Writes results/rvq-total-bytes.json.

    .venv/bin/python benchmarks/rvq_total_bytes.py --table results/quality-wikitext2.json \
        --methods fp16,rvq-d8-c2048-g32,rvq-d8-c2048-g32:share-all,kvpack-3bit --json results/rvq-total-bytes.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

from kvpack.evaluate.results import read_rows, write_rows
from kvpack.hf.models import load_model, text_config


def elements(config, tokens: int) -> int:
    """K and V elements a cache of `tokens` tokens holds (every layer, one sequence)."""
    cfg = text_config(config)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", type=Path, required=True)
    parser.add_argument("--methods", required=True)
    parser.add_argument("--lengths", default="2048,8192,32768")
    parser.add_argument("--json", type=Path, default=Path("results/rvq-total-bytes.json"))
    args = parser.parse_args()
    rows = [r for r in read_rows(args.table) if r.get("mode") == "simulated"]
    out, configs = [], {}
    for method in args.methods.split(","):
        row = next((r for r in rows if r["method"] == method), None)
        if row is None or row.get("fixed_bytes") is None:
            raise SystemExit(f"{args.table} has no simulated row with fixed_bytes for '{method}'")
        if row["model"] not in configs:
            configs[row["model"]] = load_model(row["model"])[0].config
        config = configs[row["model"]]
        for tokens in map(int, args.lengths.split(",")):
            n = elements(config, tokens)
            total = row["fixed_bytes"] + row["marginal_bits_per_element"] * n / 8
            out.append({"method": method, "tokens": tokens, "fixed_MiB": row["fixed_bytes"] / 2**20,
                        "total_MiB": total / 2**20, "fp16_MiB": 2 * n / 2**20, "fp16_over_total": 2 * n / total,
                        "bits_per_element": 8 * total / n, "measured_at": row["seqlen"], "source": str(args.table)})
            print(f"{method:<32} {tokens:>6} tokens: {total / 2**20:8.2f} MiB (fp16 {2 * n / 2**20:8.2f} MiB)")
    write_rows(args.json, out)


if __name__ == "__main__":
    main()
