"""Calibration: text -> per-layer activations (+ Fisher) -> a fitted recipe, cached on disk.

`calibrate(model, tokenizer, "kvquant-3bit-1pct", data="c4[:500]", windows=16, seqlen=2048)` runs the
model over the calibration windows (`collect.collect_activations`: pre-RoPE K/V rows and, for
Fisher-weighted methods, squared gradients), then hands the rows to the method family's fitter.
`recipe.calibration["timing_s"]` says where the time went (forward, backward, thresholds, k-means).

A kvpack preset (`kvpack-<N>bit`) checks its switches on held-out calibration windows first and is fitted as
the configuration that check keeps (recipes/select.py); `recipe.calibration["selection"]` records the decision.

`cached_calibration` is what `kvpack eval` uses: a saved recipe folder if given, else a recipe
cached under `cache_root()/recipes/` keyed by the model (identity + weights fingerprint), the
full method settings, the exact calibration token ids, and `CALIBRATION_VERSION`.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from kvpack.errors import DataError, MethodError, RecipeError
from kvpack.methods import MethodSettings, family_named, needs_calibration, parse_method
from kvpack.methods.settings import fitted_settings
from kvpack.methods.kvpack.config import is_preset
from kvpack.recipes.recipe import Recipe
from kvpack.data import load_windows
from kvpack.recipes.self_data import SELF_SPEC, self_windows
from kvpack.recipes.collect import CollectionTiming, LayerActivations, collect_activations
from kvpack.hf.models import cache_root, num_layers
from kvpack.recipes.io import model_identity, replace_directory, weights_fingerprint
from kvpack.recipes.select import SELECTION_VERSION, select_switches

# Bump when fitting changes what a recipe holds, so cached recipes are recomputed.
CALIBRATION_VERSION = 1


def needs_fisher(settings: MethodSettings) -> bool:
    """Whether calibrating `settings` needs Fisher information (asked of its family)."""
    return family_named(settings.family).needs_fisher(settings)


def calibration_windows(tokenizer, data: str, windows: int, seqlen: int, model=None, progress: bool = True) -> torch.Tensor:
    """The first `windows` windows [windows, seqlen] of `data`; error if the data is too short.
    `data="self"` (needs `model`): windows the model writes itself (see recipes.self_data)."""
    if windows < 1:
        raise DataError(f"calibration needs at least one window, got {windows}.")
    if data == SELF_SPEC:
        if model is None:
            raise DataError("calibration data 'self' is written by the model: pass the model to calibration_windows.")
        return self_windows(model, tokenizer, windows, seqlen, progress=progress)
    ids = load_windows(tokenizer, data, seqlen, windows)
    if ids.shape[0] < windows:
        raise DataError(
            f"Calibration data '{data}' holds only {ids.shape[0]} windows of {seqlen} tokens, {windows} asked. "
            "Use fewer --windows, a shorter --seqlen, or more data."
        )
    return ids


def estimate_seconds(model, ids: torch.Tensor, fisher: bool) -> float:
    """Seconds one calibration window takes (forward, and backward for Fisher), timed on ids[0]."""
    window = ids[:1].to(model.device)
    start = time.perf_counter()
    if fisher:
        with torch.enable_grad():
            emb = model.get_input_embeddings()(window).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb).logits[:, :-1].float()
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1)).backward()
    else:
        with torch.no_grad():
            model(window)
    return time.perf_counter() - start


def _announce(model, ids: torch.Tensor, settings: MethodSettings, progress: bool) -> None:
    """Say how long collecting the activations will take, from one timed window (skipped when memoized)."""
    if not progress:
        return
    cached = _LAST_COLLECTION.get("entry")
    tokens = hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()
    if cached is not None and cached[0][0] == id(model) and cached[0][1] == tokens:
        return
    one = estimate_seconds(model, ids, needs_fisher(settings))
    _log(progress, f"calibrating {settings.name} on {ids.shape[0]} windows of {ids.shape[1]} tokens: one window takes "
         f"{one:.1f} s, so about {one * ids.shape[0]:.0f} s ({one * ids.shape[0] / 60:.1f} min) to collect the "
         "activations, then the fit")


def _log(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


# The last collection, reused while the same model calibrates several methods on the same windows
# (e.g. `kvpack eval --methods kvquant-4bit,kvquant-3bit-1pct,...`): one forward/backward pass over
# the data instead of one per method. One entry only, so memory stays bounded.
_LAST_COLLECTION: dict = {}


def _collect(model, ids: torch.Tensor, fisher: bool, sink_tokens: int, pre_rope: bool, progress: bool):
    """collect_activations with a one-entry memo; a Fisher collection also serves Fisher-free methods."""

    tokens = hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()
    key = (id(model), tokens, tuple(ids.shape), sink_tokens, pre_rope)
    cached = _LAST_COLLECTION.get("entry")
    if cached is not None and cached[0] == key and (cached[1] or not fisher):
        _log(progress, "reusing the activations collected for the previous method")
        layers = cached[2] if fisher else [
            LayerActivations(keys=a.keys, values=a.values, heads=a.heads) for a in cached[2]
        ]
        return layers, CollectionTiming()
    _LAST_COLLECTION.clear()
    kwargs = dict(fisher=fisher, sink_tokens=sink_tokens, progress=progress)
    if not pre_rope:
        kwargs["pre_rope"] = False
    activations, timing = collect_activations(model, ids, **kwargs)
    _LAST_COLLECTION["entry"] = (key, fisher, activations)
    return activations, timing


def forget_collection() -> None:
    """Drop the memoized activations (frees their memory)."""
    _LAST_COLLECTION.clear()


def calibrate_windows(model, ids: torch.Tensor, settings: MethodSettings, data: str, progress: bool = True) -> Recipe:
    """Calibrate `settings` on token windows ids [n, seqlen] (described as `data`)."""

    family = family_named(settings.family)
    if not family.calibrated:
        raise MethodError(f"'{settings.name}' needs no calibration; build it with Recipe.baseline.")
    start = time.perf_counter()
    fisher = needs_fisher(settings)
    activations, timing = _collect(model, ids, fisher, settings.sink_tokens, settings.pre_rope, progress)
    fit_settings, selection = fitted_settings(settings), None  # the recent window changes nothing fitted
    if is_preset(settings):  # the switches are checked on held-out windows; the kept ones are fitted below
        fit_settings, selection = select_switches(model, ids, activations, fit_settings, progress)
    keys, values, info = family.fit(model, activations, fit_settings, progress=progress)
    del activations
    total = time.perf_counter() - start
    info = dict(info)
    fit_timing = info.pop("timing_s", {})
    checked = {"selection": selection.get("seconds", 0.0)} if selection else {}
    timing_s = {"forward": timing.forward_s, "backward": timing.backward_s, **checked, **fit_timing, "total": total}
    calibration = {
        "data": data, "windows": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "tokens": int(ids.numel()),
        "tokens_sha256": hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest(),
        "fisher": fisher, "sink_tokens": settings.sink_tokens, "timing_s": timing_s,
        "calibration_version": CALIBRATION_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info,
    }
    if selection is not None:
        calibration["selection"] = selection
    _log(progress, f"calibrated {settings.name} on {ids.shape[0]} x {ids.shape[1]} tokens of {data} in {total:.1f} s: "
         + ", ".join(f"{k} {v:.1f} s" for k, v in timing_s.items() if k != "total"))
    return Recipe(settings, keys, values, model_identity(model), calibration)


def calibrate(
    model, tokenizer, method: str | MethodSettings, data: str = "c4[:500]", windows: int = 16, seqlen: int = 2048,
    progress: bool = True,
) -> Recipe:
    """Calibrate `method` for `model` on `windows` windows of `seqlen` tokens of `data` (a corpus spec,
    a path, or "self": text the model writes itself); returns the Recipe. Always calibrates afresh: for the recipe
    kvpack ships (or has cached) for these weights, use `kvpack.recipe_for(model, tokenizer, method)`."""
    settings = parse_method(method) if isinstance(method, str) else method
    if not needs_calibration(settings):
        return Recipe.baseline(settings, num_layers(model))
    ids = calibration_windows(tokenizer, data, windows, seqlen, model=model, progress=progress)
    _announce(model, ids, settings, progress)
    return calibrate_windows(model, ids, settings, data, progress)


def cache_key(model, settings: MethodSettings, ids: torch.Tensor) -> str:
    """Hash of everything a calibrated recipe depends on (not the recent window: `fitted_settings`)."""

    payload = {
        "model": model_identity(model), "weights": weights_fingerprint(model), "settings": asdict(fitted_settings(settings)),
        "tokens": hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest(), "shape": list(ids.shape),
        "version": CALIBRATION_VERSION,
    }
    if is_preset(settings):  # a preset's recipe also depends on the held-out check of its switches
        payload["selection"] = SELECTION_VERSION
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cached_calibration(
    model, tokenizer, settings: MethodSettings, data: str = "c4[:500]", windows: int = 16, seqlen: int = 2048,
    recipe_dir: str | Path | None = None, progress: bool = True, recalibrate: bool = False,
) -> Recipe:
    """The recipe for `settings`: loaded from `recipe_dir`, from the disk cache (unless `recalibrate`),
    or calibrated and cached."""
    fitted = fitted_settings(settings)  # a recipe serves every recent window: the recipe of `fitted`, `settings` set
    if recipe_dir is not None:
        recipe = Recipe.load(recipe_dir, model)
        if fitted_settings(recipe.settings).name != fitted.name:
            raise RecipeError(
                f"Recipe '{recipe_dir}' is for method '{recipe.settings.name}', not '{settings.name}'. "
                f"Evaluate '{recipe.settings.name}' with it, or drop --recipe to calibrate '{settings.name}'."
            )
        return replace(recipe, settings=settings)
    ids = calibration_windows(tokenizer, data, windows, seqlen, model=model, progress=progress)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in fitted.name)
    folder = cache_root() / "recipes" / f"{safe}-{cache_key(model, settings, ids)[:16]}"
    if folder.is_dir() and not recalibrate:
        try:
            recipe = Recipe.load(folder, model)
            _log(progress, f"using the cached recipe {folder}")
            return replace(recipe, settings=settings)
        except RecipeError as exc:
            _log(progress, f"cached recipe {folder} unusable ({exc}); recalibrating")
    _announce(model, ids, settings, progress)
    recipe = calibrate_windows(model, ids, settings, data, progress)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    recipe.save(tmp)
    replace_directory(tmp, folder)
    _log(progress, f"cached the recipe in {folder}")
    return recipe
