"""Uncompressed baselines of the bench: a transformers DynamicCache holding K/V in one dtype.

`dynamic-fp32`, `dynamic-bf16`, `dynamic-fp16` are a DynamicCache whose keys/values are stored in
that dtype, decoded by the model loaded in that dtype (attention = the model's SDPA in that dtype).
They are named apart from kvpack's method `fp16`, which is a CompressedCache whose codec stores
K/V losslessly in float16 (a compressed-cache row like any other).
"""
from __future__ import annotations

import torch

from kvpack.errors import MethodError

PREFIX = "dynamic-"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT = ("dynamic-fp32", "dynamic-bf16")


def baseline_dtype(method: str) -> torch.dtype | None:
    """The storage dtype of a baseline name, None for a kvpack method."""
    if not method.startswith(PREFIX):
        return None
    short = method[len(PREFIX):]
    if short not in DTYPES:
        raise MethodError(f"unknown baseline '{method}'; use one of {', '.join(PREFIX + k for k in DTYPES)}")
    return DTYPES[short]


def split_methods(methods: list[str]) -> tuple[list[str], list[str]]:
    """(baselines, kvpack methods); the default baselines are always measured. `fp32`/`bf16` alone are
    rejected with a hint (they would read as kvpack methods); `fp16` alone is kvpack's lossless fp16 codec."""
    for m in methods:
        if m in ("fp32", "bf16"):
            raise MethodError(f"'{m}' is not a kvpack method; the uncompressed baseline is '{PREFIX}{m}'")
    baselines = list(dict.fromkeys([*DEFAULT, *(m for m in methods if baseline_dtype(m) is not None)]))
    return baselines, [m for m in dict.fromkeys(methods) if baseline_dtype(m) is None]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
