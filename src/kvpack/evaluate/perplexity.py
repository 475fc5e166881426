"""Perplexity over windows (GPTQ/KVQuant protocol): mean next-token NLL over all windows, exp."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvpack.hf.intercept import intercept_kv
from kvpack.recipes.recipe import Recipe
from kvpack.recipes.simulate import Simulator


@dataclass
class PerplexityResult:
    method: str
    ppl: float
    nll: float
    tokens: int
    windows: int
    bits_per_element: float
    seconds: float


def window_nll(model, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL and token count of one window ids [1, seqlen]."""
    logits = model(ids).logits[:, :-1].float()
    targets = ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return float(nll), targets.numel()


@torch.no_grad()
def simulated_perplexity(model, windows: torch.Tensor, recipe: Recipe, progress: bool = True,
                         simulator: Simulator | None = None) -> PerplexityResult:
    """Perplexity of `windows` [n, seqlen] with keys/values quantize-dequantized by `recipe`
    (through `simulator`, a Simulator of `recipe` or a subclass, when given)."""
    simulator = simulator or Simulator(recipe)
    total_nll, total_tokens = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(windows, desc=recipe.method, unit="window", disable=not progress, leave=False)
    with intercept_kv(model, simulator):
        for window in bar:
            nll, n = window_nll(model, window.unsqueeze(0).to(model.device))
            total_nll += nll
            total_tokens += n
            bar.set_postfix(ppl=f"{math.exp(total_nll / total_tokens):.3f}")
    mean = total_nll / total_tokens
    return PerplexityResult(
        method=recipe.method,
        ppl=math.exp(mean),
        nll=mean,
        tokens=total_tokens,
        windows=len(windows),
        bits_per_element=simulator.count.per_element,
        seconds=time.perf_counter() - start,
    )
