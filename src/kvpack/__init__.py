"""kvpack: compress the key/value cache of transformer language models."""
from .data import load_corpus, load_windows
from .errors import KVPackError
from .models import DEFAULT_MODEL, load_model
from .recipe import Recipe
from .calibrate import calibrate
from .cache import CompressedCache
from .finetune import apply_finetuned

__version__ = "0.1.0"
__all__ = ["CompressedCache", "apply_finetuned", "calibrate", "load_model", "load_corpus", "load_windows", "Recipe", "KVPackError", "DEFAULT_MODEL"]
