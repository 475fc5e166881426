"""Quantizers for keys and values, one per file behind the `Codec` interface."""
from kvpack.codecs.base import CODEC_TYPES, Codec, Encoded, StorageLayout, codec_from_state, register_codec
from kvpack.codecs.codebook import CodebookCodec, NormalFloatCodec, normal_float_levels
from kvpack.codecs.fp16 import Fp16Codec
from kvpack.codecs.nuq import NuqCodec
from kvpack.codecs.rvq import RVQCodec
from kvpack.codecs.turboquant import TurboQuantCodec
from kvpack.codecs.uniform import UniformCodec

__all__ = ["StorageLayout", "CODEC_TYPES", "codec_from_state", "register_codec", "Codec", "Encoded", "CodebookCodec", "NormalFloatCodec", "normal_float_levels", "Fp16Codec", "NuqCodec", "RVQCodec", "UniformCodec"]
