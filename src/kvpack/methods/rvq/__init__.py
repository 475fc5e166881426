"""The residual-VQ family: names and options (config.py), codebook learning (train.py)."""
from __future__ import annotations

import torch

from kvpack.codecs import Codec, RVQCodec
from kvpack.methods.family import Family, Fitted, LayerActivations
from kvpack.methods.rvq.config import OPTIONS_HELP, PRESETS, RVQOptions, rvq_option, rvq_settings
from kvpack.methods.rvq.train import fit_rvq_recipe
from kvpack.methods.settings import MethodSettings
from kvpack.methods.synthetic import synthetic_kv


class RVQFamily(Family):
    name = "rvq"
    presets = PRESETS
    options_help = OPTIONS_HELP
    calibrated = True

    def matches(self, preset: str) -> bool:
        return preset.startswith("rvq-")

    def settings(self, preset: str) -> MethodSettings:
        return rvq_settings(preset)

    def option(self, settings: MethodSettings, option: str) -> MethodSettings | None:
        return rvq_option(settings, option)

    def fit(self, model, activations: list[LayerActivations], settings: MethodSettings, progress: bool = True) -> Fitted:
        return fit_rvq_recipe(model, activations, settings, progress=progress)

    def synthetic_codecs(self, settings: MethodSettings, heads: int, head_dim: int) -> tuple[Codec, Codec]:
        options: RVQOptions = settings.options
        books = torch.randn(options.depth, options.codes, settings.key_group, generator=torch.Generator().manual_seed(0))
        bounds = {}
        if options.outliers > 0:
            x = synthetic_kv(heads, 2048, head_dim, seed=3)[0]
            q = options.outliers / 2
            bounds = dict(lower=torch.quantile(x, q, dim=1), upper=torch.quantile(x, 1 - q, dim=1))
        return (RVQCodec(books, head_dim, options.key_grouping, **bounds),
                RVQCodec(books, head_dim, options.value_grouping, **bounds))


FAMILY = RVQFamily()
__all__ = ["FAMILY", "RVQOptions"]
