"""The switches a kvpack preset adds to the faithful KVQuant configuration, and the candidates built from them.

A preset `kvpack-<N>bit[:options]` is `kvquant-<N>bit-1pct[:options]` with the switches of config.py turned on.
A switch is on when the preset's settings differ from the faithful configuration in the field it sets; an option
that turns it off again (e.g. `kvpack-3bit:alloc-none`) leaves one switch fewer. The candidates are every subset
of the switches that are on, each named by the preset plus the options that turn the others off, so that every
candidate's name re-parses to its settings (`kvpack-3bit:fisher:alloc-none` is the preset without `fisher-s2`
and `alloc-global`). The 1% outlier budget is the faithful configuration's own, not a switch: changing it changes
the bits stored. `recipes.select` scores the candidates on held-out calibration windows.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import combinations

from kvpack.codecs.nuq import NuqCodec
from kvpack.methods.kvpack.config import OUTLIER_PCT, SWITCHES, is_preset
from kvpack.methods.kvquant.config import kvquant_settings
from kvpack.methods.settings import MethodSettings

__all__ = ["Candidate", "active_switches", "candidate", "candidates", "faithful_settings", "fit_key", "is_preset",
           "without_qnorm"]
FIELDS = {"fisher-s2": "weighting", "alloc-global": "alloc", "qnorm": "qnorm"}  # switch -> KVQuantOptions field


@dataclass(frozen=True)
class Candidate:
    """One configuration a preset may be fitted as: the switches it keeps and its settings (named canonically)."""

    switches: tuple[str, ...]
    settings: MethodSettings

    @property
    def label(self) -> str:
        return "faithful" if not self.switches else "+" + " +".join(self.switches)


def faithful_settings(settings: MethodSettings) -> MethodSettings:
    """`settings` with every switch set as `kvquant-<N>bit-1pct` sets it (the other options kept)."""
    reference = kvquant_settings(f"kvquant-{settings.bits}bit-{OUTLIER_PCT}pct").options
    options = replace(settings.options, **{field: getattr(reference, field) for field in FIELDS.values()})
    return replace(settings, options=options)


def active_switches(settings: MethodSettings) -> tuple[str, ...]:
    """The switches of SWITCHES that `settings` turn on (differ from the faithful configuration)."""
    faithful = faithful_settings(settings).options
    return tuple(s for s in SWITCHES if getattr(settings.options, FIELDS[s]) != getattr(faithful, FIELDS[s]))


def _off_option(field: str, value) -> str:
    """The KVQuant option that sets `field` to `value`."""
    if field == "qnorm":
        return "qnorm" if value else "no-qnorm"
    return f"alloc-{value}" if field == "alloc" else str(value)


def candidate(settings: MethodSettings, keep: tuple[str, ...]) -> Candidate:
    """The candidate of preset `settings` that keeps the switches `keep` and turns its other switches off."""
    faithful = faithful_settings(settings).options
    dropped = [s for s in active_switches(settings) if s not in keep]
    options = replace(settings.options, **{FIELDS[s]: getattr(faithful, FIELDS[s]) for s in dropped})
    name = ":".join([settings.name, *(_off_option(FIELDS[s], getattr(faithful, FIELDS[s])) for s in dropped)])
    return Candidate(tuple(keep), replace(settings, name=name, options=options))


def candidates(settings: MethodSettings) -> list[Candidate]:
    """Every subset of the preset's active switches, the faithful configuration first, the full preset last."""
    active = active_switches(settings)
    return [candidate(settings, keep) for size in range(len(active) + 1) for keep in combinations(active, size)]


def fit_key(cand: Candidate) -> tuple[str, ...]:
    """Candidates with the same key share one fit: Q-Norm only rescales the decoded levels of a fitted codec,
    so the candidate without it is the one with it, its Q-Norm dropped (`without_qnorm`)."""
    return tuple(s for s in cand.switches if s != "qnorm")


def without_qnorm(codec: NuqCodec) -> NuqCodec:
    """`codec` with its Q-Norm dropped (the same levels, ranges, widths and outlier rule)."""
    config, tensors = codec.state()
    tensors.pop("qnorm", None)
    return NuqCodec.from_state(config, tensors)
