"""Each bad input a user can hand kvpack, tried for real on tiny random models, and the error it gets.

    python benchmarks/bad_inputs.py --json results/bad-inputs.json

A row passes when kvpack raises one of its own errors (KVPackError: the message names the problem and the
fix) instead of returning output; the message is recorded as shown to the user.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, CohereConfig, GPT2Config, LlamaConfig

from kvpack.cache import CompressedCache
from kvpack.errors import KVPackError
from kvpack.hf.attention import cache_kwargs
from kvpack.hf.models import load_model
from kvpack.methods import parse_method
from kvpack.recipes import Recipe

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=256, head_dim=16, pad_token_id=0)
IDS = torch.randint(3, 120, (1, 24), generator=torch.Generator().manual_seed(0))


def tiny(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def llama(**extra):
    return tiny(LlamaConfig(**{**SIZES, **extra}))


def run_cache(model, method: str) -> None:
    with torch.no_grad():
        model(IDS, **cache_kwargs(CompressedCache(model, Recipe.baseline(method, model.config.num_hidden_layers))))


def saved_recipe(work: Path, model, method: str = "int4:pre-rope") -> Path:
    return Recipe.baseline(method, model.config.num_hidden_layers).save(work / method.replace(":", "_"))


def case_nan(work: Path) -> None:
    model = llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("nan")
    run_cache(model, "int4")


def case_overflow(work: Path) -> None:
    model = llama().to(torch.bfloat16)
    model.model.layers[1].self_attn.v_proj.weight.data.mul_(1e6)
    run_cache(model, "int4")


def case_damaged_recipe(work: Path) -> None:
    model = llama()
    from kvpack.recipes.recipe import Recipe as R

    folder = work / "calibrated"
    recipe = R(parse_method("int4"), *[[c] * 2 for c in R.baseline("int4", 2).key_codecs[:1] * 2], model_identity={}, calibration={})
    recipe.save(folder)
    data = (folder / "codecs.safetensors").read_bytes()
    (folder / "codecs.safetensors").write_bytes(data[:-3] + b"xyz")
    R.load(folder, model)


def case_other_model_recipe(work: Path) -> None:
    from kvpack.recipes.io import model_identity

    a, b = llama(), tiny(LlamaConfig(**{**SIZES, "num_hidden_layers": 3}))
    recipe = Recipe.baseline("int4", 2)
    recipe.model_identity = model_identity(a)
    recipe.save(work / "for-a")
    Recipe.load(work / "for-a", b)


def case_recipe_file(work: Path) -> None:
    folder = saved_recipe(work, llama())
    Recipe.load(folder / "recipe.json")  # the file inside the folder, not the folder


def case_other_model_cache(work: Path) -> None:
    """A recipe calibrated for one tiny Llama, handed to a cache for another with the same 2 layers (4 KV heads)."""
    from kvpack.recipes.calibrate import calibrate_windows

    a, b = llama(), llama(num_key_value_heads=4)
    ids = torch.randint(3, 120, (3, 64), generator=torch.Generator().manual_seed(1))
    recipe = calibrate_windows(a, ids, parse_method("kvquant-3bit-1pct"), "random tokens", progress=False)
    CompressedCache(b, recipe)


def case_nan_bf16_values(work: Path) -> None:
    model = llama().to(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    run_cache(model, "int4")


def case_damaged_cache(work: Path) -> None:
    model = llama()
    recipe = Recipe.baseline("int4:pre-rope", 2)
    cache = CompressedCache(model, recipe)
    with torch.no_grad():
        model(IDS, **cache_kwargs(cache))
    path = cache.save(work / "prompt.kvc")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    CompressedCache.load(path, model, recipe)


CASES: dict[str, Callable[[Path], None]] = {
    "missing recipe folder": lambda w: Recipe.load(w / "nowhere"),
    "not a recipe folder": lambda w: Recipe.load(w),
    "damaged recipe tensors": case_damaged_recipe,
    "recipe file instead of its folder": case_recipe_file,
    "recipe for another model (Recipe.load)": case_other_model_recipe,
    "recipe for another model, same layer count (CompressedCache)": case_other_model_cache,
    "unknown method": lambda w: parse_method("gptq4"),
    "unknown option": lambda w: parse_method("int4:fast"),
    "bit width out of range (int9)": lambda w: parse_method("int9"),
    "bit width out of range (kvquant-1bit)": lambda w: parse_method("kvquant-1bit"),
    "bit width out of range (kvpack-1bit)": lambda w: parse_method("kvpack-1bit"),
    "bit width out of range (kvpack-9bit)": lambda w: parse_method("kvpack-9bit"),
    "outlier share out of range": lambda w: parse_method("kvquant-3bit-60pct"),
    "calibrated method without a recipe": lambda w: Recipe.baseline("kvquant-3bit-1pct", 2),
    "group size that does not divide head_dim": lambda w: run_cache(llama(), "int4:g48"),
    "per-channel statistics over a stream": lambda w: run_cache(llama(), "int4:key-channel"),
    "architecture without RoPE (GPT-2)": lambda w: run_cache(tiny(GPT2Config(n_embd=64, n_layer=2, n_head=4,
                                                                              vocab_size=128, n_positions=64)), "int4"),
    "pre-RoPE on interleaved RoPE (Cohere)": lambda w: run_cache(tiny(CohereConfig(**SIZES)), "int4:pre-rope"),
    "pre-RoPE on dynamic-NTK RoPE": lambda w: run_cache(llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                                "rope_theta": 1e4}), "int4:pre-rope"),
    "NaN in the keys": case_nan,
    "NaN in bf16 values": case_nan_bf16_values,
    "bf16 values beyond fp16 storage": case_overflow,
    "damaged saved cache": case_damaged_cache,
    "model path that does not exist": lambda w: load_model(w / "no-model"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("results/bad-inputs.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, case in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                case(Path(tmp))
                outcome, error, message = "NOT REFUSED", "", ""
            except KVPackError as exc:
                outcome, error, message = "refused", type(exc).__name__, str(exc).replace(tmp, "<dir>")
            except Exception as exc:  # not kvpack's own error: the table shows it
                outcome, error, message = "raised a non-kvpack error", type(exc).__name__, str(exc)[:300]
        rows.append({"input": name, "outcome": outcome, "error": error, "message": message})
        print(f"{name:60s} {outcome:10s} {error}: {message[:100]}")
    args.json.write_text(json.dumps({"command": f"python benchmarks/bad_inputs.py --json {args.json}", "rows": rows},
                                    indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
