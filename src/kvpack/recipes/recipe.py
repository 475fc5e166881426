"""A recipe: a method's settings plus its per-layer codecs (fitted for calibrated methods)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvpack.codecs import Codec
from kvpack.methods import MethodSettings, family_named, needs_calibration, parse_method
from kvpack.errors import MethodError
from kvpack.recipes.io import load_recipe, save_recipe


@dataclass
class Recipe:
    """How to store the K/V cache of one model: settings and one codec per layer for K and for V."""

    settings: MethodSettings
    key_codecs: list[Codec]
    value_codecs: list[Codec]
    model_identity: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.settings.name

    @property
    def num_layers(self) -> int:
        return len(self.key_codecs)

    @classmethod
    def baseline(cls, method: str | MethodSettings, num_layers: int) -> "Recipe":
        """A recipe for an uncalibrated method (fp16, intN, nfN, kivi-N and their options)."""
        settings = parse_method(method) if isinstance(method, str) else method
        if needs_calibration(settings):
            raise MethodError(f"Method '{settings.name}' needs calibration: use kvpack.calibrate(...) or `kvpack calibrate`.")
        key, value = family_named(settings.family).codecs(settings)
        return cls(settings, [key] * num_layers, [value] * num_layers)

    def save(self, directory: str | Path) -> Path:
        """Write this recipe to `directory` (safetensors + JSON, see recipes/io.py)."""
        return save_recipe(self, directory)

    @classmethod
    def load(cls, directory: str | Path, model=None) -> "Recipe":
        """Load a saved recipe; with `model`, check it was calibrated for that model (RecipeError if not)."""
        return cls(*load_recipe(directory, model))
