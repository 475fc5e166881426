"""Collect what calibration fits on: per layer, pre-RoPE keys and values of the calibration
windows and (optionally) their Fisher information, the squared gradient of the next-token loss
with respect to every key/value element.

Memory stays bounded: each window is processed (forward, backward) and released before the next;
per layer only a random subset of token rows is kept (`max_rows` rows of head_dim over all windows
and heads). Sink tokens are excluded: they are stored in fp16 and must not shape the datatypes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvpack.hf.attention import attention_layers, intercept_kv
from kvpack.methods import LayerActivations
from kvpack.codecs.checks import check_finite


@dataclass
class CollectionTiming:
    forward_s: float = 0.0
    backward_s: float = 0.0
    windows: int = 0
    extra: dict = field(default_factory=dict)


class _Collector:
    def __init__(self, num_layers: int, fisher: bool, pre_rope: bool = True):
        self.fisher = fisher
        self.pre_rope = pre_rope
        self.token_index: torch.Tensor | None = None
        self.parts = [{"k": [], "v": [], "h": [], "kf": [], "vf": []} for _ in range(num_layers)]

    def _keep(self, store: list, x: torch.Tensor) -> None:
        # x [1, heads, tokens, d] -> rows [heads * kept, d]
        store.append(x[0, :, self.token_index].reshape(-1, x.shape[-1]).detach().float().cpu())

    def __call__(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
        check_finite(key, f"layer {layer_idx} calibration keys")
        check_finite(value, f"layer {layer_idx} calibration values")
        part = self.parts[layer_idx]
        self._keep(part["k"], key)
        self._keep(part["v"], value)
        heads = key.shape[1]
        part["h"].append(torch.arange(heads).repeat_interleave(self.token_index.numel()))
        if self.fisher and key.requires_grad:
            key.register_hook(lambda g, s=part["kf"]: self._keep(s, g.float() ** 2))
            value.register_hook(lambda g, s=part["vf"]: self._keep(s, g.float() ** 2))
        return key, value


def collect_activations(
    model,
    windows: torch.Tensor,
    *,
    fisher: bool = True,
    sink_tokens: int = 1,
    max_rows: int | None = 131072,
    seed: int = 0,
    progress: bool = True,
    pre_rope: bool = True,
) -> tuple[list[LayerActivations], CollectionTiming]:
    """Run `windows` [n, seqlen] through the model and return per-layer calibration rows
    (keys before RoPE, or after it with pre_rope=False)."""
    layers = attention_layers(model)
    heads = layers[0].config.num_key_value_heads if hasattr(layers[0], "config") else 1
    n, seqlen = windows.shape
    usable = seqlen - sink_tokens
    if usable < 1:
        raise ValueError(f"calibration windows of {seqlen} tokens leave nothing after {sink_tokens} sink tokens")
    per_window = usable if max_rows is None else max(1, min(usable, math.ceil(max_rows / (n * heads))))
    generator = torch.Generator().manual_seed(seed)
    collector = _Collector(len(layers), fisher, pre_rope)
    timing = CollectionTiming()
    embed = model.get_input_embeddings()
    bar = tqdm(windows, desc="collecting K/V" + (" + Fisher" if fisher else ""), unit="window", disable=not progress)
    with intercept_kv(model, collector):
        for window in bar:
            perm = torch.randperm(usable, generator=generator)[:per_window].sort().values + sink_tokens
            collector.token_index = perm
            ids = window.unsqueeze(0).to(model.device)
            start = time.perf_counter()
            if fisher:
                with torch.enable_grad():
                    emb = embed(ids).detach().requires_grad_(True)
                    logits = model(inputs_embeds=emb).logits[:, :-1].float()
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
                    timing.forward_s += time.perf_counter() - start
                    start = time.perf_counter()
                    loss.backward()
                    timing.backward_s += time.perf_counter() - start
                    del logits, loss, emb
            else:
                with torch.no_grad():
                    model(ids)
                timing.forward_s += time.perf_counter() - start
            timing.windows += 1
    out = []
    for part in collector.parts:
        out.append(LayerActivations(
            keys=torch.cat(part["k"]), values=torch.cat(part["v"]), heads=torch.cat(part["h"]),
            key_fisher=torch.cat(part["kf"]) if part["kf"] else None,
            value_fisher=torch.cat(part["vf"]) if part["vf"] else None,
        ))
    return out, timing
