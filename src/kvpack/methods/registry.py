"""Method families: which settings a preset name means and how its per-layer codecs are built.

Baseline families (fp16, int, nf, kivi) need no calibration. Calibrated families (KVQuant,
residual VQ) register here too, with a builder that takes their fitted state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kvpack.codecs import Codec, Fp16Codec, NormalFloatCodec, UniformCodec
from kvpack.errors import MethodError
from kvpack.methods.names import MethodSettings, base_settings


@dataclass(frozen=True)
class Family:
    """A method family: `matches(preset)`, `settings(preset)`, and whether it must be calibrated."""

    name: str
    matches: Callable[[str], bool]
    settings: Callable[[str], MethodSettings]
    calibrated: bool
    option: Callable[[MethodSettings, str], MethodSettings | None] | None = None  # family-only `:options`


_FAMILIES: list[Family] = []


def register_family(family: Family) -> None:
    _FAMILIES.insert(0, family)


def family_of(preset: str) -> Family | None:
    for family in _FAMILIES:
        if family.matches(preset):
            return family
    return None


def family_option(settings: MethodSettings, option: str) -> MethodSettings | None:
    """`settings` changed by a `:option` only `settings.family` knows; None if it knows none."""
    for family in _FAMILIES:
        if family.name == settings.family and family.option is not None:
            return family.option(settings, option)
    return None


def family_settings(preset: str) -> MethodSettings:
    family = family_of(preset)
    return family.settings(preset) if family else base_settings(preset)


def needs_calibration(settings: MethodSettings) -> bool:
    family = family_of(settings.name.split(":")[0])
    return bool(family and family.calibrated)


def baseline_codecs(settings: MethodSettings) -> tuple[Codec, Codec]:
    """(key codec, value codec) of an uncalibrated baseline, shared by all layers."""
    if settings.family == "fp16":
        return Fp16Codec(), Fp16Codec()
    if settings.family in ("int", "kivi"):
        make = lambda axis, group: UniformCodec(settings.bits, axis, group)  # noqa: E731
    elif settings.family == "nf":
        make = lambda axis, group: NormalFloatCodec(settings.bits, axis, group)  # noqa: E731
    else:
        raise MethodError(f"Method '{settings.name}' needs calibration; run `kvpack calibrate` or pass --calib-data.")
    try:
        return make(settings.key_axis, settings.key_group), make(settings.value_axis, settings.value_group)
    except ValueError as exc:
        raise MethodError(f"Method '{settings.name}': {exc}") from exc


from kvpack.methods.rvq import config as _rvq_family  # noqa: E402,F401  (registers rvq-dD-cC-gG)
from kvpack.methods.kvquant import config as _kvquant_family  # noqa: E402,F401  (registers kvquant-Nbit[-Ppct])
