"""Saving and loading recipes: one safetensors file for every codec tensor plus a JSON description.

`<dir>/recipe.json` holds the format version, the method settings, each layer's key and value
codec (type + config; `same_as: [layer, role]` for a codec shared with an earlier layer, whose
tensors are written once), the model identity (architecture, layer count, heads, KV heads, head_dim
and a hash of the architecture-defining config fields), the calibration description, and the
sha256 of `<dir>/codecs.safetensors`. Loading checks all of it and raises `RecipeError` with the
problem and the fix.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvpack.codecs import CODEC_TYPES, codec_from_state
from kvpack.errors import MethodError, RecipeError
from kvpack.hf.attention import attention_layers
from kvpack.methods import parse_method
from kvpack.hf.models import text_config

# 2: settings hold the family's typed `options` (1: an `extra` dict); both are read by re-parsing `method`.
FORMAT_VERSION = 2
JSON_NAME = "recipe.json"
TENSORS_NAME = "codecs.safetensors"

# Config fields that decide the shape and meaning of keys and values (the identity hash).
_IDENTITY_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_parameters", "rope_scaling",
    "partial_rotary_factor", "rms_norm_eps", "sliding_window", "layer_types", "hidden_act", "attention_bias",
    "tie_word_embeddings",
)


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def model_identity(model) -> dict:
    """What a recipe must match: architecture, sizes, and a hash of the architecture-defining config."""
    cfg = text_config(model.config)
    picked = {f: getattr(cfg, f, None) for f in _IDENTITY_FIELDS}
    digest = hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()
    architectures = getattr(model.config, "architectures", None) or [type(model).__name__]
    return {
        "architecture": architectures[0],
        "model_type": cfg.model_type,
        "num_layers": cfg.num_hidden_layers,
        "num_heads": cfg.num_attention_heads,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        "head_dim": head_dim_of(cfg),
        "config_sha256": digest,
        "name_or_path": str(getattr(model.config, "_name_or_path", "") or ""),
    }


def weights_fingerprint(model) -> str:
    """sha256 of the first attention layer's k_proj weight (fp16 bytes): tells checkpoints apart."""
    weight = attention_layers(model)[0].k_proj.weight.detach().to("cpu", torch.float16).contiguous()
    return hashlib.sha256(weight.numpy().tobytes()).hexdigest()


PROBE_SIZE = 64  # random projections of the first k_proj weight in a weights probe
# Two loads of the same checkpoint differ by their dtype's rounding: bf16 keeps 8 significant bits, so its
# relative error per element is below 2^-9 and the probes' relative distance below that; other checkpoints
# (fine-tunes included) lie far further apart.
PROBE_TOLERANCE = 2.0 ** -8


def weights_probe(model) -> list[float]:
    """PROBE_SIZE fixed random projections (float64) of the first attention layer's k_proj weight: the same for
    a checkpoint loaded in float32, bfloat16 or float16 up to rounding (see `same_weights`)."""
    weight = attention_layers(model)[0].k_proj.weight.detach().to("cpu", torch.float64).reshape(-1)
    generator = torch.Generator().manual_seed(0)
    projection = torch.randn(PROBE_SIZE, weight.numel(), generator=generator, dtype=torch.float64)
    return (projection @ weight / weight.numel() ** 0.5).tolist()


def same_weights(probe: list[float], other: list[float]) -> bool:
    """True when two weights probes come from the same checkpoint (relative distance <= PROBE_TOLERANCE)."""
    a, b = torch.tensor(probe, dtype=torch.float64), torch.tensor(other, dtype=torch.float64)
    if a.shape != b.shape:
        return False
    return bool((a - b).norm() <= PROBE_TOLERANCE * a.norm())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_recipe(recipe, directory: str | Path) -> Path:
    """Write `recipe` to `directory` (created; files replaced atomically). Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    written: dict[int, list] = {}  # id(codec) -> [layer, role] where its tensors are
    for i, (kc, vc) in enumerate(zip(recipe.key_codecs, recipe.value_codecs)):
        entry = {}
        for role, codec in (("key", kc), ("value", vc)):
            if id(codec) in written:  # a codec shared by several layers is written once
                entry[role] = {"same_as": written[id(codec)]}
                continue
            written[id(codec)] = [i, role]
            config, state = codec.state()
            kind = type(codec).__name__
            if kind not in CODEC_TYPES:
                raise RecipeError(f"codec {kind} of layer {i} is not registered with @register_codec; it cannot be saved.")
            entry[role] = {"type": kind, "config": config}
            for name, t in state.items():
                tensors[f"layers.{i}.{role}.{name}"] = t.detach().to("cpu").contiguous()
        layers.append(entry)
    tmp_tensors = directory / (TENSORS_NAME + ".tmp")
    save_file(tensors, str(tmp_tensors), metadata={"format": "kvpack-recipe", "format_version": str(FORMAT_VERSION)})
    description = {
        "format": "kvpack-recipe",
        "format_version": FORMAT_VERSION,
        "method": recipe.settings.name,
        "settings": asdict(recipe.settings),
        "model": recipe.model_identity,
        "calibration": recipe.calibration,
        "layers": layers,
        "tensors_file": TENSORS_NAME,
        "tensors_sha256": _sha256(tmp_tensors),
    }
    tmp_json = directory / (JSON_NAME + ".tmp")
    tmp_json.write_text(json.dumps(description, indent=1, default=str) + "\n")
    os.replace(tmp_tensors, directory / TENSORS_NAME)
    os.replace(tmp_json, directory / JSON_NAME)
    return directory


def _read_description(directory: Path) -> dict:
    if directory.is_file():
        raise RecipeError(
            f"'{directory}' is a file; a recipe is a folder holding {JSON_NAME} and {TENSORS_NAME}. Pass the folder "
            f"('{directory.parent}' if this file belongs to one), as written by `kvpack calibrate --out DIR`.")
    if not directory.is_dir():
        raise RecipeError(f"Recipe directory '{directory}' does not exist. Pass the folder written by `kvpack calibrate --out DIR`.")
    path = directory / JSON_NAME
    if not path.is_file():
        raise RecipeError(f"'{directory}' holds no {JSON_NAME}; it is not a kvpack recipe. Recalibrate with `kvpack calibrate --out {directory}`.")
    try:
        description = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"'{path}' is damaged (not valid JSON: {exc}). Recalibrate with `kvpack calibrate --out {directory}`.") from exc
    if not isinstance(description, dict) or description.get("format") != "kvpack-recipe":
        raise RecipeError(f"'{path}' is not a kvpack recipe description. Recalibrate with `kvpack calibrate --out {directory}`.")
    version = description.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RecipeError(
            f"'{path}' has recipe format version {version}, newer than this kvpack reads ({FORMAT_VERSION}). "
            "Upgrade kvpack (pip install -U kvpack) or recalibrate with this version."
        )
    return description


def _describe_model(identity: dict) -> str:
    name = identity.get("name_or_path") or "an unnamed model"
    return (f"'{name}' ({identity.get('architecture')}, {identity.get('num_layers')} layers, {identity.get('num_kv_heads')} "
            f"KV heads, head_dim {identity.get('head_dim')})")


def check_identity(saved: dict, model, directory: Path | str) -> None:
    """Raise RecipeError, naming both models, if the recipe was calibrated for another model than `model`."""
    current = model_identity(model)
    for key in ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim", "config_sha256"):
        if saved.get(key) != current[key]:
            raise RecipeError(
                f"Recipe '{directory}' was calibrated for another model: {_describe_model(saved)}, not this model "
                f"{_describe_model(current)} ({key} is {saved.get(key)!r} in the recipe, {current[key]!r} here). "
                "Calibrate a recipe for this model with `kvpack calibrate --model ...` or "
                "kvpack.recipe_for(model, tokenizer, method)."
            )


def load_recipe(directory: str | Path, model=None) -> tuple:
    """(settings, key codecs, value codecs, model identity, calibration) of a recipe saved by `save_recipe`,
    checking format, checksum and (if given) the model."""

    directory = Path(directory)
    description = _read_description(directory)
    tensors_path = directory / str(description.get("tensors_file", TENSORS_NAME))
    if not tensors_path.is_file():
        raise RecipeError(f"Recipe file '{tensors_path}' is missing. Copy the whole recipe folder or recalibrate.")
    if _sha256(tensors_path) != description.get("tensors_sha256"):
        raise RecipeError(
            f"Recipe file '{tensors_path}' is truncated or altered (sha256 differs from {JSON_NAME}). "
            f"Copy it again from its source or recalibrate with `kvpack calibrate --out {directory}`."
        )
    if model is not None and description.get("model"):  # uncalibrated recipes carry no model identity
        check_identity(description["model"], model, directory)
    try:
        tensors = load_file(str(tensors_path))
        settings = parse_method(description["method"])  # canonical names re-parse to their settings
        key_codecs, value_codecs = [], []
        built: dict[tuple[int, str], object] = {}
        for i, entry in enumerate(description["layers"]):
            for role, out in (("key", key_codecs), ("value", value_codecs)):
                if "same_as" in entry[role]:  # shared with an earlier layer: the same object again
                    out.append(built[tuple(entry[role]["same_as"])])
                    continue
                prefix = f"layers.{i}.{role}."
                state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                out.append(codec_from_state(entry[role]["type"], entry[role]["config"], state))
                built[(i, role)] = out[-1]
    except (KeyError, TypeError, ValueError, SafetensorError, MethodError) as exc:
        raise RecipeError(f"Recipe '{directory}' could not be rebuilt ({type(exc).__name__}: {exc}). Recalibrate it with this kvpack version.") from exc
    if model is not None and len(key_codecs) != model_identity(model)["num_layers"]:
        raise RecipeError(f"Recipe '{directory}' has {len(key_codecs)} layers, the model {model_identity(model)['num_layers']}. Recalibrate for this model.")
    return settings, key_codecs, value_codecs, description.get("model", {}), description.get("calibration", {})


def replace_directory(src: Path, dst: Path) -> None:
    """Move a freshly written recipe folder `src` to `dst`, replacing an old one."""
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)
