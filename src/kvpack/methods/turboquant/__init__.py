"""The TurboQuant family: per head vector an fp16 norm, a seeded random rotation and Lloyd-Max codes
for the rotated coordinates' known law; no calibration. Names and options: config.py; the codec:
codecs/turboquant.py. Keys and values get separate seeds; one rotation serves every layer.
"""
from __future__ import annotations

from kvpack.codecs import Codec
from kvpack.codecs.turboquant import TurboQuantCodec
from kvpack.errors import MethodError
from kvpack.methods.family import Family
from kvpack.methods.settings import MethodSettings
from kvpack.methods.turboquant.config import (OPTIONS_HELP, PRESETS, TurboQuantOptions, turboquant_option,
                                               turboquant_settings)


def _codecs(settings: MethodSettings, head_dim: int | None) -> tuple[Codec, Codec]:
    if settings.key_axis != "token" or settings.value_axis != "token" or settings.key_group or settings.value_group:
        raise MethodError(f"Method '{settings.name}': TurboQuant codes whole head vectors; drop key-channel and g<N>.")
    o: TurboQuantOptions = settings.options
    keys = TurboQuantCodec(o.bits, head_dim, seed=o.seed, qjl=o.qjl, rescale=o.rescale)
    values = TurboQuantCodec(o.bits, head_dim, seed=o.seed + 1, rescale=o.rescale)
    return keys, values


class TurboQuantFamily(Family):
    name = "turboquant"
    presets = PRESETS
    options_help = OPTIONS_HELP

    def matches(self, preset: str) -> bool:
        return preset.startswith("turboquant-")

    def settings(self, preset: str) -> MethodSettings:
        return turboquant_settings(preset)

    def option(self, settings: MethodSettings, option: str) -> MethodSettings | None:
        return turboquant_option(settings, option)

    def codecs(self, settings: MethodSettings) -> tuple[Codec, Codec]:
        """Codecs that build their rotation, codebooks and sketch from the seed for the head_dim they meet."""
        return _codecs(settings, None)

    def synthetic_codecs(self, settings: MethodSettings, heads: int, head_dim: int) -> tuple[Codec, Codec]:
        return _codecs(settings, head_dim)


FAMILY = TurboQuantFamily()
__all__ = ["FAMILY", "TurboQuantOptions"]
