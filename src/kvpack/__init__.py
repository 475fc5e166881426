"""kvpack: compress the key/value cache of transformer language models."""
from kvpack.data import load_corpus, load_windows
from kvpack.errors import KVPackError
from kvpack.hf.models import DEFAULT_MODEL, load_model
from kvpack.recipes.recipe import Recipe
from kvpack.recipes.calibrate import calibrate
from kvpack.recipes.resolve import recipe_for
from kvpack.cache.cache import CompressedCache
from kvpack.finetune.train import apply_finetuned
from kvpack.generation import GenerationResult, generate
from kvpack.hf.attention import cache_kwargs

__version__ = "0.1.0"
__all__ = ["CompressedCache", "apply_finetuned", "calibrate", "recipe_for", "load_model", "load_corpus", "load_windows", "Recipe", "KVPackError", "DEFAULT_MODEL", "generate", "GenerationResult", "cache_kwargs"]
