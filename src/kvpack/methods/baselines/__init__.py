"""Baselines that need no calibration: fp16, int-N, NormalFloat-N, KIVI-N.

`int4` is per-token min-max on post-RoPE keys and values; `nfN` the NormalFloat levels; `kivi-N`
per-channel keys in groups of 32 tokens and per-token values in groups of 32 channels, the most
recent 128 tokens in fp16, keys post-RoPE as in the KIVI paper.
"""
from __future__ import annotations

import re

from kvpack.codecs import Codec, Fp16Codec, NormalFloatCodec, UniformCodec
from kvpack.errors import MethodError
from kvpack.methods.family import Family
from kvpack.methods.settings import MethodSettings

_NAME = re.compile(r"^(?P<kind>fp16|int|nf|kivi-)(?P<bits>\d*)$")


def _bits(kind: str, text: str) -> int:
    if not text:
        raise MethodError(f"Method family '{kind}' needs a bit width, e.g. '{kind}4'.")
    bits = int(text)
    low, high = (2, 4) if kind == "kivi-" else (2, 8)
    if not low <= bits <= high:
        raise MethodError(f"'{kind}{bits}': bit width must be in {low}..{high}.")
    return bits


class BaselineFamily(Family):
    name = "baseline"
    kinds = ("fp16", "int", "nf", "kivi")
    presets = ("fp16", "int8", "int4", "int3", "int2", "nf4", "nf3", "nf2", "kivi-4", "kivi-2")

    def matches(self, preset: str) -> bool:
        return bool(_NAME.match(preset))

    def settings(self, preset: str) -> MethodSettings:
        match = _NAME.match(preset)
        if not match:
            raise MethodError(f"'{preset}' is not a baseline name (fp16, intN, nfN, kivi-N).")
        kind = match["kind"]
        if kind == "fp16":
            if match["bits"]:
                raise MethodError(f"'{preset}': fp16 takes no bit width.")
            return MethodSettings(name=preset, family="fp16")
        bits = _bits(kind, match["bits"])
        if kind == "kivi-":
            return MethodSettings(name=preset, family="kivi", bits=bits, key_axis="channel", value_axis="token",
                                  key_group=32, value_group=32, recent_tokens=128)
        return MethodSettings(name=preset, family=kind, bits=bits)

    def codecs(self, settings: MethodSettings) -> tuple[Codec, Codec]:
        if settings.family == "fp16":
            return Fp16Codec(), Fp16Codec()
        kind = NormalFloatCodec if settings.family == "nf" else UniformCodec
        try:
            return (kind(settings.bits, settings.key_axis, settings.key_group),
                    kind(settings.bits, settings.value_axis, settings.value_group))
        except ValueError as exc:
            raise MethodError(f"Method '{settings.name}': {exc}") from exc


FAMILY = BaselineFamily()
