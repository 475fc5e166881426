"""Turn a method name into a ready recipe for a model: baselines directly; calibrated methods from
a saved recipe folder, a recipe shipped with kvpack (same model, method and calibration request),
the disk cache, or calibrated on the fly (and cached on disk)."""
from __future__ import annotations

import sys
from pathlib import Path

from kvpack.errors import MethodError
from kvpack.methods import MethodSettings, needs_calibration, parse_method
from kvpack.hf.models import num_layers, text_config
from kvpack.recipes.bundled import shipped_recipe
from kvpack.recipes.recipe import Recipe
from kvpack.recipes.io import head_dim_of
from kvpack.recipes.calibrate import cached_calibration


def check_settings_fit_model(settings: MethodSettings, model) -> None:
    """Channel groups must tile the model's head_dim; say so before any forward pass."""

    dim = head_dim_of(text_config(model.config))
    for part, axis, group in (("key", settings.key_axis, settings.key_group), ("value", settings.value_axis, settings.value_group)):
        if axis == "token" and group and dim % group:
            divisors = [g for g in (8, 16, 32, 64, 128) if dim % g == 0 and g <= dim]
            raise MethodError(
                f"'{settings.name}': {part} channel groups of {group} do not divide this model's head_dim {dim}. "
                f"Use a group size that divides {dim} (e.g. {', '.join(map(str, divisors)) or dim})."
            )


def resolve_recipe(
    model,
    tokenizer,
    method: str | MethodSettings,
    *,
    calib_data: str = "c4[:500]",
    calib_windows: int = 16,
    calib_seqlen: int = 2048,
    recipe_dir: str | Path | None = None,
    progress: bool = True,
    recalibrate: bool = False,
) -> Recipe:
    """The recipe for `method` on `model`: uncalibrated, loaded from `recipe_dir`, shipped with kvpack,
    cached, or calibrated on `calib_data` ("self": text the model writes). `recalibrate` skips the
    shipped and cached recipes and calibrates afresh."""
    settings = parse_method(method) if isinstance(method, str) else method
    check_settings_fit_model(settings, model)
    if not needs_calibration(settings):
        return Recipe.baseline(settings, num_layers(model))
    if recipe_dir is None and not recalibrate:
        shipped = shipped_recipe(model, settings, calib_data, calib_windows, calib_seqlen)
        if shipped is not None:
            if progress:
                print(f"using the {settings.name} recipe shipped with kvpack (calibrated on {calib_windows} x "
                      f"{calib_seqlen} tokens of {calib_data}; --recalibrate to redo it)", file=sys.stderr, flush=True)
            return shipped
    return cached_calibration(
        model, tokenizer, settings, data=calib_data, windows=calib_windows, seqlen=calib_seqlen,
        recipe_dir=recipe_dir, progress=progress, recalibrate=recalibrate,
    )


def recipe_for(model, tokenizer, method: str | MethodSettings, data: str = "c4[:500]", windows: int = 16,
               seqlen: int = 2048, progress: bool = True) -> Recipe:
    """The ready recipe for `method` on `model`, the one obvious call: none needed (baselines), the recipe shipped
    with kvpack for these weights (in any dtype), the one cached on disk, or calibrated now on `windows` x
    `seqlen` tokens of `data` and cached. `kvpack.calibrate` always calibrates afresh."""
    return resolve_recipe(model, tokenizer, method, calib_data=data, calib_windows=windows, calib_seqlen=seqlen,
                          progress=progress)
