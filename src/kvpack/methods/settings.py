"""What a method name says: the settings every family shares, plus a family's own typed options.

A method is a preset name optionally followed by `:option` modifiers, e.g. `int4`,
`int4:pre-rope:key-channel`, `nf3:g32`, `kivi-2:sink1`, `kvquant-3bit-1pct:fisher-s2`.
Options every family takes: `pre-rope` / `post-rope` (where keys are quantized), `key-channel` /
`key-token` (the axis keys share statistics along), `g<N>` (group size), `sink<N>` (first N tokens
kept in fp16), `recent<N>` (last N tokens kept in fp16). A family adds its own (see its folder).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from kvpack.errors import MethodError

GENERIC_OPTIONS = "pre-rope, post-rope, key-channel, key-token, g<N>, sink<N>, recent<N>"


@dataclass(frozen=True)
class FamilyOptions:
    """Base of the options only one family knows (each family subclasses it as a frozen dataclass)."""


@dataclass(frozen=True)
class MethodSettings:
    """Everything a method name says: datatype, axes, groups, where keys are taken, fp16 tokens, family options."""

    name: str
    family: str
    bits: int = 16
    key_axis: str = "token"
    value_axis: str = "token"
    key_group: int | None = None
    value_group: int | None = None
    pre_rope: bool = False
    sink_tokens: int = 0
    recent_tokens: int = 0
    options: FamilyOptions | None = None


_SIMPLE = {
    "pre-rope": {"pre_rope": True},
    "post-rope": {"pre_rope": False},
    "key-channel": {"key_axis": "channel"},
    "key-token": {"key_axis": "token"},
}
_COUNTED = (("g", ("key_group", "value_group")), ("sink", ("sink_tokens",)), ("recent", ("recent_tokens",)))


def generic_option(settings: MethodSettings, option: str) -> MethodSettings | None:
    """`settings` changed by one of the options every family takes; None if `option` is not one."""
    if option in _SIMPLE:
        return replace(settings, **_SIMPLE[option])
    for prefix, fields in _COUNTED:
        match = re.fullmatch(prefix + r"(\d+)", option)
        if match:
            value = int(match[1])
            if prefix == "g" and value < 1:
                raise MethodError(f"group size must be >= 1 in '{option}'")
            return replace(settings, **{f: value for f in fields})
    return None


def fitted_settings(settings: MethodSettings) -> MethodSettings:
    """The settings a recipe is fitted for: `settings` without their recent window (`recent_tokens` 0, no `recent<N>`
    in the name). The window is a serving choice: calibration fits codebooks and checks switches with every token
    past the sink quantized, so one recipe serves every window (`kvpack-3bit:recent64` reads kvpack-3bit's)."""
    name = ":".join(part for part in settings.name.split(":") if not re.fullmatch(r"recent\d+", part))
    return replace(settings, recent_tokens=0, name=name)


def percentage(text: str, where: str) -> float:
    """An outlier percentage in [0, 50) as a fraction; MethodError naming `where` otherwise."""
    pct = float(text)
    if not 0 <= pct < 50:
        raise MethodError(f"outlier percentage must be in [0, 50), got '{where}'.")
    return pct / 100
