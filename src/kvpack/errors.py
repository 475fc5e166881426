"""Exceptions kvpack raises; every message names the problem and the fix."""


class KVPackError(Exception):
    """Base class of kvpack's user-facing errors."""


class ModelLoadError(KVPackError):
    """The model could not be loaded or is not supported."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model has no rotary embedding or its attention cannot be intercepted."""


class DataError(KVPackError):
    """A corpus could not be found or read."""


class MethodError(KVPackError):
    """A method name or option is invalid."""


class RecipeError(KVPackError):
    """A recipe file is missing, damaged, or made for another model."""


class NonFiniteError(KVPackError):
    """NaN or inf met where finite keys/values are required."""


class ActivationRangeError(NonFiniteError):
    """Keys or values beyond what kvpack's 16-bit storage holds."""


class CacheFileError(KVPackError):
    """A saved compressed cache is missing, damaged, or made for another model or recipe."""
