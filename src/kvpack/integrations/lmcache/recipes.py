"""The recipes a serde stores chunks with: resolved from a method name and/or a recipe folder."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from kvpack.errors import KVPackError
from kvpack.methods import parse_method
from kvpack.recipes.recipe import Recipe
from kvpack.integrations.lmcache.errors import SerdeConfigError


@dataclass
class StorePath:
    """One way of storing chunks: a recipe, and whether its keys are stored pre-RoPE."""

    name: str  # "primary" | "fallback"
    recipe: Recipe
    fingerprint: str  # sha256 of the method and every codec's state
    shared: bool  # one codec pair for every layer (uncalibrated methods)

    @property
    def method(self) -> str:
        return self.recipe.method

    @property
    def pre_rope(self) -> bool:
        return bool(self.recipe.settings.pre_rope)

    @property
    def sink_tokens(self) -> int:
        return int(self.recipe.settings.sink_tokens or 0)

    @property
    def outlier_frac(self) -> float:
        settings = self.recipe.settings
        for holder in (getattr(settings, "options", None), getattr(settings, "extra", None)):
            value = holder.get("outlier_frac") if isinstance(holder, dict) else getattr(holder, "outlier_frac", None)
            if value is not None:
                return float(value)
        return 0.0

    def codecs(self, layer: int):
        """(key codec, value codec) of model layer `layer`."""
        index = 0 if self.shared else layer
        if index >= self.recipe.num_layers:
            raise SerdeConfigError(f"{self.method}: the recipe has {self.recipe.num_layers} layers, layer {layer} asked")
        return self.recipe.key_codecs[index], self.recipe.value_codecs[index]

    def model_fact(self, key: str) -> int | None:
        value = (self.recipe.model_identity or {}).get(key)
        return int(value) if value else None


def fingerprint(recipe: Recipe, layers: int) -> str:
    """sha256 over the method name and each layer's codec type, config and tensors."""
    digest = hashlib.sha256(recipe.method.encode())
    for i in range(layers):
        for codec in (recipe.key_codecs[i], recipe.value_codecs[i]):
            config, tensors = codec.state()
            digest.update(type(codec).__name__.encode())
            digest.update(json.dumps(config, sort_keys=True, default=str).encode())
            for name in sorted(tensors):
                t = tensors[name].detach().to("cpu").contiguous()
                digest.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_path(name: str, method: str | None, recipe_dir: str | None) -> StorePath:
    """The recipe of `method` (uncalibrated) or of the folder `recipe_dir` (checked against `method`)."""
    try:
        if recipe_dir:
            recipe = Recipe.load(recipe_dir)
            if method and parse_method(method).name != recipe.method:
                raise SerdeConfigError(
                    f"{name} recipe '{recipe_dir}' holds method '{recipe.method}', the serde config says '{method}'. "
                    "Point it at the recipe calibrated for that method."
                )
            return StorePath(name, recipe, fingerprint(recipe, recipe.num_layers), shared=False)
        recipe = Recipe.baseline(method, 1)
    except SerdeConfigError:
        raise
    except KVPackError as exc:
        raise SerdeConfigError(
            f"{name} method '{method}': {exc} For the LMCache serde pass \"recipe\": the folder written by "
            "`kvpack calibrate --out DIR` (or recipe.save(DIR))."
        ) from exc
    return StorePath(name, recipe, fingerprint(recipe, 1), shared=True)
