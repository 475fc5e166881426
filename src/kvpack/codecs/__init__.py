"""Quantizers for keys and values, one per file behind the `Codec` interface."""
from .base import CODEC_TYPES, Codec, Encoded, codec_from_state, register_codec
from .codebook import CodebookCodec, NormalFloatCodec, normal_float_levels
from .fp16 import Fp16Codec
from .nuq import NuqCodec
from .rvq import RVQCodec
from .uniform import UniformCodec

__all__ = ["CODEC_TYPES", "codec_from_state", "register_codec", "Codec", "Encoded", "CodebookCodec", "NormalFloatCodec", "normal_float_levels", "Fp16Codec", "NuqCodec", "RVQCodec", "UniformCodec"]
