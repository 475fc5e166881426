"""The method-family contract: one object per family, registered in `kvpack.methods` with one line.

A family owns its names (which presets it matches, its typed options), how its codecs are built
(directly for baselines, fitted from calibration activations for calibrated families), and the
synthetic codecs `kvpack plan` measures storage with. See ADDING.md beside this file.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kvpack.codecs import Codec
from kvpack.errors import MethodError
from kvpack.methods.settings import MethodSettings


@dataclass
class LayerActivations:
    """Calibration rows of one layer: each row is one token of one KV head."""

    keys: torch.Tensor  # [rows, head_dim] float32, pre-RoPE unless the method is post-RoPE
    values: torch.Tensor  # [rows, head_dim] float32
    heads: torch.Tensor  # [rows] int64, the KV head of each row
    key_fisher: torch.Tensor | None = None  # [rows, head_dim] float32, squared gradients
    value_fisher: torch.Tensor | None = None


Fitted = tuple[list[Codec], list[Codec], dict]  # per-layer key codecs, value codecs, calibration info


class Family(ABC):
    """A method family (see module docstring)."""

    name: str
    kinds: tuple[str, ...] = ()  # values of MethodSettings.family this family parses to (default: its name)
    presets: tuple[str, ...] = ()
    options_help: str = ""
    calibrated: bool = False

    @abstractmethod
    def matches(self, preset: str) -> bool:
        """True if `preset` (a name before any ':') belongs to this family."""

    @abstractmethod
    def settings(self, preset: str) -> MethodSettings:
        """The settings of a preset name; MethodError naming the fix if it is malformed."""

    def option(self, settings: MethodSettings, option: str) -> MethodSettings | None:
        """`settings` changed by one of this family's own `:options`; None if `option` is not one."""
        return None

    def codecs(self, settings: MethodSettings) -> tuple[Codec, Codec]:
        """(key codec, value codec) shared by every layer, for families that need no calibration."""
        raise MethodError(f"Method '{settings.name}' needs calibration; run `kvpack calibrate` or pass --calib-data.")

    def needs_fisher(self, settings: MethodSettings) -> bool:
        """Whether fitting needs Fisher information (squared gradients) beside the activations."""
        return False

    def fit(self, model, activations: list[LayerActivations], settings: MethodSettings, progress: bool = True) -> Fitted:
        """Per-layer codecs fitted to calibration activations (calibrated families)."""
        raise MethodError(f"'{settings.name}' needs no calibration.")

    def synthetic_codecs(self, settings: MethodSettings, heads: int, head_dim: int) -> tuple[Codec, Codec]:
        """Codecs of this method's storage layout for heads x head_dim vectors, with synthetic parameters
        (what `kvpack plan` measures bytes with; stored bytes do not depend on calibrated values)."""
        return self.codecs(settings)
