"""The kvpack presets: named KVQuant configurations with the switches beyond the paper that
measurement kept (config.py). Fitting, storage and kernels are the KVQuant family's."""
from __future__ import annotations

from kvpack.methods.family import Family
from kvpack.methods.kvpack.config import PRESETS, base_name, kvpack_settings
from kvpack.methods.settings import MethodSettings


class KvpackFamily(Family):
    name = "kvpack"
    kinds = ("kvpack",)  # settings it parses to carry family "kvquant"
    presets = PRESETS
    calibrated = True

    def matches(self, preset: str) -> bool:
        return preset.startswith("kvpack-")

    def settings(self, preset: str) -> MethodSettings:
        return kvpack_settings(preset)


FAMILY = KvpackFamily()
__all__ = ["FAMILY", "base_name"]
