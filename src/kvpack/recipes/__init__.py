"""Recipes: a method's settings and per-layer codecs, their checked file format, and calibration."""
from kvpack.recipes.recipe import Recipe
from kvpack.recipes.calibrate import calibrate
from kvpack.recipes.resolve import resolve_recipe

__all__ = ["Recipe", "calibrate", "resolve_recipe"]
