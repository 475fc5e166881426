"""Recipes shipped inside the package: calibrated recipes of the embedded default model.

`recipes/shipped/` holds one recipe folder per method and `MANIFEST.json`, which records the
command that built them (`kvpack calibrate ... --manifest`), the calibration data (spec, windows,
seqlen, sha256 of the token ids), the model they were calibrated for (identity and weights
fingerprint) and the sha256 of every file. `shipped_recipe` returns a shipped recipe when the
model (identity and weights), the method (canonical name, then every setting) and the calibration
request (data spec, windows, seqlen) all match it, else None; a damaged file is a RecipeError
naming the fix.
"""
from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from kvpack.errors import RecipeError
from kvpack.methods.names import MethodSettings
from kvpack.methods.settings import fitted_settings
from kvpack.recipes.io import (JSON_NAME, TENSORS_NAME, check_identity, model_identity, same_weights, weights_fingerprint,
                               weights_probe)
from kvpack.recipes.recipe import Recipe

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = "kvpack-shipped-recipes"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plain_settings(settings: MethodSettings) -> str:
    """The settings as canonical JSON (every field, `extra` included)."""
    return json.dumps(json.loads(json.dumps(asdict(settings), default=str)), sort_keys=True)


def read_manifest(folder: Path | None = None) -> dict:
    """The manifest of `folder` (default: the shipped recipes); an empty one when there is none."""
    path = Path(folder or SHIPPED_DIR) / MANIFEST_NAME
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "recipes": {}}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RecipeError(f"'{path}' is damaged ({exc}); reinstall kvpack or pass --recalibrate.") from exc
    if manifest.get("format") != MANIFEST_FORMAT:
        raise RecipeError(f"'{path}' is not a shipped-recipe manifest; reinstall kvpack or pass --recalibrate.")
    return manifest


def write_manifest(folder: Path, recipes: list[Recipe], model, model_spec: str, data_description: str,
                   argv: list[str] | None = None) -> Path:
    """Record how the recipe folders `folder/<method>/` were built, with their checksums."""
    manifest = read_manifest(folder)
    command = " ".join(shlex.quote(a) for a in (argv if argv is not None else ["kvpack", *sys.argv[1:]]))
    for recipe in recipes:
        sub = folder / recipe.method
        calibration = recipe.calibration or {}
        manifest["recipes"][recipe.method] = {
            "folder": recipe.method,
            "settings": json.loads(_plain_settings(recipe.settings)),
            "model": model_spec,
            "model_identity": model_identity(model),
            "weights_sha256": weights_fingerprint(model),
            "weights_probe": weights_probe(model),
            "data": {"spec": calibration.get("data"), "description": data_description,
                     "windows": calibration.get("windows"), "seqlen": calibration.get("seqlen"),
                     "tokens_sha256": calibration.get("tokens_sha256")},
            "command": command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": {name: file_sha256(sub / name) for name in (JSON_NAME, TENSORS_NAME)},
            "bytes": sum((sub / name).stat().st_size for name in (JSON_NAME, TENSORS_NAME)),
        }
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def verify(entry: dict, folder: Path | None = None) -> Path:
    """The recipe folder of a manifest entry, after checking every file's sha256."""
    folder = Path(folder or SHIPPED_DIR)
    sub = folder / entry["folder"]
    for name, digest in entry["files"].items():
        path = sub / name
        if not path.is_file() or file_sha256(path) != digest:
            raise RecipeError(
                f"Shipped recipe file '{path}' is missing or altered (sha256 differs from {folder / MANIFEST_NAME}). "
                "Reinstall kvpack (pip install --force-reinstall kvpack), or pass --recalibrate (recalibrate=True)."
            )
    return sub


def matching_entry(model, settings: MethodSettings, data: str, windows: int, seqlen: int,
                   folder: Path | None = None) -> dict | None:
    """The manifest entry for this model, method settings and calibration request, or None."""
    folder = Path(folder or SHIPPED_DIR)
    entry = read_manifest(folder)["recipes"].get(settings.name)  # canonical names carry every option
    if entry is None:
        return None
    wanted = entry["data"]
    if (wanted["spec"], wanted["windows"], wanted["seqlen"]) != (data, windows, seqlen):
        return None
    try:
        check_identity(entry["model_identity"], model, folder / entry["folder"])
    except RecipeError:
        return None
    if "weights_probe" in entry:  # the same checkpoint in any dtype
        return entry if same_weights(entry["weights_probe"], weights_probe(model)) else None
    return entry if entry["weights_sha256"] == weights_fingerprint(model) else None


def shipped_recipe(model, settings: MethodSettings, data: str = "c4[:500]", windows: int = 16, seqlen: int = 2048,
                   folder: Path | None = None) -> Recipe | None:
    """The shipped recipe calibrated for exactly this request (model, settings, data, windows, seqlen), or None."""
    folder = Path(folder or SHIPPED_DIR)
    fitted = fitted_settings(settings)  # one recipe serves every recent window
    entry = matching_entry(model, fitted, data, windows, seqlen, folder)
    if entry is None:
        return None
    path = verify(entry, folder)
    try:
        recipe = Recipe.load(path, model)
    except RecipeError as exc:
        raise RecipeError(f"The shipped recipe '{path}' does not load with this kvpack ({exc}). Rebuild it with: "
                          f"{entry['command']}; or pass --recalibrate (recalibrate=True).") from exc
    same = _plain_settings(fitted_settings(recipe.settings)) == _plain_settings(fitted)
    return replace(recipe, settings=settings) if same else None


def shipped_methods(folder: Path | None = None) -> list[str]:
    """Names of the methods with a shipped recipe."""
    return sorted(read_manifest(folder)["recipes"])
