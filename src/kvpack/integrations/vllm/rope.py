"""RoPE tables for pre-RoPE pages: vLLM hands the backend post-RoPE keys; a pre-RoPE recipe rotates them back by
their positions before encoding and forward again after decoding (`kvpack.hf.rope`'s exact inverse).

cos/sin come from the transformers rotary module of the model's architecture (what the recipe was calibrated
with), computed once per engine for every position up to `max_model_len`, and are the values the model's layers
rotate with: computed in float32, then rounded to the model's dtype (vLLM casts its cos_sin_cache to the query's
dtype, transformers its cos/sin to the activations'), so the write path undoes exactly the rotation vLLM applied and
the read path rotates keys as the query was rotated (float32 angles would leave a bf16 model's keys off by up to a
bf16 step of their pair channel).
"""
from __future__ import annotations

import importlib

import torch

from kvpack.hf.rope import LENGTH_DEPENDENT_ROPE, apply_rope, invert_rope, rope_type
from kvpack.integrations.vllm.config import DTYPES, NEOX_MODEL_TYPES, KvpackVllmError


class RopeTable:
    """cos/sin [max_len, rot_dim] (float32 holding values of the model's dtype) of a model; rotates x [T, H, D] at
    positions [T]. `dtype`: the model's, which cos/sin are rounded to; `exact`: the float32 cos/sin before rounding
    (what angle addition composes, kernel.split_tables), None when `dtype` is float32."""

    dtype: torch.dtype = torch.float32
    exact: tuple[torch.Tensor, torch.Tensor] | None = None

    def __init__(self, hf_config, max_len: int, dtype: torch.dtype = torch.float32):
        kind = rope_type(hf_config)
        model_type = getattr(hf_config, "model_type", "?")
        if dtype not in DTYPES:
            raise KvpackVllmError(f"Pre-RoPE pages take float32, bfloat16 or float16 models, not {dtype}.")
        if kind in LENGTH_DEPENDENT_ROPE:
            raise KvpackVllmError(f"'{kind}' RoPE changes its frequencies with the sequence length, which pre-RoPE pages "
                                  "cannot reproduce; use a post-RoPE recipe (method option ':post-rope').")
        if model_type not in NEOX_MODEL_TYPES:
            raise KvpackVllmError(f"Pre-RoPE pages are checked for {', '.join(NEOX_MODEL_TYPES)} (rotate_half RoPE in "
                                  f"vLLM); '{model_type}' is not among them. Use a post-RoPE recipe (':post-rope').")
        try:
            module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
            cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
            rotary = cls(config=hf_config)
        except (ImportError, StopIteration, TypeError, ValueError) as exc:
            raise KvpackVllmError(f"Could not build the RoPE of '{model_type}' from transformers ({exc}); use a "
                                  "post-RoPE recipe (':post-rope').") from exc
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(max_len).unsqueeze(0))
        cos, sin = cos[0].float(), sin[0].float()  # [max_len, rot_dim]
        self.dtype = dtype
        if dtype != torch.float32:
            self.exact = (cos, sin)
            cos, sin = cos.to(dtype).float(), sin.to(dtype).float()
        self.cos, self.sin = cos, sin

    def _at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = positions.long()
        return self.cos[p].unsqueeze(0), self.sin[p].unsqueeze(0)  # [1, T, rot]

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys of pre-RoPE x [T, H, D] (float32) at `positions` [T]."""
        cos, sin = self._at(positions)
        return apply_rope(x.transpose(0, 1).unsqueeze(0), cos, sin)[0].transpose(0, 1)

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE keys of post-RoPE x [T, H, D] at `positions` [T] (float32)."""
        cos, sin = self._at(positions)
        return invert_rope(x.float().transpose(0, 1).unsqueeze(0), cos, sin)[0].transpose(0, 1)
