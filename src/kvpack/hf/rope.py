"""Rotary position embedding: the Hugging Face "rotate_half" convention forward and exactly inverted, the check
that a model uses it, and cos/sin for any cached position from the model's own rotary module.

`cos`/`sin` are what the model's rotary module returns ([batch, tokens, rot_dim], possibly
multiplied by an attention scaling factor for YaRN-style variants); channel c is paired with
c + rot_dim/2. Models that rotate only the first `rot_dim` channels are handled.
"""
from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

from kvpack.errors import UnsupportedArchitectureError


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # [batch, tokens, d] -> [batch, 1, tokens, d] to broadcast over heads of x [batch, heads, tokens, d]
    return t.unsqueeze(1) if t.dim() == x.dim() - 1 else t


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, heads, tokens, head_dim] by the angles in cos/sin [batch, tokens, rot_dim]."""
    cos, sin = _expand(cos, x).to(x.dtype), _expand(sin, x).to(x.dtype)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    head, tail = x[..., :rot], x[..., rot:]
    return torch.cat((head * cos + rotate_half(head) * sin, tail), dim=-1)


def invert_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo `apply_rope`: the rotation is orthogonal up to the factor cos^2 + sin^2 (1 without scaling)."""
    cos, sin = _expand(cos, x).to(x.dtype), _expand(sin, x).to(x.dtype)
    norm = cos * cos + sin * sin
    rot = cos.shape[-1]
    head = x[..., :rot]
    restored = (head * cos - rotate_half(head) * sin) / norm
    if rot == x.shape[-1]:
        return restored
    return torch.cat((restored, x[..., rot:]), dim=-1)


def check_rope_convention(module: nn.Module) -> None:
    """Raise UnsupportedArchitectureError unless `module`'s model rotates keys in the rotate_half
    convention (channel c paired with c + d/2), the only one pre-RoPE keys are recovered in exactly.
    Interleaved (Cohere, GLM, ...) or half-width cos/sin (GPT-OSS) variants would silently hand the
    codec wrong "pre-RoPE" keys."""
    rotate = getattr(sys.modules[type(module).__module__], "rotate_half", None)
    probe = torch.arange(1.0, 9.0)
    if rotate is None or not torch.equal(rotate(probe), rotate_half(probe)):
        raise UnsupportedArchitectureError(
            f"{type(module).__name__} does not use the rotate_half RoPE convention (channel c paired with c + d/2), so "
            "its pre-RoPE keys cannot be recovered exactly; use a post-RoPE method (drop :pre-rope) with this model."
        )


# RoPE variants whose frequencies depend on the current sequence length: transformers rotates each new key
# with the frequencies of its step, while a pre-RoPE cache would rotate the whole history with today's.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def rope_type(config) -> str:
    """The rotary variant of a (text) config: "default", "linear", "dynamic", "yarn", "longrope", "llama3", ..."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        kinds = {v.get("rope_type", v.get("type", "default")) for v in params.values()}  # per layer type (Gemma3)
        return next((k for k in kinds if k in LENGTH_DEPENDENT_ROPE), sorted(kinds)[0])
    return (params.get("rope_type") or params.get("type") or "default") if isinstance(params, dict) else "default"


def check_pre_rope_supported(model: nn.Module, attention_layers: list[nn.Module], config) -> None:
    """UnsupportedArchitectureError unless keys can be stored pre-RoPE exactly: the rotate_half convention
    in every layer and frequencies that do not change with the sequence length."""
    kind = rope_type(config)
    if kind in LENGTH_DEPENDENT_ROPE:
        raise UnsupportedArchitectureError(
            f"This model uses '{kind}' RoPE scaling, whose frequencies change with the sequence length: transformers "
            "keeps each cached key rotated with the frequencies of its own step, which a pre-RoPE cache cannot "
            "reproduce. Use a post-RoPE method (drop ':pre-rope', or add ':post-rope')."
        )
    for layer in attention_layers:
        check_rope_convention(layer)


def _rotary_modules(model: nn.Module) -> list[nn.Module]:
    return [m for name, m in model.named_modules() if name.split(".")[-1].startswith("rotary_emb")]


def rope_tolerance(positions: torch.Tensor, cos: torch.Tensor) -> float:
    """How far two computations of one model's cos/sin [..., rot] at `positions` may differ: float32 rounds an angle
    p * f to about p * 2**-24, and torch's vectorized and scalar cos/sin (which parts of a tensor take depends on its
    shape and the threads) reduce large angles differently, so at position p they may differ by a few p * 2**-24
    (times the table's scaling); bf16/fp16 tables by their own rounding. A different RoPE differs by far more."""
    if cos.dtype != torch.float32:
        return 1e-2
    scaling = float(cos.detach().abs().max()) if cos.numel() else 1.0
    return max(scaling, 1.0) * (1e-5 + 8 * 2.0 ** -24 * float(positions.detach().abs().max()))


class RopeSource:
    """cos/sin [batch, tokens, rot_dim] for any positions, per attention layer of `model`: the model's rotary
    module (`rotary_emb`) re-run on stored positions, with the layer's type for modules that take one
    (Gemma3: local/global RoPE). `verify` compares, once per layer, the recomputed cos/sin with the ones the
    layer really used, so a model whose RoPE cannot be reproduced this way fails loudly."""

    def __init__(self, model: nn.Module, attention_layers: list[nn.Module], layer_types: list[str]):
        modules = _rotary_modules(model)
        if len(modules) != 1:
            names = [n for n, _ in model.named_modules() if n.split(".")[-1].startswith("rotary_emb")]
            raise UnsupportedArchitectureError(
                f"{type(model).__name__}: expected one rotary embedding module named 'rotary_emb', found {names or 'none'}; "
                "a pre-RoPE compressed cache cannot re-apply RoPE here. Use a post-RoPE method (drop ':pre-rope')."
            )
        self.module = modules[0]
        params = inspect.signature(self.module.forward).parameters
        self.takes_layer_type = "layer_type" in params
        self.layer_keys: list[str | None] = []
        for idx, attn in enumerate(attention_layers):
            kind = getattr(attn, "layer_type", None) or (layer_types[idx] if idx < len(layer_types) else None)
            self.layer_keys.append(kind if self.takes_layer_type else None)
        self.verified: set[int] = set()

    def key(self, layer_idx: int) -> str | None:
        """Layers with equal keys share cos/sin."""
        return self.layer_keys[layer_idx]

    @torch.no_grad()
    def compute(self, layer_idx: int, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [batch, tokens] (int) -> (cos, sin) [batch, tokens, rot_dim] in `dtype`."""
        probe = torch.empty(1, dtype=dtype, device=positions.device)
        pos = positions.long()
        if self.takes_layer_type:
            return self.module(probe, pos, self.layer_keys[layer_idx])
        return self.module(probe, pos)

    def verify(self, layer_idx: int, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor | None = None) -> None:
        """Check once per layer that `compute` reproduces the cos/sin the layer received and that rotating the
        recovered pre-RoPE keys forward gives back the keys [B, H, q, D] the layer handed over."""
        if layer_idx in self.verified:
            return
        if keys is not None:
            again = apply_rope(invert_rope(keys.float(), cos.float(), sin.float()), cos.float(), sin.float())
            err = float((again - keys.float()).abs().max()) / max(float(keys.float().abs().max()), 1e-6)
            if err > 1e-3:
                raise UnsupportedArchitectureError(
                    f"Layer {layer_idx}: rotating the recovered pre-RoPE keys forward does not give back the model's keys "
                    f"(relative error {err:.3g}); this model's RoPE is not the rotate_half variant kvpack inverts. Use a "
                    "post-RoPE method (drop ':pre-rope')."
                )
        mine_cos, mine_sin = self.compute(layer_idx, positions, cos.dtype)
        mine_cos, mine_sin = mine_cos.expand_as(cos), mine_sin.expand_as(sin)
        tol = rope_tolerance(positions, cos)
        if not (torch.allclose(mine_cos, cos, atol=tol, rtol=0) and torch.allclose(mine_sin, sin, atol=tol, rtol=0)):
            raise UnsupportedArchitectureError(
                f"Layer {layer_idx}: the model's rotary module does not reproduce the cos/sin its attention used "
                f"(max difference {float((mine_cos - cos).abs().max()):.3g}); pre-RoPE caching is not possible for this "
                "model. Use a post-RoPE method (drop ':pre-rope')."
            )
        self.verified.add(layer_idx)
