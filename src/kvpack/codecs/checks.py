"""Checks on keys and values before they are stored: finite, and within what 16-bit storage holds.

Sink and recent tokens, scales, zero-points and sparse outliers are stored in fp16, whatever the
model's dtype; a bf16 model's activations above fp16's largest value (65504) would silently become
inf there, so they are refused with the layer named instead.

Where the error is raised:
- CPU tensors, and CUDA prefill chunks (more than one token, outside CUDA-graph capture): at once, in
  `check_storable` (on CUDA one device-to-host read per tensor: the peak |x| holds NaN and inf too).
- CUDA decode steps (one token), and anything during CUDA-graph capture: asynchronously. The peak |x| of
  each tensor is folded into a device buffer (`PendingChecks`, one slot per name, NaN-propagating max),
  with no host sync, so a step can be captured in a CUDA graph; the buffer is read at safe points: the
  start of the next prefill (`check_storable` does it), and `raise_pending()` (call it where a sync is
  fine: a memory report, the end of a generation). The error is the same, naming the first tensor at fault.
"""
from __future__ import annotations

import torch

from kvpack.errors import ActivationRangeError, NonFiniteError

FP16_MAX = float(torch.finfo(torch.float16).max)


def _nonfinite_error(what: str) -> NonFiniteError:
    return NonFiniteError(
        f"{what} contains NaN or inf; quantizing it would silently corrupt the cache. Check the model's dtype "
        "(float16 overflow: load with dtype=torch.float32 or bfloat16) and its input."
    )


def _range_error(what: str, peak: float) -> ActivationRangeError:
    return ActivationRangeError(
        f"{what} reach {peak:.4g}, beyond the fp16 range (65504) in which kvpack stores sink and recent tokens, "
        "scales and outliers; they would become inf. This model's activations need float32 or bf16 caching: "
        "use transformers' DynamicCache for it, or a method that keeps these layers uncompressed."
    )


def raise_for_peak(peak: float, what: str) -> None:
    """The error for a tensor whose peak |x| is `peak` (NaN or inf: non-finite; > 65504: out of range), if any."""
    if peak != peak or peak == float("inf"):
        raise _nonfinite_error(what)
    if peak > FP16_MAX:
        raise _range_error(what, peak)


def _peak(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a 0-dim float32 tensor on x's device; NaN if x holds a NaN, inf if it holds an inf."""
    return x.detach().abs().amax().float()


def check_finite(x: torch.Tensor, what: str) -> None:
    """NonFiniteError naming `what` if x holds NaN or inf."""
    if not torch.isfinite(x).all():
        raise _nonfinite_error(what)


class PendingChecks:
    """Peaks |x| of checked tensors kept on one device until read: peaks fp32 [capacity], one slot per name.

    `record` costs a reduction and an elementwise max on the device, never a host sync (CUDA-graph safe once
    every name has its slot); `raise_pending` reads every slot once (one sync, skipped when nothing was recorded
    since the last read), clears them and raises the error of the first name at fault."""

    def __init__(self, device: torch.device | str, capacity: int = 64):
        self.device = torch.device(device)
        self.peaks = torch.zeros(capacity, dtype=torch.float32, device=self.device)
        self.names: list[str] = []
        self._slot: dict[str, int] = {}
        self.dirty = False

    def record(self, x: torch.Tensor, what: str) -> None:
        """Fold max |x| into the slot of `what` (no host sync)."""
        if x.numel() == 0:
            return
        slot = self._slot.get(what)
        if slot is None:
            slot = self._slot[what] = len(self.names)
            self.names.append(what)
            if slot >= self.peaks.numel():  # first sightings only: grow the buffer
                grown = torch.zeros(2 * self.peaks.numel(), dtype=torch.float32, device=self.device)
                grown[: self.peaks.numel()] = self.peaks
                self.peaks = grown
        cell = self.peaks[slot:slot + 1]
        torch.maximum(cell, _peak(x).reshape(1), out=cell)  # NaN propagates
        self.dirty = True

    def raise_pending(self) -> None:
        """Raise the error of the first recorded tensor that was non-finite or beyond fp16 (then clear all)."""
        if not self.dirty:
            return
        peaks = self.peaks[: len(self.names)].tolist()  # the one device-to-host read
        self.peaks.zero_()
        self.dirty = False
        for name, peak in zip(self.names, peaks):
            raise_for_peak(peak, name + " (in a step checked asynchronously, since the last check)")


_PENDING: dict[torch.device, PendingChecks] = {}


def pending_checks(device: torch.device | str) -> PendingChecks:
    """The process-wide PendingChecks of `device`."""
    device = torch.device(device)
    if device not in _PENDING:
        _PENDING[device] = PendingChecks(device)
    return _PENDING[device]


def raise_pending(device: torch.device | str | None = None) -> None:
    """Read the checks recorded asynchronously on `device` (default: every device) and raise the first error."""
    for dev, pending in list(_PENDING.items()):
        if device is None or dev == torch.device(device):
            pending.raise_pending()


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def check_storable(x: torch.Tensor, what: str, defer: bool | None = None) -> None:
    """NonFiniteError / ActivationRangeError naming `what` if x holds NaN or inf or |x| exceeds fp16's range (65504).

    defer None: at once on the CPU and for CUDA prefill chunks; CUDA decode steps (x [..., 1, D]) and CUDA-graph
    capture record into `pending_checks(x.device)` instead (see the module docstring). defer True/False forces
    either way (tests run the deferred path on CPU tensors)."""
    if defer is None:
        defer = _capturing(x) or (x.is_cuda and x.dim() >= 2 and x.shape[-2] == 1)
    if defer:
        pending_checks(x.device).record(x, what)
        return
    if x.device in _PENDING:  # a safe point: what decode steps recorded surfaces first
        _PENDING[x.device].raise_pending()
    if x.numel():
        raise_for_peak(float(_peak(x)), what)
