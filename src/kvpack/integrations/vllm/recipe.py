"""The kvpack recipe of a vLLM engine: from a recipe folder, or the recipe shipped with kvpack for this model.

vLLM holds its own model, not a transformers one, so the model identity is checked on vLLM's HF config and the
weights fingerprint (sha256 of layer 0's k_proj weight as fp16, as `kvpack.recipes.io.weights_fingerprint`) is
read from the checkpoint's safetensors.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open

from kvpack.errors import KVPackError
from kvpack.integrations.vllm.config import KvpackVllmConfig, KvpackVllmError
from kvpack.methods import needs_calibration, parse_method
from kvpack.recipes.bundled import read_manifest, shipped_methods, verify
from kvpack.recipes.io import check_identity
from kvpack.recipes.recipe import Recipe

K_PROJ_NAMES = ("model.layers.0.self_attn.k_proj.weight", "model.language_model.layers.0.self_attn.k_proj.weight")


def model_shim(hf_config) -> SimpleNamespace:
    """What kvpack's recipe checks read of a model: its config."""
    return SimpleNamespace(config=hf_config)


def checkpoint_fingerprint(model_dir: str | Path) -> str | None:
    """sha256 of layer 0's k_proj weight (fp16 bytes) in the safetensors of `model_dir`, or None if not found."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in K_PROJ_NAMES:
                if name in handle.keys():
                    weight = handle.get_tensor(name).to(torch.float16).contiguous()
                    return hashlib.sha256(weight.numpy().tobytes()).hexdigest()
    return None


def load_recipe(config: KvpackVllmConfig, hf_config, model_dir: str | Path) -> Recipe | None:
    """The recipe `config` asks for, checked against this model; None for the lossless "fp16" slots."""
    shim = model_shim(hf_config)
    if config.recipe is not None:
        try:
            return Recipe.load(config.recipe, shim)
        except KVPackError as exc:
            raise KvpackVllmError(f'additional_config["kvpack"]["recipe"]: {exc}') from exc
    if config.lossless:
        return None
    try:
        settings = parse_method(config.method)
    except KVPackError as exc:
        raise KvpackVllmError(f'additional_config["kvpack"]["method"]: {exc}') from exc
    if not needs_calibration(settings):
        raise KvpackVllmError(
            f"Method '{settings.name}' has no vLLM page layout; inside vLLM kvpack serves 'fp16' (lossless slots) and "
            f"calibrated KVQuant-family recipes ({', '.join(shipped_methods())} ship for the default model).")
    entry = read_manifest()["recipes"].get(settings.name)
    fix = (f"Calibrate one for this model with `kvpack calibrate --model {model_dir} --method {settings.name} --out DIR` "
           'and pass {"recipe": DIR}.')
    if entry is None:
        raise KvpackVllmError(f"No recipe for '{settings.name}' ships with kvpack (shipped: {', '.join(shipped_methods())}). {fix}")
    try:
        check_identity(entry["model_identity"], shim, Path(entry["folder"]))
    except KVPackError as exc:
        raise KvpackVllmError(f"The shipped '{settings.name}' recipe is for another model ({exc}). {fix}") from exc
    if checkpoint_fingerprint(model_dir) != entry["weights_sha256"]:
        raise KvpackVllmError(f"The shipped '{settings.name}' recipe was calibrated on other weights than '{model_dir}' "
                              f"(layer 0 k_proj differs). {fix}")
    try:
        recipe = Recipe.load(verify(entry), shim)
    except KVPackError as exc:
        raise KvpackVllmError(str(exc)) from exc
    if recipe.settings.name != settings.name:
        raise KvpackVllmError(f"The shipped recipe folder for '{settings.name}' holds '{recipe.settings.name}'; reinstall kvpack.")
    return recipe
