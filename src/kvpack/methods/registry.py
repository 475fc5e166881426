"""The registered method families, looked up by preset name or family name."""
from __future__ import annotations

from kvpack.errors import MethodError
from kvpack.methods.family import Family

_FAMILIES: list[Family] = []


def register(family: Family) -> Family:
    """Make `family` known to `parse_method` and calibration (later registrations match first)."""
    _FAMILIES.insert(0, family)
    return family


def families() -> list[Family]:
    """Every registered family, in matching order."""
    return list(_FAMILIES)


def family_of(preset: str) -> Family:
    """The family whose names include `preset`; MethodError listing the known names otherwise."""
    for family in _FAMILIES:
        if family.matches(preset):
            return family
    known = "; ".join(f"{f.name}: {', '.join(f.presets)}" for f in reversed(_FAMILIES))
    raise MethodError(
        f"Unknown method '{preset}'. Known presets ({known}); options follow after ':' (e.g. int4:pre-rope:key-channel)."
    )


def family_named(name: str) -> Family:
    """The registered family called `name`."""
    for family in _FAMILIES:
        if name in (family.kinds or (family.name,)):
            return family
    raise MethodError(f"No method family '{name}' is registered (known: {', '.join(f.name for f in _FAMILIES)}).")
