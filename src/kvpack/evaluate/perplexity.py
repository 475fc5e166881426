"""Perplexity over windows (GPTQ/KVQuant protocol): mean next-token NLL over all windows, exp.

Besides perplexity, `kl` and `top1` compare the quantized model's next-token distribution with
the unquantized model's on the same window, teacher-forced, averaged over every predicted token:
kl = mean KL(p_ref || p_quant) in nats and top1 = share of positions whose argmax agrees. The
reference log-probabilities [seqlen - 1, vocab] are computed per window (one extra forward
without interception) and dropped when the window is done. Bits: `bits_per_element` counts
everything stored for one window (the codecs' shared state amortized over it), `fixed_bytes` that
shared state (codebooks, rotations, ranges: paid once per model) and `marginal_bits_per_element`
the rest, what each further cached element costs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvpack.hf.attention import intercept_kv
from kvpack.recipes.recipe import Recipe
from kvpack.recipes.simulate import Simulator

_ROWS = 256  # positions compared at a time: bounds the [rows, vocab] temporaries


@dataclass
class PerplexityResult:
    method: str
    ppl: float
    nll: float
    tokens: int
    windows: int
    bits_per_element: float
    seconds: float
    kl: float | None = None  # mean KL(fp reference || quantized) per predicted token, nats
    top1: float | None = None  # share of predicted tokens whose argmax matches the reference's
    fixed_bytes: int | None = None  # bytes shared by every sequence of the model (codebooks, rotations, ranges)
    marginal_bits_per_element: float | None = None  # bits_per_element without the fixed bytes


def window_nll(model, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL and token count of one window ids [1, seqlen]."""
    logits = model(ids).logits[:, :-1].float()
    targets = ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return float(nll), targets.numel()


@torch.no_grad()
def reference_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [seqlen - 1, vocab] (float32) of the model as it is, for ids [1, seqlen]."""
    logits = model(ids, use_cache=False).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


@dataclass
class Divergence:
    """Summed KL (nats) and top-1 agreements over `tokens` predicted positions."""

    kl: float = 0.0
    agree: int = 0
    tokens: int = 0

    def add(self, ref_logprobs: torch.Tensor, logits: torch.Tensor) -> None:
        """Compare ref_logprobs [n, vocab] with the logits [n, vocab] of the same n positions."""
        if ref_logprobs.shape != logits.shape:
            raise ValueError(f"reference {tuple(ref_logprobs.shape)} and logits {tuple(logits.shape)} differ in shape")
        for start in range(0, logits.shape[0], _ROWS):
            ref = ref_logprobs[start:start + _ROWS].double()
            logq = torch.log_softmax(logits[start:start + _ROWS].double(), dim=-1)
            # each row's KL is >= 0; float64 and a clamp keep rounding from making a near-zero one negative
            self.kl += float((ref.exp() * (ref - logq)).sum(-1).clamp_min_(0.0).sum())
            self.agree += int((ref.argmax(-1) == logq.argmax(-1)).sum())
        self.tokens += logits.shape[0]

    @property
    def mean_kl(self) -> float:
        return self.kl / max(self.tokens, 1)

    @property
    def top1(self) -> float:
        return self.agree / max(self.tokens, 1)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed cross-entropy of logits [n, vocab] against targets [n]."""
    return float(F.cross_entropy(logits.float(), targets, reduction="sum"))


@torch.no_grad()
def simulated_perplexity(model, windows: torch.Tensor, recipe: Recipe, progress: bool = True,
                         simulator: Simulator | None = None, reference: bool = True) -> PerplexityResult:
    """Perplexity of `windows` [n, seqlen] with keys/values quantize-dequantized by `recipe`
    (through `simulator`, a Simulator of `recipe` or a subclass, when given); with `reference`,
    also KL and top-1 agreement against the model without quantization (one more forward per window)."""
    return simulated_perplexities(model, windows, [recipe], progress, [simulator or Simulator(recipe)], reference)[0]


@torch.no_grad()
def simulated_perplexities(model, windows: torch.Tensor, recipes: list[Recipe], progress: bool = True,
                           simulators: list[Simulator] | None = None, reference: bool = True) -> list[PerplexityResult]:
    """`simulated_perplexity` of every recipe over the same windows [n, seqlen], window by window, so that
    each window's reference distribution is computed once for all recipes. Each result's `seconds` is its
    own forwards plus an equal share of the reference forwards."""
    simulators = simulators or [Simulator(r) for r in recipes]
    nll, tokens, seconds = [0.0] * len(recipes), 0, [0.0] * len(recipes)
    divs = [Divergence() for _ in recipes]
    label = recipes[0].method if len(recipes) == 1 else f"{len(recipes)} methods"
    bar = tqdm(windows, desc=label, unit="window", disable=not progress, leave=False)
    for window in bar:
        ids = window.unsqueeze(0).to(model.device)
        start = time.perf_counter()
        ref = reference_logprobs(model, ids) if reference else None
        shared = (time.perf_counter() - start) / len(recipes)
        tokens += ids.shape[1] - 1
        for i, simulator in enumerate(simulators):
            start = time.perf_counter()
            with intercept_kv(model, simulator):
                logits = model(ids).logits[0, :-1]
            nll[i] += _nll(logits, ids[0, 1:])
            if ref is not None:
                divs[i].add(ref, logits)
            del logits
            seconds[i] += time.perf_counter() - start + shared
        del ref
        bar.set_postfix(ppl=f"{math.exp(nll[0] / tokens):.3f}")
    return [
        PerplexityResult(
            method=recipe.method, ppl=math.exp(total / tokens), nll=total / tokens, tokens=tokens, windows=len(windows),
            bits_per_element=simulator.count.per_element, seconds=spent,
            kl=div.mean_kl if reference else None, top1=div.top1 if reference else None,
            fixed_bytes=simulator.fixed_bytes, marginal_bits_per_element=simulator.count.marginal_per_element,
        )
        for recipe, simulator, total, div, spent in zip(recipes, simulators, nll, divs, seconds)
    ]
