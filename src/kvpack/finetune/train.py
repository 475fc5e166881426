"""Light fine-tuning with the residual-VQ quantizer in the forward pass (Kumar 2024, section 3).

Every attention layer's pre-RoPE keys and values go through the recipe's RVQ codecs during the
forward pass (`STEQuantizer`, a KVTransform): the forward value is the quantized one, the
gradient passes straight through to the unquantized projection outputs, a commitment loss
(weight 0.25) pulls the projections towards their codewords, and the codebooks keep learning by
EMA from the vectors they quantize. Only a LoRA adapter on the attention projections trains.

Why LoRA and not full weights: a few hundred steps on ~200K calibration tokens can easily overfit
135M weights and shift the model away from its baseline; a rank-8 adapter on q/k/v/o (under 1M
parameters, ~4 MB) limits that, keeps the base model untouched on disk, saves next to the recipe,
and merges into the weights at load time (`apply_finetuned`), so evaluation costs nothing extra.

Output folder: the recipe with the fine-tuned codebooks (`recipe.json`, `codecs.safetensors`)
plus `adapter.safetensors` / `adapter.json` (LoRA matrices, settings, training log).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvpack.codecs.rvq import RVQCodec, residual_decode, residual_encode, to_groups
from kvpack.errors import MethodError
from kvpack.hf.attention import intercept_kv
from kvpack.finetune.lora import DEFAULT_TARGETS, add_lora, apply_adapter, remove_lora, save_adapter
from kvpack.recipes.recipe import Recipe
from kvpack.methods.rvq.train import EMACodebooks
from kvpack.codecs.checks import check_finite
from kvpack.recipes.simulate import Simulator, fp16_split
from kvpack.data import load_windows
from kvpack.hf.models import load_model


@dataclass
class FinetuneConfig:
    steps: int = 200
    seqlen: int = 256
    batch_size: int = 1
    lr: float = 2e-4
    commitment: float = 0.25
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    data: str = "c4[:500]"  # calibration text only
    val_windows: int = 4  # windows of `data` held out of training to report the quantized loss
    ema: bool = True
    decay: float = 0.99
    eps: float = 1e-5
    seed: int = 0
    log_every: int = 10


class STEQuantizer:
    """KVTransform quantizing keys/values with a recipe's RVQ codecs, straight-through gradients.

    After each forward, `losses` holds one commitment loss per quantized tensor: the mean squared
    distance, in the normalized group space, between the projections and their (detached) codes.
    With `ema`, each codebook is updated from the vectors it just quantized (no dead-code restarts:
    a batch is far too small to tell dead codes from rare ones).
    """

    pre_rope = True

    def __init__(self, recipe: Recipe, ema: bool = True, decay: float = 0.99, eps: float = 1e-5):
        for codec in [*recipe.key_codecs, *recipe.value_codecs]:
            if not isinstance(codec, RVQCodec):
                raise MethodError(f"fine-tuning with the quantizer needs an rvq-* recipe; '{recipe.method}' has {type(codec).__name__}.")
        self.recipe = recipe
        self.ema, self.decay, self.eps = ema, decay, eps
        self.states: dict[tuple[int, str], EMACodebooks] = {}
        self.losses: list[torch.Tensor] = []

    def _ema_update(self, key: tuple[int, str], codec: RVQCodec, flat: torch.Tensor, codes: torch.Tensor) -> None:
        state = self.states.get(key)
        if state is None:
            counts = torch.full((codec.depth, codec.size), flat.shape[0] / codec.size)
            state = self.states[key] = EMACodebooks.start(codec.codebooks, counts, decay=self.decay, eps=self.eps, dead_fraction=0.0)
        residual = flat.clone()
        for s in range(codec.depth):
            state.update(s, residual, codes[:, s])
            residual -= codec.codebooks[s, codes[:, s]]
        codec.set_codebooks(state.codebooks())

    def _quantize(self, x: torch.Tensor, codec: RVQCodec, key: tuple[int, str]) -> torch.Tensor:
        dense, mask = codec.split_outliers(x)  # differentiable clamp
        with torch.no_grad():
            groups, scale = codec.normalize(dense.detach())
            flat = groups.reshape(-1, codec.group)
            codes = residual_encode(flat, codec.codebooks)
            q = residual_decode(codes, codec.codebooks).view_as(groups)
            x_hat = codec.denormalize(q, scale)
            if mask is not None:
                x_hat = torch.where(mask, x.detach().half().float(), x_hat)
        if self.ema and x.requires_grad:
            with torch.no_grad():
                self._ema_update(key, codec, flat, codes)
        if x.requires_grad:
            z = to_groups(dense / scale.float(), codec.perm, codec.group)
            self.losses.append(F.mse_loss(z, q))
        return x + (x_hat.to(x.dtype) - x).detach()

    def _process(self, x: torch.Tensor, codec: RVQCodec, key: tuple[int, str]) -> torch.Tensor:
        check_finite(x, f"layer {key[0]} {key[1]}")
        s = self.recipe.settings
        start, stop = fp16_split(x.shape[-2], s.sink_tokens, s.recent_tokens, 1)
        if stop == start:
            return x
        middle = self._quantize(x[..., start:stop, :], codec, key)
        return torch.cat([x[..., :start, :], middle, x[..., stop:, :]], dim=-2)

    def __call__(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self._process(key, self.recipe.key_codecs[layer_idx], (layer_idx, "keys")),
                self._process(value, self.recipe.value_codecs[layer_idx], (layer_idx, "values")))


@dataclass
class FinetuneResult:
    recipe: Recipe  # with the fine-tuned codebooks
    log: list[dict] = field(default_factory=list)
    val_nll_before: float | None = None
    val_nll_after: float | None = None
    seconds: float = 0.0


@torch.no_grad()
def quantized_nll(model, recipe: Recipe, windows: torch.Tensor) -> float:
    """Mean next-token NLL of windows [n, seqlen] with K/V through the recipe's codecs (simulated cache)."""
    total, count = 0.0, 0
    with intercept_kv(model, Simulator(recipe)):
        for window in windows:
            ids = window.unsqueeze(0).to(model.device)
            logits = model(ids).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids.shape[1] - 1
    return total / max(count, 1)


def finetune_lora(model, windows: torch.Tensor, recipe: Recipe, config: FinetuneConfig, progress: bool = True) -> tuple[dict, list[dict]]:
    """Train a LoRA adapter on `model` (in place, left wrapped) with `recipe`'s quantizer in the loop.

    windows [n, seqlen]: training token windows. Returns ({module path: LoRALinear}, per-step log).
    The recipe's codebooks are EMA-updated in place when `config.ema`.
    """
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    wrapped = add_lora(model, config.targets, config.rank, config.alpha)
    params = [p for lora in wrapped.values() for p in (lora.lora_a, lora.lora_b)]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    quantizer = STEQuantizer(recipe, ema=config.ema, decay=config.decay, eps=config.eps)
    order = torch.randperm(windows.shape[0], generator=generator)
    log: list[dict] = []
    bar = tqdm(range(config.steps), desc="fine-tuning", unit="step", disable=not progress)
    start = time.perf_counter()
    with intercept_kv(model, quantizer), torch.enable_grad():
        for step in bar:
            pick = order[(step * config.batch_size + torch.arange(config.batch_size)) % windows.shape[0]]
            ids = windows[pick].to(model.device)
            quantizer.losses.clear()
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            commit = torch.stack(quantizer.losses).mean() if quantizer.losses else ce.new_zeros(())
            loss = ce + config.commitment * commit
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            log.append({"step": step + 1, "ce": ce.item(), "commitment": commit.item(), "loss": loss.item(),
                        "seconds": time.perf_counter() - start})
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                recent = log[-config.log_every:]
                bar.set_postfix(ce=f"{sum(r['ce'] for r in recent) / len(recent):.3f}",
                                commit=f"{sum(r['commitment'] for r in recent) / len(recent):.4f}")
    return wrapped, log


def finetune(model, tokenizer, recipe: Recipe, config: FinetuneConfig | None = None, progress: bool = True) -> tuple[dict, FinetuneResult]:
    """Fine-tune `model` with `recipe`'s quantizer on `config.data`; the adapter stays wrapped in `model`.

    Reports the quantized NLL of `config.val_windows` held-out calibration windows before and after.
    Returns ({module path: LoRALinear}, FinetuneResult).
    """

    config = config or FinetuneConfig()
    start = time.perf_counter()
    windows = load_windows(tokenizer, config.data, config.seqlen)
    n_val = min(config.val_windows, windows.shape[0] // 2)
    train, val = windows[: windows.shape[0] - n_val], windows[windows.shape[0] - n_val:]
    result = FinetuneResult(recipe=recipe)
    if n_val:
        result.val_nll_before = quantized_nll(model, recipe, val)
    wrapped, result.log = finetune_lora(model, train, recipe, config, progress)
    if n_val:
        result.val_nll_after = quantized_nll(model, recipe, val)
    result.seconds = time.perf_counter() - start
    return wrapped, result


def save_finetuned(wrapped: dict, result: FinetuneResult, config: FinetuneConfig, directory: str | Path) -> Path:
    """Write the fine-tuned recipe and the LoRA adapter to `directory`."""
    recipe = result.recipe
    recipe.calibration = {**recipe.calibration, "finetune": {
        "config": asdict(config), "val_nll_before": result.val_nll_before, "val_nll_after": result.val_nll_after,
        "seconds": result.seconds}}
    recipe.save(directory)
    description = {
        "rank": config.rank, "alpha": config.alpha, "targets": list(config.targets), "method": recipe.method,
        "model": recipe.model_identity, "config": asdict(config), "val_nll_before": result.val_nll_before,
        "val_nll_after": result.val_nll_after, "seconds": result.seconds, "log": result.log,
    }
    return save_adapter(wrapped, directory, description)


def apply_finetuned(model, directory: str | Path) -> Recipe:
    """Merge the adapter fine-tuned in `directory` into `model` (in place) and return its recipe.

    This is what `kvpack eval --finetuned DIR` needs: the tuned weights plus the tuned codebooks.
    """
    apply_adapter(model, directory)
    return Recipe.load(directory, model)


def run_finetune(model_spec: str, recipe_dir: str | Path, out: str | Path, config: FinetuneConfig, progress: bool = True) -> FinetuneResult:
    """The `kvpack finetune` command: load, fine-tune, save the recipe and adapter to `out`."""

    model, tokenizer = load_model(model_spec)
    recipe = Recipe.load(recipe_dir, model)
    wrapped, result = finetune(model, tokenizer, recipe, config, progress)
    save_finetuned(wrapped, result, config, out)
    remove_lora(model, merge=False)
    return result


def ppl(nll: float | None) -> float | None:
    return None if nll is None else math.exp(nll)
