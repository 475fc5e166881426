"""Every generate() mode with every codec family, on a tiny random Llama (no download).

    python benchmarks/generate_modes.py --json results/generate-modes.json

Modes: greedy, sampling (seeded), beam search (3 beams), assisted decoding (a second tiny model drafts),
batch of 2 with left padding. Methods: lossless fp16 (post- and pre-RoPE), int4, KIVI, nf4, KVQuant, RVQ, the
kvpack preset `kvpack-3bit:budget48` (the flagship kvpack-3bit with codebooks paid from 48 tokens, as calibration
here is short) and TurboQuant at 2.5 and 3.5 bits; calibrated methods are calibrated with kvpack.calibrate on
3 x 64 tokens of random words. Per method and mode: "same as DynamicCache" when the output tokens equal
those generated with transformers' DynamicCache (expected of the lossless fp16 methods), "works" when
generation finishes with the requested length (how many of the generated tokens differ from DynamicCache's: on a
random tiny model the next-token logits are nearly flat, so one flipped token changes the rest of the sequence;
this is no ranking of the methods' quality), or the error raised (a refusal names the problem).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from architectures import word_tokenizer  # benchmarks/architectures.py: the tiny models' word tokenizer
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import kvpack
from kvpack.cache import CompressedCache
from kvpack.errors import KVPackError
from kvpack.hf.attention import cache_kwargs
from kvpack.methods import families, needs_calibration, parse_method
from kvpack.methods.registry import family_of
from kvpack.recipes import Recipe

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=127)
# kvpack-3bit (the flagship preset, per-channel mixed widths) with ':budget48': its codebooks paid from 48 tokens of
# codes, as the calibration here (3 x 64 random words, as tests/test_families.py) and the generations are short
METHODS = ["fp16", "fp16:pre-rope:sink1", "int4:pre-rope:key-channel:g8", "kivi-2:recent8:g8", "nf4",
           "kvquant-3bit-1pct", "rvq-d2-c16-g8:1pct", "kvpack-3bit:budget48", "turboquant-2.5bit", "turboquant-3.5bit"]
MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20, temperature=0.9),
    "beam search": dict(num_beams=3, do_sample=False),
    "assisted": dict(do_sample=False),
    "batch, left padding": dict(do_sample=False),
}


def tiny(seed: int):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**SIZES), attn_implementation="sdpa").eval()


def calibration_text(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    path.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (800,), generator=g)))
    return path


def recipe_for(model, method: str, text: Path) -> Recipe:
    settings = parse_method(method)
    if not needs_calibration(settings):
        return Recipe.baseline(settings, 2)
    tok = word_tokenizer()
    return kvpack.calibrate(model, tok, settings, data=str(text), windows=3, seqlen=64, progress=False)


def inputs(mode: str) -> dict:
    g = torch.Generator().manual_seed(7)
    if mode == "batch, left padding":
        ids = torch.randint(3, 120, (2, 40), generator=g)
        mask = torch.ones_like(ids)
        ids[1, :9], mask[1, :9] = 0, 0
        return dict(input_ids=ids, attention_mask=mask)
    ids = torch.randint(3, 120, (1, 40), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


@torch.no_grad()
def run(model, assistant, mode: str, cache) -> torch.Tensor:
    kwargs = dict(MODES[mode], max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    if mode == "assisted":
        kwargs["assistant_model"] = assistant
    torch.manual_seed(11)
    return model.generate(**inputs(mode), **kwargs, **cache_kwargs(cache))


def check(model, assistant, recipe: Recipe, mode: str, reference: torch.Tensor) -> str:
    try:
        out = run(model, assistant, mode, CompressedCache(model, recipe, block_tokens=8))
    except KVPackError as exc:
        return f"refused: {str(exc).split('. ')[0]}"
    except Exception as exc:  # an error the table must show
        return f"ERROR: {type(exc).__name__}: {str(exc)[:150]}"
    if out.shape != reference.shape:
        return f"WRONG: output shape {tuple(out.shape)} != {tuple(reference.shape)}"
    if torch.equal(out, reference):
        return "same as DynamicCache"
    prompt = inputs(mode)["input_ids"].shape[1]
    differ = out[:, prompt:] != reference[:, prompt:]  # the generated tokens only (the prompt is copied)
    return f"works ({int(differ.sum())} of {differ.numel()} new tokens differ from DynamicCache)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("results/generate-modes.json"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/kvpack-generate-modes"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    text = calibration_text(args.work / "calib.txt")
    model, assistant = tiny(0), tiny(1)
    names = list(METHODS)
    for family in families():  # every registered family appears at least once
        if not any(family_of(m.split(":")[0]).name == family.name for m in names):
            names.append(family.presets[0])
    references = {mode: run(model, assistant, mode, DynamicCache(config=model.config)) for mode in MODES}
    rows = []
    for method in names:
        recipe = recipe_for(model, method, text)
        row = {"method": method}
        for mode in MODES:
            row[mode] = check(model, assistant, recipe, mode, references[mode])
        rows.append(row)
        print(row, file=sys.stderr)
    args.json.write_text(json.dumps({"command": f"python benchmarks/generate_modes.py --json {args.json}",
                                     "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
