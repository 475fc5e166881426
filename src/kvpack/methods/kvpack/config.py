"""Names of the `kvpack-<N>bit` presets: the configuration results/kvpack-ablation.json selected.

A kvpack preset is a KVQuant configuration with the switches the ablation kept, each measured
one at a time on WikiText-2 with recipes calibrated on C4 only (see docs/results.md):
- `fisher-s2`: k-means weights F * scale^2 (the paper's Eq. 7; the reference code uses F);
- `alloc-global`: every channel of every layer's K and V gets its own width and codebook, chosen
  by Fisher-weighted error (loss units) under one budget for the whole model: the codes of 2048
  tokens at N bits per element, each channel's fp16 codebook paid from it (`budget2048`); every
  width holds a multiple of 8 channels per tensor, which the CPU kernel reads 8 codes at a time;
- `qnorm`: each channel's decoded levels are shifted and scaled so that dequantized calibration
  data keep their mean and standard deviation (KVQuant's Q-Norm, there used at 2 bits only);
- 1% dense-and-sparse outliers, one fp16 sink token, keys pre-RoPE per channel, values per token.
Measured at 2048 tokens the presets store at most N + 0.5 bits per element, every overhead
counted (the table's `bits_per_element`); shorter sequences amortize the codebooks over fewer
tokens, longer ones cost `marginal_bits_per_element`. `alloc-layer` (one width per layer's K or
V) lost to the paper's single width in the ablation and is not used.
Any KVQuant option may follow (e.g. `kvpack-3bit:sink4`); N may be 2..8.

The switches were measured on the default model; calibrating a preset checks them on the model at hand: each
subset is fitted on the first three quarters of the calibration windows and scored on the rest, and only the
switches that lower the held-out loss are kept (recipes/select.py; the candidates: switches.py). The recipe
keeps the preset's name; `recipe.calibration["selection"]` names the configuration fitted. To fit every switch
unchecked, name them: `kvquant-3bit-1pct:fisher-s2:alloc-global:qnorm`.
"""
from __future__ import annotations

import re
from dataclasses import replace

from kvpack.errors import MethodError
from kvpack.methods.kvquant.config import kvquant_option, kvquant_settings
from kvpack.methods.settings import MethodSettings

PRESETS = ("kvpack-4bit", "kvpack-3bit", "kvpack-2bit")
SWITCHES = ("fisher-s2", "alloc-global", "qnorm")
OUTLIER_PCT = 1
_NAME = re.compile(r"^kvpack-(?P<bits>\d+)bit$")


def base_name(bits: int) -> str:
    """The KVQuant name a `kvpack-<bits>bit` preset is built from, switches included."""
    return ":".join([f"kvquant-{bits}bit-{OUTLIER_PCT}pct", *SWITCHES])


def is_preset(settings: MethodSettings) -> bool:
    """Whether `settings` come from a `kvpack-<N>bit[:options]` name."""
    return bool(_NAME.match(settings.name.split(":")[0]))


def kvpack_settings(preset: str) -> MethodSettings:
    """Settings of a `kvpack-<N>bit` name (family "kvquant": fitted, stored and read as KVQuant)."""
    match = _NAME.match(preset)
    if not match:
        raise MethodError(f"'{preset}' is not a kvpack preset; use kvpack-<N>bit, e.g. kvpack-3bit.")
    bits = int(match["bits"])
    if not 2 <= bits <= 8:
        raise MethodError(f"'{preset}': bit width must be in 2..8.")
    base, *switches = base_name(bits).split(":")
    settings = kvquant_settings(base)
    for switch in switches:
        settings = kvquant_option(settings, switch)
    return replace(settings, name=preset)
