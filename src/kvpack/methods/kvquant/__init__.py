"""The KVQuant family: names and options (config.py), fitting from calibration activations (fit.py)."""
from __future__ import annotations

from dataclasses import replace

import torch

from kvpack.codecs import Codec
from kvpack.methods.family import Family, Fitted, LayerActivations
from kvpack.methods.kvquant.config import OPTIONS_HELP, PRESETS, KVQuantOptions, kvquant_option, kvquant_settings
from kvpack.methods.kvquant.fit import fit_kvquant_recipe, fit_nuq
from kvpack.methods.settings import MethodSettings
from kvpack.methods.synthetic import synthetic_kv


class KVQuantFamily(Family):
    name = "kvquant"
    presets = PRESETS
    options_help = OPTIONS_HELP
    calibrated = True

    def matches(self, preset: str) -> bool:
        return preset.startswith("kvquant-")

    def settings(self, preset: str) -> MethodSettings:
        return kvquant_settings(preset)

    def option(self, settings: MethodSettings, option: str) -> MethodSettings | None:
        return kvquant_option(settings, option)

    def needs_fisher(self, settings: MethodSettings) -> bool:
        return settings.options.weighting.startswith("fisher")

    def fit(self, model, activations: list[LayerActivations], settings: MethodSettings, progress: bool = True) -> Fitted:
        return fit_kvquant_recipe(model, activations, settings, progress=progress)

    def synthetic_codecs(self, settings: MethodSettings, heads: int, head_dim: int) -> tuple[Codec, Codec]:
        """One-width codecs of `settings.bits`; a per-channel allocation (`alloc-*`, the kvpack presets) is planned
        at that width: its codes average at most N bits (an upper bound per token), while its per-channel
        codebooks (fixed bytes, paid once per model) are not in the plan."""
        plain = replace(settings, options=replace(settings.options, weighting="plain", alloc="none"))
        keys = synthetic_kv(heads, 512, head_dim, seed=1)
        values = synthetic_kv(heads, 512, head_dim, seed=2)
        return fit_nuq(keys, None, "channel", plain), fit_nuq(values, None, "token", plain)


FAMILY = KVQuantFamily()
__all__ = ["FAMILY", "KVQuantOptions"]
