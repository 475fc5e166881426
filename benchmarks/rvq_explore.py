"""Small-scale RVQ exploration on SmolLM2: calibrate several rvq-* methods on the same collected
activations (collected once, cached), then simulated perplexity on the first windows of an eval set.

    flock /tmp/kvpack-heavy.lock .venv/bin/python benchmarks/rvq_explore.py \
        --methods rvq-d8-c2048-g32,rvq-d8-c2048-g32:key-contiguous --calib-windows 8 --eval-windows 4 \
        --json results/rvq-explore.json

Calibration: the first --calib-windows windows of --calib-data (default c4[:500]); fitted key and
value codecs are cached under --work per everything their fit depends on, so an option that changes
only keys refits only keys (delete the folder to refit). Rows of the result
JSON: method, ppl, delta vs fp16, bits per element (codes + scale + outliers, and with the
codebooks amortized over the evaluated context as the simulator counts them), fit time.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from kvpack.recipes.collect import LayerActivations, collect_activations
from kvpack.data import load_windows
from kvpack.evaluate.perplexity import simulated_perplexity
from kvpack.methods.names import parse_method
from kvpack.hf.models import load_model
from kvpack.recipes.recipe import Recipe
from kvpack.recipes.io import model_identity
from kvpack.codecs import Fp16Codec, codec_from_state
from kvpack.codecs.rvq import RVQCodec, intra_op_threads
from kvpack.methods.rvq.train import RVQTrainConfig, _layer_mean, fit_codec


def activations(model, tokenizer, data: str, windows: int, seqlen: int, cache: Path) -> list[LayerActivations]:
    """Collected pre-RoPE K/V rows (all tokens after the first), cached in `cache`."""
    if cache.is_file():
        return [LayerActivations(keys=k, values=v, heads=h) for k, v, h in torch.load(cache)]
    ids = load_windows(tokenizer, data, seqlen, windows)
    start = time.perf_counter()
    acts, _ = collect_activations(model, ids, fisher=False, sink_tokens=1, max_rows=None, progress=False)
    print(f"collected {windows} x {seqlen} tokens of {data} in {time.perf_counter() - start:.0f} s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save([(a.keys, a.values, a.heads) for a in acts], cache)
    return acts


def fit_kind(acts, kind: str, settings, config: RVQTrainConfig, folder: Path) -> tuple[list[RVQCodec], list[dict], float]:
    """Per-layer codecs for keys or values, cached in `folder` by everything the fit of `kind` depends on
    (so e.g. :key-contiguous refits only keys and :sink1 refits nothing)."""
    extra = settings.extra
    group = settings.key_group if kind == "keys" else settings.value_group
    grouping = extra["key_grouping"] if kind == "keys" else extra["value_grouping"]
    tag = (f"{kind}-d{extra['depth']}-c{extra['codes']}-g{group}-{grouping}-{extra['codebook_training']}"
           f"-out{extra['outliers']}-{hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:8]}")
    path = folder / f"{tag}.pt"
    if path.is_file():
        saved = torch.load(path)
        return [codec_from_state("RVQCodec", c, t) for c, t in saved["codecs"]], saved["info"], saved["seconds"]
    generator = torch.Generator().manual_seed(config.seed)
    codecs, infos, start = [], [], time.perf_counter()
    with intra_op_threads(config.threads):
        for layer in acts:
            rows = layer.keys if kind == "keys" else layer.values
            codec, info = fit_codec(rows, layer.heads, depth=extra["depth"], size=extra["codes"], group=group,
                                    grouping=grouping, outliers=extra["outliers"], ema=extra["codebook_training"] == "ema",
                                    config=config, generator=generator)
            codecs.append(codec)
            infos.append(info)
    seconds = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"codecs": [c.state() for c in codecs], "info": infos, "seconds": seconds}, path)
    return codecs, infos, seconds


def recipe_for(model, acts, method: str, folder: Path, config: RVQTrainConfig) -> tuple[Recipe, float | None, dict]:
    """The recipe of `method` (RVQ codecs fitted or loaded per K/V); returns (recipe, fit seconds, mean stats).

    A suffix `@keys` / `@values` (diagnostic) quantizes only keys / only values, the other in fp16.
    """
    method, _, only = method.partition("@")
    if only:
        recipe, fit_s, mean = recipe_for(model, acts, method, folder, config)
        fp16 = [Fp16Codec()] * recipe.num_layers
        if only == "keys":
            recipe.value_codecs = fp16
        elif only == "values":
            recipe.key_codecs = fp16
        else:
            raise SystemExit(f"unknown diagnostic suffix @{only}: use @keys or @values")
        return recipe, fit_s, mean
    settings = parse_method(method)
    if settings.family != "rvq":
        return Recipe.baseline(settings, len(acts)), None, {}
    keys, k_info, k_s = fit_kind(acts, "keys", settings, config, folder)
    values, v_info, v_s = fit_kind(acts, "values", settings, config, folder)
    layers = [{"keys": k, "values": v} for k, v in zip(k_info, v_info)]
    mean = {f"{kind}_heldout_rel_error": _layer_mean(layers, kind, "heldout", "rel_error") for kind in ("keys", "values")}
    mean |= {f"{kind}_heldout_usage": _layer_mean(layers, kind, "heldout", "usage_perplexity") for kind in ("keys", "values")}
    return Recipe(settings, keys, values, model_identity(model), {}), k_s + v_s, mean


def truncated(recipe: Recipe, depth: int) -> Recipe:
    """The first `depth` stages of every RVQ codec of `recipe` (greedy residual coding: stage s only
    depends on stages < s, so this is the depth-`depth` quantizer trained the same way, up to the
    joint EMA pass)."""
    def cut(codec):
        if not isinstance(codec, RVQCodec):
            return codec
        return RVQCodec(codec.codebooks[:depth], codec.head_dim, codec.grouping, codec.lower, codec.upper)

    settings = parse_method(truncated_name(recipe.settings.name, depth))
    return Recipe(settings, [cut(c) for c in recipe.key_codecs], [cut(c) for c in recipe.value_codecs],
                  recipe.model_identity, recipe.calibration)


def truncated_name(method: str, depth: int) -> str:
    base, sep, options = method.partition(":")
    settings = parse_method(base)
    return f"rvq-d{depth}-c{settings.extra['codes']}-g{settings.key_group}{sep}{options}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", required=True)
    parser.add_argument("--calib-data", default="c4[:500]")
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--eval-data", default="wikitext2")
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rvq_dev"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-fp16", action="store_true", help="skip the fp16 row")
    parser.add_argument("--finetuned", type=Path, help="merge this `kvpack finetune` adapter into the model and add "
                        "its recipe (tuned codebooks) as a method; fp16 is then the model with the adapter")
    parser.add_argument("--fit-only", action="store_true",
                        help="fit and save the recipes, evaluate nothing (fitting does not run the model: no lock needed)")
    parser.add_argument("--save-recipes", type=Path,
                        help="save each fitted rvq method's recipe to this folder (one subfolder per method), e.g. for `kvpack finetune --recipe`")
    parser.add_argument("--depths", default="",
                        help="also evaluate the first d stages of the first RVQ method, for each d here (e.g. 1,2,3,4,5,6,7)")
    parser.add_argument("--train-vectors", type=int, help="group vectors per layer and K/V in the EMA pass (default: RVQTrainConfig's)")
    parser.add_argument("--ema-passes", type=int, help="EMA passes over those vectors (default: RVQTrainConfig's)")
    args = parser.parse_args()
    overrides = {k: v for k, v in (("train_vectors", args.train_vectors), ("ema_passes", args.ema_passes)) if v is not None}
    train_config = RVQTrainConfig(**overrides)
    tag = "".join(f" [{k.replace('_', ' ')} {v}]" for k, v in overrides.items())  # rows say how they were trained

    model, tokenizer = load_model()
    cache = args.work / f"acts-{args.calib_data.replace('[', '_').replace(':', '-').replace(']', '')}-{args.calib_windows}x{args.seqlen}.pt"
    acts = activations(model, tokenizer, args.calib_data, args.calib_windows, args.seqlen, cache)
    tuned = None
    if args.finetuned:  # after collecting: calibration activations come from the base model
        from kvpack.finetune.train import apply_finetuned

        tuned = apply_finetuned(model, args.finetuned)
    windows = load_windows(tokenizer, args.eval_data, args.seqlen, args.eval_windows)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.no_fp16 and not args.fit_only and "fp16" not in methods:
        methods.insert(0, "fp16")
    if tuned is not None:
        methods.append(tuned.method + ":ft")
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    plan, swept = [], False
    for method in methods:
        if tuned is not None and method == tuned.method + ":ft":
            plan.append((method, lambda: (tuned, None, {})))
            continue
        plan.append((method, lambda m=method: recipe_for(model, acts, m, args.work / f"codecs-{cache.stem}", train_config)))
        settings = parse_method(method.partition("@")[0])
        if settings.family == "rvq" and not swept and not args.fit_only:
            swept = True
            for d in depths:
                if d < settings.extra["depth"]:
                    def prefix(m=method, d=d):
                        recipe, _, mean = recipe_for(model, acts, m, args.work / f"codecs-{cache.stem}", train_config)
                        per_stage = {k: v[:d] for k, v in mean.items() if isinstance(v, list)}  # stages 1..d
                        return truncated(recipe, d), None, per_stage
                    label = f"{truncated_name(method, d)} (stages 1-{d} of {method.split(':')[0]})"
                    plan.append((label, prefix))
    old = json.loads(args.json.read_text()) if args.json and args.json.is_file() else []
    rows = []
    eval_label = f"{args.eval_data}[:{args.eval_windows}x{args.seqlen}]"
    # With --no-fp16, deltas are taken against the fp16 row of the same evaluation already in --json
    # (not for a fine-tuned model: its fp16 row is the tuned model's, measured in this run).
    base = None if tuned is not None else next(
        (r["ppl"] for r in old if r.get("method") == "fp16" and r.get("eval") == eval_label), None)
    for method, make in plan:
        recipe, fit_s, mean = make()
        if args.save_recipes and recipe.settings.family == "rvq" and "(" not in method and "@" not in method:
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in method)
            recipe.calibration = {"data": args.calib_data, "windows": args.calib_windows, "seqlen": args.seqlen,
                                  "fitted_by": "benchmarks/rvq_explore.py"}
            recipe.save(args.save_recipes / safe)
        if args.fit_only:
            print(f"{method}: fitted in {fit_s:.0f} s" if fit_s else f"{method}: nothing to fit", flush=True)
            continue
        result = simulated_perplexity(model, windows, recipe, progress=False)
        codes_bits = None
        if recipe.settings.family == "rvq":
            # Per-token storage without the shared codebooks: every layer's keys and values of the first
            # calibration window, laid out [1, heads, tokens, head_dim] as the cache holds them (outlier
            # thresholds are per head, so the heads must not be mixed).
            from kvpack.methods.kvquant.fit import blocks

            stored = elements = 0
            for layer, k_codec, v_codec in zip(acts, recipe.key_codecs, recipe.value_codecs):
                heads = int(layer.heads.max()) + 1
                for kind_rows, codec in ((layer.keys, k_codec), (layer.values, v_codec)):
                    x = blocks(kind_rows, layer.heads, heads)[:1]
                    enc = codec.encode(x)
                    stored += enc.bits_per_element() * x.numel()
                    elements += x.numel()
            codes_bits = stored / elements
        base = result.ppl if method == "fp16" else base
        label = method + ((" (adapter)" if tuned is not None else "") if method == "fp16" else tag)
        row = {"method": label, "ppl": result.ppl, "delta_pct": None if base is None else 100 * (result.ppl / base - 1),
               "bits_per_element_simulated": result.bits_per_element, "bits_codes_scale": codes_bits,
               "fit_s": fit_s, "eval_s": result.seconds, "eval": eval_label,
               "calib": f"{args.calib_data} {args.calib_windows}x{args.seqlen}",
               "heldout_rel_error_keys": mean.get("keys_heldout_rel_error"),
               "heldout_rel_error_values": mean.get("values_heldout_rel_error"),
               "heldout_usage_keys": mean.get("keys_heldout_usage"), "heldout_usage_values": mean.get("values_heldout_usage")}
        for kind in ("keys", "values"):  # relative squared error left after the last stage (held-out rows)
            errors = row[f"heldout_rel_error_{kind}"]
            row[f"final_rel_error_{kind}"] = errors[-1] if isinstance(errors, list) and errors else errors
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after every row, so an interrupted sweep keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(old + rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
