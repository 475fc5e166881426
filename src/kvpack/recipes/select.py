"""The held-out check of a kvpack preset's switches, run when the preset is calibrated.

A preset `kvpack-<N>bit` is the faithful `kvquant-<N>bit-1pct` plus switches (`fisher-s2`, `alloc-global`,
`qnorm`; see methods/kvpack/switches.py) that measurement on the default model kept. On another model a switch
may hurt, so calibration checks them on the model at hand:
1. split: the last quarter of the calibration windows (at least one: `heldout_count`) is held out, the rest fit;
   the activations and Fisher information collected once for all windows are cut, nothing is collected twice;
2. fit every candidate (the faithful configuration and each subset of the switches) on the fit windows;
   candidates that differ only by Q-Norm share one fit (Q-Norm rescales the levels of a fitted codec);
3. score each by its held-out loss: the mean KL divergence (nats per predicted token) from the unquantized model's
   next-token distribution to the model's with keys and values quantize-dequantized by the candidate, as
   `kvpack eval` simulates them, over the held-out windows; the mean next-token cross-entropy (the log of the
   perplexity) is recorded beside it. KL rather than cross-entropy decides: a perturbation that moves the
   log-probabilities by about d changes the KL by about d^2 everywhere, while the cross-entropy of the tokens that
   happen to follow moves by about d either way, so on a few held-out windows its differences between
   candidates are mostly that sampling noise (on a tiny random model: the same cross-entropy to 1e-3 nats for
   candidates whose KL differs twofold);
4. keep the candidate with the lowest held-out KL, ties going to fewer switches: a switch stays only where it
   lowers the held-out loss, and the preset is never worse there than the faithful configuration;
5. the caller fits the kept configuration on all windows.
With one calibration window there is nothing to hold out: the check is skipped, the preset's switches are kept as
named, and the recipe's `calibration["selection"]["skipped"]` says so (calibrate on 2 or more windows to check).
The recipe keeps the preset's name and settings; `calibration["selection"]` names the configuration fitted
(`method`, a name that re-parses to its settings), every candidate's losses and the switches kept and dropped.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvpack.hf.attention import intercept_kv
from kvpack.methods import LayerActivations, MethodSettings, family_named
from kvpack.methods.kvpack.switches import Candidate, candidates, fit_key, without_qnorm
from kvpack.recipes.recipe import Recipe
from kvpack.recipes.simulate import Simulator

SELECTION_VERSION = 1  # part of a preset's recipe cache key: bump when the check decides differently
LOSS = "kl"  # what decides: the held-out mean KL from the unquantized model (nats per predicted token)
_ROWS = 256  # positions compared at a time in the KL: bounds the [rows, vocab] temporaries


def heldout_count(windows: int) -> int:
    """Windows held out of `windows` calibration windows: a quarter, at least one; 0 when only one window."""
    return 0 if windows < 2 else max(1, windows // 4)


def split_activations(activations: list[LayerActivations], windows: int, fit: int) -> list[LayerActivations]:
    """The rows of the first `fit` of `windows` windows (rows are collected window by window, the same count each)."""
    out = []
    for layer in activations:
        if layer.keys.shape[0] % windows:
            raise ValueError(f"{layer.keys.shape[0]} calibration rows do not split into {windows} windows")
        n = layer.keys.shape[0] // windows * fit
        out.append(LayerActivations(keys=layer.keys[:n], values=layer.values[:n], heads=layer.heads[:n],
                                    key_fisher=_head(layer.key_fisher, n), value_fisher=_head(layer.value_fisher, n)))
    return out


def _head(rows: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if rows is None else rows[:n]


@dataclass
class Scored:
    """A candidate with its held-out losses and the seconds its fit and its scoring took."""

    candidate: Candidate
    nll: float = 0.0
    kl: float = 0.0
    fit_s: float = 0.0
    loss_s: float = 0.0

    def row(self) -> dict:
        return {"switches": list(self.candidate.switches), "method": self.candidate.settings.name,
                "nll": self.nll, "kl": self.kl, "fit_s": round(self.fit_s, 3), "loss_s": round(self.loss_s, 3)}


def fit_all(model, activations: list[LayerActivations], settings: MethodSettings,
            progress: bool = False) -> list[tuple[Scored, Recipe]]:
    """Every candidate of preset `settings` fitted on `activations` (one fit per `fit_key`)."""
    family = family_named(settings.family)
    fitted: dict[tuple[str, ...], tuple[Candidate, list, list]] = {}
    out = []
    # Q-Norm's candidates first, so that their twins without it reuse their fit
    for cand in sorted(candidates(settings), key=lambda c: "qnorm" not in c.switches):
        start = time.perf_counter()
        twin = fitted.get(fit_key(cand))
        if twin is not None and "qnorm" in twin[0].switches and "qnorm" not in cand.switches:
            keys, values = [without_qnorm(c) for c in twin[1]], [without_qnorm(c) for c in twin[2]]
        else:
            keys, values, _ = family.fit(model, activations, cand.settings, progress=False)
            fitted[fit_key(cand)] = (cand, keys, values)
            _log(progress, f"  fitted {cand.label} in {time.perf_counter() - start:.1f} s")
        out.append((Scored(cand, fit_s=time.perf_counter() - start), Recipe(cand.settings, keys, values)))
    order = {c.settings.name: i for i, c in enumerate(candidates(settings))}
    return sorted(out, key=lambda pair: order[pair[0].candidate.settings.name])


def _kl_sum(ref_logprobs: torch.Tensor, logits: torch.Tensor) -> float:
    """Summed KL(ref || softmax(logits)) over the rows of logits [n, vocab]."""
    total = 0.0
    for start in range(0, logits.shape[0], _ROWS):
        ref = ref_logprobs[start:start + _ROWS].double()
        logq = torch.log_softmax(logits[start:start + _ROWS].double(), dim=-1)
        total += float((ref.exp() * (ref - logq)).sum(-1).clamp_min(0.0).sum())
    return total


@torch.no_grad()
def score(model, windows: torch.Tensor, fitted: list[tuple[Scored, Recipe]]) -> None:
    """Fill every candidate's mean held-out NLL and KL over `windows` [n, seqlen], window by window (the
    unquantized reference of a window computed once for all candidates)."""
    tokens = 0
    for window in windows:
        ids = window.unsqueeze(0).to(model.device)
        ref = torch.log_softmax(model(ids, use_cache=False).logits[0, :-1].float(), dim=-1)
        tokens += ids.shape[1] - 1
        for scored, recipe in fitted:
            start = time.perf_counter()
            with intercept_kv(model, Simulator(recipe)):
                logits = model(ids, use_cache=False).logits[0, :-1].float()
            scored.nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            scored.kl += _kl_sum(ref, logits)
            scored.loss_s += time.perf_counter() - start
        del ref
    for scored, _ in fitted:
        scored.nll, scored.kl = scored.nll / tokens, scored.kl / tokens


def choose(scored: list[Scored]) -> Scored:
    """The candidate with the lowest held-out KL; ties to fewer switches, then to the earlier candidate."""
    return min(scored, key=lambda s: (s.kl, len(s.candidate.switches)))


def _log(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def skipped(settings: MethodSettings, windows: int) -> dict:
    """The selection record of a preset calibrated on too few windows to hold one out."""
    return {"version": SELECTION_VERSION, "method": settings.name, "kept": list(candidates(settings)[-1].switches),
            "skipped": f"{windows} calibration window: nothing to hold out, so the switches were not checked and "
                       "are kept as the preset names them; calibrate on 2 or more windows to check them"}


def select_switches(model, ids: torch.Tensor, activations: list[LayerActivations], settings: MethodSettings,
                    progress: bool = True) -> tuple[MethodSettings, dict]:
    """(settings to fit on all windows, selection record) for preset `settings` calibrated on windows ids [n, seqlen]
    with `activations` collected from all of them (see the module docstring)."""
    windows = int(ids.shape[0])
    held = heldout_count(windows)
    if held == 0:
        record = skipped(settings, windows)
        _log(progress, f"{settings.name}: {record['skipped']}")
        return settings, record
    start = time.perf_counter()
    fit = windows - held
    _log(progress, f"checking the switches of {settings.name}: fitting {len(candidates(settings))} candidates on "
         f"{fit} windows, scoring them on {held} held-out window{'s' if held > 1 else ''}")
    fitted = fit_all(model, split_activations(activations, windows, fit), settings, progress)
    score(model, ids[fit:], fitted)
    rows = [s for s, _ in fitted]
    best = choose(rows)
    faithful = rows[0]
    for s in rows:
        _log(progress, f"  {s.candidate.label:<38} held-out kl {s.kl:.6f}  nll {s.nll:.5f} (ppl {math.exp(s.nll):.4f})"
             + ("  <- kept" if s is best else ""))
    dropped = [x for x in candidates(settings)[-1].switches if x not in best.candidate.switches]
    _log(progress, f"{settings.name} fits as {best.candidate.settings.name}: keeps {', '.join(best.candidate.switches) or 'no switch'}"
         + (f", drops {', '.join(dropped)}" if dropped else "")
         + f" (held-out kl {best.kl:.6f}, faithful {faithful.kl:.6f})")
    record = {
        "version": SELECTION_VERSION, "loss": LOSS,
        "rule": "lowest held-out kl (mean KL from the unquantized model, nats per predicted token), ties to fewer "
                "switches; the kept configuration is then fitted on all windows",
        "fit_windows": list(range(fit)), "heldout_windows": list(range(fit, windows)),
        "heldout_tokens": held * (int(ids.shape[1]) - 1),
        "candidates": [s.row() for s in rows], "kept": list(best.candidate.switches), "dropped": dropped,
        "method": best.candidate.settings.name, "seconds": round(time.perf_counter() - start, 3),
    }
    return best.candidate.settings, record
