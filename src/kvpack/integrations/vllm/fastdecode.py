"""Compiled slot decoding for the CPU read path (numba, which vLLM's CPU build already requires).

`decode_codes` turns the code bitstreams of T slots into float32 values, codebook lookup and range included,
one token per parallel iteration and no temporaries; the few per-token fp16 fields (ranges, outliers) are read
with torch around it (see `slots.SlotPart.decode`). Without numba, `slots` falls back to its torch path.
"""
from __future__ import annotations

import functools
import importlib.util

import numpy as np


@functools.cache
def _kernel():
    """The compiled decoder, built on first use. numba is imported here, not at module import: vLLM's worker
    start-up scans every loaded module for Triton kernels to rebind (triton_utils/dispatcher.py) and fails on
    llvmlite's objects, and the plug-in's modules are loaded before that scan."""
    from numba import njit, prange

    @njit(parallel=True, cache=True, fastmath=False)
    def decode(rows, code_bytes, byte, shift, mask, level_base, levels, chan_zero, chan_scale, tok_zero, tok_scale,
               pair_div, out):  # pragma: no cover - compiled
        T, n = out.shape
        per_token = tok_zero.shape[1] > 0
        for t in prange(T):
            for c in range(n):
                b = byte[c]
                word = np.int32(rows[t, b])
                if b + 1 < code_bytes:
                    word |= np.int32(rows[t, b + 1]) << 8
                code = (word >> shift[c]) & mask[c]
                u = levels[level_base[c] + code]
                if per_token:
                    p = c // pair_div
                    out[t, c] = u * tok_scale[t, p] + tok_zero[t, p]
                else:
                    out[t, c] = u * chan_scale[c] + chan_zero[c]

    return decode


def available() -> bool:
    return importlib.util.find_spec("numba") is not None


def decode_codes(rows: np.ndarray, code_bytes: int, byte: np.ndarray, shift: np.ndarray, mask: np.ndarray,
                 level_base: np.ndarray, levels: np.ndarray, chan_zero: np.ndarray, chan_scale: np.ndarray,
                 tok_zero: np.ndarray, tok_scale: np.ndarray, pair_div: int, out: np.ndarray) -> None:
    """rows uint8 [T, >= code_bytes] -> out float32 [T, n]: levels[level_base[c] + code] * scale + zero, with
    per-channel (chan_*) or per-token (tok_* [T, pairs], channel c uses pair c // pair_div) ranges."""
    _kernel()(rows, code_bytes, byte, shift, mask, level_base, levels, chan_zero, chan_scale, tok_zero, tok_scale,
              pair_div, out)
