"""Names and options of the `turboquant-<B>bit` family (Zandieh et al. 2025, no calibration).

Presets: turboquant-2.5bit, turboquant-3bit, turboquant-3.5bit, turboquant-4bit; any width B in
1..8 works (fractional widths: the first ceil(f * head_dim) rotated coordinates get one more bit).
Defaults: keys post-RoPE (as in the paper), values per token, no fp16 tokens, no QJL.
Options (after ':'), beside the generic pre-rope, post-rope, sink<N>, recent<N>:
  qjl | no-qjl            keys: B - 1 MSE bits plus a 1-bit QJL residual sketch (TurboQuant-prod)
  rescale | no-rescale    store norm / ||decoded unit vector|| so decoded vectors keep their norm
  seed<N>                 seed of the rotations (keys N, values N + 1) and of the sketch (default 0)
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from kvpack.errors import MethodError
from kvpack.methods.settings import FamilyOptions, MethodSettings

PRESETS = ("turboquant-2.5bit", "turboquant-3bit", "turboquant-3.5bit", "turboquant-4bit")
OPTIONS_HELP = "qjl, no-qjl, rescale, no-rescale, seed<N>"
_NAME = re.compile(r"^turboquant-(?P<bits>\d+(?:\.\d+)?)bit$")


@dataclass(frozen=True)
class TurboQuantOptions(FamilyOptions):
    """TurboQuant's own settings: code bits per coordinate (fractional allowed) and the switches above."""

    bits: float = 3.0
    qjl: bool = False
    rescale: bool = False
    seed: int = 0


_SWITCHES = {"qjl": ("qjl", True), "no-qjl": ("qjl", False), "rescale": ("rescale", True), "no-rescale": ("rescale", False)}


def turboquant_settings(preset: str) -> MethodSettings:
    """Settings of a `turboquant-<B>bit` name."""
    match = _NAME.match(preset)
    if not match:
        raise MethodError(f"'{preset}' is not a TurboQuant method name; use turboquant-<B>bit, e.g. turboquant-3.5bit.")
    bits = float(match["bits"])
    if not 1 <= bits <= 8:
        raise MethodError(f"'{preset}': bit width must be in 1..8.")
    return MethodSettings(name=preset, family="turboquant", bits=math.floor(bits), options=TurboQuantOptions(bits=bits))


def turboquant_option(settings: MethodSettings, option: str) -> MethodSettings | None:
    """Apply a TurboQuant-only `:option`; None when `option` is not one of them."""
    if option in _SWITCHES:
        field, value = _SWITCHES[option]
        changed = replace(settings.options, **{field: value})
    else:
        match = re.fullmatch(r"seed(\d+)", option)
        if not match:
            return None
        changed = replace(settings.options, seed=int(match[1]))
    if changed.qjl and changed.bits < 2:
        raise MethodError(f"'{settings.name}:{option}': QJL keys need at least 2 bits (1 MSE bit + the 1-bit sketch).")
    return replace(settings, options=changed)
