"""Learning residual-VQ codebooks from calibration activations.

Per layer and per K/V: calibration rows (pre-RoPE keys or values [rows, head_dim]) are clamped
to the outlier thresholds (if any), divided by their standard deviation and split into group
vectors [N, g]. Then, stage by stage, a codebook is initialized by k-means (Lloyd) on what the
previous stages left, and all stages are refined jointly by exponential moving averages over
mini-batches (decay 0.99, Laplace-smoothed counts, eps 1e-5), restarting dead codes from random
residuals of the batch. Reported per stage: codebook usage (perplexity of the code assignments,
C at best) and relative squared error left after the stage, on training and held-out vectors.

Cost is bounded by subsampling: `RVQTrainConfig.train_vectors` vectors per layer and K/V.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from kvpack.codecs.rvq import RVQCodec, group_permutation, intra_op_threads, nearest_code, residual_encode, to_groups, token_scale
from kvpack.errors import MethodError
from kvpack.methods.family import LayerActivations
from kvpack.methods.settings import MethodSettings


@dataclass
class RVQTrainConfig:
    """How hard calibration works; the defaults fit SmolLM2 (30 layers, d8-c2048) in minutes on 2 cores."""

    # Measured on SmolLM2 layers 10/25 (d8-c2048-g32, benchmarks/rvq_notes.md): held-out error is
    # limited by the amount of data (train error is ~1/2 of held-out), so k-means runs short on a
    # subsample and one EMA pass brings in 4x more vectors: 15% lower held-out error than k-means
    # only, ~9 s per layer and K/V on one thread.
    train_vectors: int = 65536  # group vectors per layer and K/V used for the EMA pass
    kmeans_vectors: int = 16384  # subsample the k-means initialization runs on
    kmeans_iters: int = 2
    ema_passes: int = 1
    batch_size: int = 256
    decay: float = 0.99
    eps: float = 1e-5
    dead_fraction: float = 0.03  # a code is dead when its EMA count < this x the mean count
    heldout_vectors: int = 2048
    seed: int = 0
    # Intra-op threads while fitting. The per-batch ops are small; on shared cores more threads
    # stall on each other (measured 10x slower with 2 threads on a loaded 2-core machine).
    threads: int = 1


# -- k-means ------------------------------------------------------------------------------------

def segment_sum(vectors: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Sum [size, g] of the vectors [N, g] assigned to each code by index [N].

    (index_put_ with accumulate: on CPU, index_add_ costs ~14 ms per call even for 256 rows.)
    """
    return vectors.new_zeros(size, vectors.shape[1]).index_put_((index,), vectors, accumulate=True)


def assign(vectors: torch.Tensor, codebook: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Nearest codeword index [N] of each of vectors [N, g] in codebook [C, g], chunked."""
    return residual_encode(vectors, codebook.unsqueeze(0), chunk_rows)[:, 0]


def kmeans(vectors: torch.Tensor, size: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means: (codebook [size, g], assignment [N]) of vectors [N, g].

    Initialized from `size` distinct random vectors; empty clusters restart from random vectors.
    """
    n = vectors.shape[0]
    if n < size:
        raise ValueError(f"k-means needs at least as many vectors as codes ({n} < {size}); collect more calibration rows")
    codebook = vectors[torch.randperm(n, generator=generator)[:size]].clone()
    index = assign(vectors, codebook)
    for _ in range(iters):
        counts = torch.bincount(index, minlength=size).float()
        sums = segment_sum(vectors, index, size)
        empty = counts == 0
        codebook = torch.where(empty[:, None], codebook, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            codebook[empty] = vectors[torch.randint(n, (int(empty.sum()),), generator=generator)]
        index = assign(vectors, codebook)
    return codebook, index


# -- EMA codebooks --------------------------------------------------------------------------------

@dataclass
class EMACodebooks:
    """EMA state of D codebooks: counts [D, C] and codeword sums [D, C, g]; codebooks = sums / smoothed counts."""

    cluster_size: torch.Tensor
    embed_sum: torch.Tensor
    decay: float = 0.99
    eps: float = 1e-5
    dead_fraction: float = 0.03
    restarts: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, codebooks: torch.Tensor, counts: torch.Tensor, **kwargs) -> "EMACodebooks":
        """Continue from codebooks [D, C, g] whose codes were used `counts` [D, C] times per batch."""
        state = cls(counts.clone().float(), codebooks * counts.float()[..., None], **kwargs)
        state.restarts = [0] * codebooks.shape[0]
        return state

    def codebook(self, stage: int) -> torch.Tensor:
        """Codebook [C, g] of `stage` from the Laplace-smoothed counts."""
        size = self.cluster_size[stage]
        total = size.sum()
        smoothed = (size + self.eps) / (total + size.numel() * self.eps) * total
        return self.embed_sum[stage] / smoothed[:, None]

    def codebooks(self) -> torch.Tensor:
        return torch.stack([self.codebook(s) for s in range(self.cluster_size.shape[0])])

    def update(self, stage: int, residuals: torch.Tensor, index: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """One EMA step of `stage` with residuals [B, g] assigned to codes `index` [B]; restart dead codes."""
        size = self.cluster_size.shape[1]
        counts = torch.bincount(index, minlength=size).float()
        sums = segment_sum(residuals, index, size)
        self.cluster_size[stage].mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum[stage].mul_(self.decay).add_(sums, alpha=1 - self.decay)
        if self.dead_fraction > 0:
            self._restart_dead(stage, residuals, generator)

    def _restart_dead(self, stage: int, residuals: torch.Tensor, generator: torch.Generator | None) -> None:
        size = self.cluster_size[stage]
        mean = float(size.mean())
        dead = (size < self.dead_fraction * mean).nonzero()[:, 0]
        if dead.numel() == 0:
            return
        pick = torch.randint(residuals.shape[0], (dead.numel(),), generator=generator)
        size[dead] = mean
        self.embed_sum[stage, dead] = residuals[pick] * mean
        self.restarts[stage] += dead.numel()


# -- training one quantizer ----------------------------------------------------------------------

def stage_report(vectors: torch.Tensor, codebooks: torch.Tensor) -> dict[str, list[float]]:
    """Per stage on vectors [N, g]: usage perplexity exp(H(assignments)) and relative squared error left."""
    codes = residual_encode(vectors, codebooks)
    energy = float((vectors * vectors).sum())
    residual = vectors.clone()
    usage, rel = [], []
    for s in range(codebooks.shape[0]):
        p = torch.bincount(codes[:, s], minlength=codebooks.shape[1]).float()
        p = p[p > 0] / p.sum()
        usage.append(math.exp(float(-(p * p.log()).sum())))
        residual -= codebooks[s, codes[:, s]]
        rel.append(float((residual * residual).sum()) / max(energy, 1e-30))
    return {"usage_perplexity": usage, "rel_error": rel}


def train_rvq(
    vectors: torch.Tensor, depth: int, size: int, config: RVQTrainConfig, ema: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """Codebooks [depth, size, g] for vectors [N, g]: k-means per stage, then EMA passes (if `ema`)."""
    generator = generator or torch.Generator().manual_seed(config.seed)
    n = vectors.shape[0]
    sub = vectors[torch.randperm(n, generator=generator)[: min(n, config.kmeans_vectors)]]
    residual = sub.clone()
    books, counts = [], []
    for _ in range(depth):
        codebook, index = kmeans(residual, size, config.kmeans_iters, generator)
        residual -= codebook[index]
        books.append(codebook)
        counts.append(torch.bincount(index, minlength=size).float() * config.batch_size / sub.shape[0])
    codebooks = torch.stack(books)
    info: dict = {"restarts": [0] * depth}
    if ema and config.ema_passes > 0:
        state = EMACodebooks.start(codebooks, torch.stack(counts), decay=config.decay, eps=config.eps,
                                   dead_fraction=config.dead_fraction)
        for _ in range(config.ema_passes):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, config.batch_size):
                residual = vectors[order[start:start + config.batch_size]].clone()
                for s in range(depth):
                    codebook = state.codebook(s)
                    index = nearest_code(residual, codebook, (codebook * codebook).sum(-1))
                    state.update(s, residual, index, generator)
                    residual -= codebook[index]
        codebooks = state.codebooks()
        info["restarts"] = state.restarts
    return codebooks, info


# -- per layer data and the recipe ------------------------------------------------------------------

def outlier_thresholds(rows: torch.Tensor, heads: torch.Tensor, num_heads: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per KV head and channel thresholds (lower, upper) [num_heads, head_dim] leaving `fraction` of rows outside."""
    lower = torch.empty(num_heads, rows.shape[1])
    upper = torch.empty(num_heads, rows.shape[1])
    for h in range(num_heads):
        x = rows[heads == h]
        if x.shape[0] == 0:
            raise ValueError(f"no calibration rows for KV head {h}")
        x = x[: 1 << 20]  # torch.quantile input limit; rows are already a random subset
        lower[h] = torch.quantile(x, fraction / 2, dim=0)
        upper[h] = torch.quantile(x, 1 - fraction / 2, dim=0)
    return lower, upper


def group_vectors(rows: torch.Tensor, heads: torch.Tensor, codec: RVQCodec) -> torch.Tensor:
    """Calibration rows [R, head_dim] of KV heads `heads` [R] -> normalized group vectors [R * n, g], as encode sees them."""
    if codec.lower is not None:
        rows = torch.minimum(torch.maximum(rows, codec.lower[heads]), codec.upper[heads])
    return to_groups(rows / token_scale(rows).float(), codec.perm, codec.group).reshape(-1, codec.group)


def fit_codec(
    rows: torch.Tensor, heads: torch.Tensor, *, depth: int, size: int, group: int, grouping: str,
    outliers: float, ema: bool, config: RVQTrainConfig, generator: torch.Generator,
) -> tuple[RVQCodec, dict]:
    """Fit one layer's K or V quantizer on rows [R, head_dim] (KV head of each row in `heads` [R])."""
    start = time.perf_counter()
    head_dim = rows.shape[1]
    n_groups = head_dim // group
    perm = torch.randperm(rows.shape[0], generator=generator)
    n_held = min(rows.shape[0] // 4, max(1, math.ceil(config.heldout_vectors / n_groups)))
    held, train = perm[:n_held], perm[n_held:][: math.ceil(config.train_vectors / n_groups)]
    lower = upper = None
    if outliers > 0:
        lower, upper = outlier_thresholds(rows[train], heads[train], int(heads.max()) + 1, outliers)
    probe = RVQCodec(torch.zeros(depth, size, group), head_dim, grouping, lower, upper)
    vectors = group_vectors(rows[train], heads[train], probe)
    codebooks, info = train_rvq(vectors, depth, size, config, ema=ema, generator=generator)
    codec = RVQCodec(codebooks, head_dim, grouping, lower, upper)
    sample = vectors[torch.randperm(vectors.shape[0], generator=generator)[: config.heldout_vectors]]
    info |= {
        "train": stage_report(sample, codec.codebooks),
        "heldout": stage_report(group_vectors(rows[held], heads[held], probe), codec.codebooks),
        "vectors": vectors.shape[0], "seconds": time.perf_counter() - start,
    }
    return codec, info


def _layer_mean(layers: list[dict], kind: str, split: str, key: str) -> list[float]:
    """Mean over layers of a per-stage statistic (one value per stage)."""
    stages = [layer[kind][split][key] for layer in layers]
    return [sum(col) / len(col) for col in zip(*stages)]


def fit_rvq_recipe(
    model, activations: list[LayerActivations], settings: MethodSettings, config: RVQTrainConfig | None = None,
    progress: bool = True,
) -> tuple[list[RVQCodec], list[RVQCodec], dict]:
    """Fit per-layer RVQ codecs for keys and values from `activations` (collect_activations, pre-RoPE keys).

    With `share_layers` N, layers [0, N), [N, 2N), ... share one key and one value codec (the same
    objects), trained on the pooled rows of those layers.
    Returns (key_codecs, value_codecs, info); info holds the training config, time, and per layer
    and stage the codebook usage and relative error (train and held-out), plus their layer means.
    `model` is accepted for the common calibration signature and not used.
    """
    if settings.family != "rvq":
        raise MethodError(f"fit_rvq_recipe fits rvq-* methods, not '{settings.name}'.")
    if not settings.pre_rope:
        raise MethodError(f"'{settings.name}': RVQ codebooks are fitted on pre-RoPE keys; drop ':post-rope' / --post-rope.")
    config = config or RVQTrainConfig()
    options = settings.options
    generator = torch.Generator().manual_seed(config.seed)
    common = dict(depth=options.depth, size=options.codes, outliers=options.outliers,
                  ema=options.codebook_training == "ema", config=config, generator=generator)
    try:
        for group in (settings.key_group, settings.value_group):
            group_permutation(activations[0].keys.shape[1], group, "contiguous")
    except ValueError as exc:
        raise MethodError(f"'{settings.name}': {exc}") from exc
    start = time.perf_counter()
    keys, values, layers = [], [], []
    span = options.share_layers or len(activations)
    with intra_op_threads(config.threads):
        for first in tqdm(range(0, len(activations), span), desc=f"fitting {settings.name}", unit="codebook set",
                          disable=not progress):
            group = activations[first:first + span]  # layers sharing one key and one value codec: pooled rows
            heads = torch.cat([a.heads for a in group])
            k, k_info = fit_codec(torch.cat([a.keys for a in group]), heads, group=settings.key_group,
                                  grouping=options.key_grouping, **common)
            v, v_info = fit_codec(torch.cat([a.values for a in group]), heads, group=settings.value_group,
                                  grouping=options.value_grouping, **common)
            keys += [k] * len(group)  # the same objects: recipes, caches and byte counts see them once
            values += [v] * len(group)
            layers += [{"keys": k_info, "values": v_info}] * len(group)
    info = {
        "timing_s": {"rvq_fit": time.perf_counter() - start}, "rvq_config": asdict(config), "layers": layers,
        "mean": {f"{kind}_{split}_{key}": _layer_mean(layers, kind, split, key)
                 for kind in ("keys", "values") for split in ("train", "heldout")
                 for key in ("usage_perplexity", "rel_error")},
    }
    return keys, values, info
