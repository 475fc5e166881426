"""A minimal LoRA adapter for fine-tuning with the KV quantizer in the loop (no extra dependency).

`add_lora(model, targets, rank, alpha)` wraps the named nn.Linear layers as W x + (alpha/rank) B A x
with A [rank, in] random and B [out, rank] zero, so the wrapped model starts identical to the base.
`save_adapter` writes A and B (safetensors) plus a JSON description; `apply_adapter` merges a saved
adapter into a plain model's weights (W += (alpha/rank) B A), so evaluation runs at full speed with
nothing wrapped.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from kvpack.errors import RecipeError
from safetensors.torch import save_file
from safetensors.torch import load_file

ADAPTER_TENSORS = "adapter.safetensors"
ADAPTER_JSON = "adapter.json"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nn.Module):
    """base(x) + scaling * x A^T B^T; only A [rank, in] and B [out, rank] train."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, dtype=base.weight.dtype) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scaling

    def delta(self) -> torch.Tensor:
        """The weight change [out, in] this adapter adds."""
        return (self.lora_b @ self.lora_a) * self.scaling


def add_lora(model: nn.Module, targets: tuple[str, ...] = DEFAULT_TARGETS, rank: int = 8, alpha: float = 16.0) -> dict[str, LoRALinear]:
    """Wrap every nn.Linear whose attribute name is in `targets`; returns {module path: LoRALinear}."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    wrapped: dict[str, LoRALinear] = {}
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank, alpha)
                setattr(module, name, lora)
                wrapped[f"{path}.{name}" if path else name] = lora
    if not wrapped:
        raise ValueError(f"no nn.Linear layers named {targets} in {type(model).__name__}")
    return wrapped


def remove_lora(model: nn.Module, merge: bool = True) -> None:
    """Replace every LoRALinear by its base layer, merging the adapter into the weight if `merge`."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                if merge:
                    with torch.no_grad():
                        child.base.weight += child.delta().to(child.base.weight.dtype)
                setattr(module, name, child.base)


def save_adapter(wrapped: dict[str, LoRALinear], directory: str | Path, description: dict) -> Path:
    """Write the adapter's A/B matrices and `description` (rank, alpha, targets, training log) to `directory`."""

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, lora in wrapped.items():
        tensors[f"{path}.lora_a"] = lora.lora_a.detach().float().contiguous()
        tensors[f"{path}.lora_b"] = lora.lora_b.detach().float().contiguous()
    save_file(tensors, str(directory / ADAPTER_TENSORS), metadata={"format": "kvpack-lora"})
    (directory / ADAPTER_JSON).write_text(json.dumps(description, indent=1, default=str) + "\n")
    return directory


def apply_adapter(model: nn.Module, directory: str | Path) -> dict:
    """Merge the LoRA adapter saved in `directory` into `model`'s weights in place; returns its description."""

    directory = Path(directory)
    path_json, path_tensors = directory / ADAPTER_JSON, directory / ADAPTER_TENSORS
    if not path_json.is_file() or not path_tensors.is_file():
        raise RecipeError(f"'{directory}' holds no fine-tuned adapter ({ADAPTER_JSON} + {ADAPTER_TENSORS}); "
                          "write one with `kvpack finetune --out DIR`.")
    description = json.loads(path_json.read_text())
    scaling = float(description["alpha"]) / int(description["rank"])
    tensors = load_file(str(path_tensors))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key in [k for k in tensors if k.endswith(".lora_a")]:
            path = key[: -len(".lora_a")]
            layer = modules.get(path)
            a, b = tensors[key], tensors[f"{path}.lora_b"]
            if not isinstance(layer, nn.Linear) or layer.weight.shape != (b.shape[0], a.shape[1]):
                raise RecipeError(f"adapter in '{directory}' does not fit this model at '{path}'; it was trained for "
                                  f"{description.get('model', {}).get('architecture', 'another model')}.")
            layer.weight += (b @ a * scaling).to(layer.weight.dtype)
    return description
