"""Quantizers for keys and values, one per file behind the `Codec` interface."""
from .base import Codec, Encoded
from .codebook import CodebookCodec, NormalFloatCodec, normal_float_levels
from .fp16 import Fp16Codec
from .uniform import UniformCodec

__all__ = ["Codec", "Encoded", "CodebookCodec", "NormalFloatCodec", "normal_float_levels", "Fp16Codec", "UniformCodec"]
