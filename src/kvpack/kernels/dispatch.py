"""Attention of a few query tokens over one cache layer's stored parts, read straight from packed storage.

`layer_attention(layer, query, ...)` reads the layer's fp16 head (sink) and tail (recent window) tokens
directly, and each run of encoded blocks by a kernel that reads the packed codes (the cache hands the
layer and, for pre-RoPE keys, a RopeTable of its logged positions; cache/packed.py decides when):

- nuq (KVQuant) keys: per-channel LUT decode, RoPE at each key's position, q . k; sparse outliers
  added as a correction in the same call. Values: p . v from per-token scaled codes plus outliers.
- rvq keys/values: codeword sums per group, RoPE, q . k / p . v.
- anything else: the torch reference (kernels/reference.py) decodes one chunk of blocks at a time.

Exactness: the kernels compute the same numbers as decode-then-attend up to float summation order
(tests compare with the decode path to ~1e-5). Calls with more than `max_queries` query tokens
(prefill), with autograd on, or with features the path does not cover (dropout, attention weights)
use the model's own attention on decoded keys/values, as before.

Memory: besides the packed storage, one call holds scores/probabilities [B, Hq, Q, tokens] fp32
(1/D of the keys' fp32 size) and per-chunk temporaries; never the decoded history.
"""
from __future__ import annotations

import os

import torch

from kvpack.hf.rope import apply_rope
from kvpack.kernels import cpu, reference, triton_attention
from kvpack.kernels.layout import nuq_view, rvq_view
from kvpack.kernels.rope import RopeSlice, RopeTable
BACKENDS = ("auto", "torch", "cpu", "triton")
DEFAULT_MAX_QUERIES = 16


# ------------------------------------------------------------------------------------------ one layer
def _use_cpu(backend: str, device: torch.device) -> bool:
    if backend not in ("auto", "cpu") or device.type != "cpu":
        return False
    if cpu.available():
        return True
    if backend == "cpu":
        raise RuntimeError(f"CPU attention kernels unavailable: {cpu.error()}")
    return False


def _use_triton(backend: str, device: torch.device) -> bool:
    if backend not in ("auto", "triton") or device.type != "cuda":
        return False
    if triton_attention.available():
        return True
    if backend == "triton":
        raise RuntimeError("Triton attention kernels unavailable (is triton installed?)")
    return False


def _cpu_fits(view, groups: int, rot: int) -> bool:
    return view is not None and view.dim % 8 == 0 and view.dim <= 1024 and groups <= 64 and rot % 16 == 0


def key_run_scores(run, codec, q: torch.Tensor, rope: RopeSlice | None, out: torch.Tensor, backend: str = "auto") -> str:
    """Scores of q [B, H, G, D] against one run's keys into out [B, H, G, run tokens]; returns the path used.

    rope: cos/sin of the run's tokens (None when keys are stored post-RoPE)."""
    rot = 0 if rope is None else rope.rot
    if rope is not None and not rope.half:
        backend = "torch"
    if _use_cpu(backend, q.device):
        view = nuq_view(run, codec)
        if view is not None and view.axis == "channel" and _cpu_fits(view, q.shape[2], rot):
            cpu.nuq_key_scores(view, q, rope, out)
            return "cpu-nuq"
        view = rvq_view(run, codec)
        if _cpu_fits(view, q.shape[2], rot):
            cpu.rvq_key_scores(view, q, rope, out)
            return "cpu-rvq"
    if _use_triton(backend, q.device):
        if triton_attention.key_scores(run, codec, q, rope, out):
            return "triton"
    reference.key_scores(run, codec, q, rope, out)
    return "torch"


def value_run_accum(run, codec, p, out, backend: str = "auto") -> str:
    """out [B, H, G, D] += p [B, H, G, run tokens] . one run's values; returns the path used."""
    if _use_cpu(backend, p.device):
        view = nuq_view(run, codec)
        if view is not None and view.axis == "token" and _cpu_fits(view, p.shape[2], 0):
            cpu.nuq_value_accum(view, p, out)
            return "cpu-nuq"
        view = rvq_view(run, codec)
        if _cpu_fits(view, p.shape[2], 0):
            cpu.rvq_value_accum(view, p, out)
            return "cpu-rvq"
    if _use_triton(backend, p.device):
        if triton_attention.value_accum(run, codec, p, out):
            return "triton"
    reference.value_accum(run, codec, p, out)
    return "torch"


def _heads(stream) -> int:
    for t in (stream.head, stream.tail):
        if t is not None:
            return t.shape[1]
    for run in stream.body.runs:
        return run.block_shape[1]
    raise ValueError("empty cache layer")


def _apply_mask(s: torch.Tensor, mask: torch.Tensor | None, queries: int) -> torch.Tensor:
    """s [B, H, G0, Q, K] scores; mask [B|1, 1|Hq, Q, >=K] bool (True = attend) or additive float."""
    batch, heads, g0, q, k = s.shape
    if mask is None:
        if queries > 1:  # causal, aligned bottom-right: query i sees keys up to k - q + i
            rows = torch.arange(q, device=s.device).unsqueeze(1) + (k - q)
            s = s.masked_fill(torch.arange(k, device=s.device) > rows, float("-inf"))
        return s
    m = mask[..., -k:] if mask.shape[-1] != k else mask
    if m.shape[1] == 1:
        m = m.unsqueeze(2)
    else:
        m = m.reshape(m.shape[0], heads, g0, q, k)
    if m.dtype == torch.bool:
        return s.masked_fill(~m, float("-inf"))
    return s + m.float()


def layer_attention(layer, query: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    scaling: float | None = None, softcap: float | None = None, backend: str = "auto",
                    rope: RopeTable | None = None, paths: list | None = None) -> torch.Tensor:
    """Attention of query [B, Hq, Q, D] over everything `layer` (a CompressedLayer) stores.

    Returns [B, Q, Hq, D] in query's dtype (transformers' attention-function layout). `rope` is
    needed for pre-RoPE caches; `paths` (if given) collects the kernel used per run.
    """
    k_stream, v_stream = layer.k, layer.v
    batch, hq, queries, dim = query.shape
    scale = dim ** -0.5 if scaling is None else scaling
    total = k_stream.stored
    rs = None
    if rope is not None:  # keys stored pre-RoPE: rotate them at their logged positions
        first = layer.first_slot
        rs = rope.get(layer.layer_idx, first, first + total)
    if _use_cpu(backend, query.device):
        out = cpu.layer_attention(layer, query, attention_mask, scale, softcap, rs)
        if out is not None:
            if paths is not None:
                paths.append(("layer", "cpu"))
            return out.to(query.dtype)
    heads = _heads(k_stream)
    g0 = hq // heads
    groups = g0 * queries
    q = (query.float() * scale).contiguous().view(batch, heads, groups, dim)
    scores = torch.empty(batch, heads, groups, total, dtype=torch.float32, device=query.device)
    offset = 0

    def fp16_keys(t: torch.Tensor) -> None:
        nonlocal offset
        n = t.shape[-2]
        k = t.float()
        if rs is not None:
            k = apply_rope(k, *rs[offset:offset + n].full())
        scores[..., offset:offset + n] = q @ k.transpose(-1, -2)
        offset += n

    if k_stream.head is not None:
        fp16_keys(k_stream.head)
    for run in k_stream.body.runs:
        if run.count:
            n = run.tokens
            used = key_run_scores(run, layer.key_codec, q, None if rs is None else rs[offset:offset + n],
                                  scores[..., offset:offset + n], backend)
            if paths is not None:
                paths.append(("keys", used))
            offset += n
    if k_stream.tail is not None:
        fp16_keys(k_stream.tail)
    if offset != total:
        raise RuntimeError(f"layer {layer.layer_idx}: read {offset} keys of {total}")

    s = scores.view(batch, heads, g0, queries, total)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = _apply_mask(s, attention_mask, queries)
    p = torch.softmax(s, dim=-1).reshape(batch, heads, groups, total)

    out = torch.zeros(batch, heads, groups, dim, dtype=torch.float32, device=query.device)
    offset = 0
    if v_stream.head is not None:
        n = v_stream.head_len
        out += p[..., :n] @ v_stream.head.float()
        offset = n
    for run in v_stream.body.runs:
        if run.count:
            n = run.tokens
            used = value_run_accum(run, layer.value_codec, p[..., offset:offset + n], out, backend)
            if paths is not None:
                paths.append(("values", used))
            offset += n
    if v_stream.tail is not None:
        n = v_stream.tail_len
        out += p[..., offset:offset + n] @ v_stream.tail.float()
        offset += n
    if offset != total:
        raise RuntimeError(f"layer {layer.layer_idx}: read {offset} values of {total}")
    out = out.view(batch, heads, g0, queries, dim).reshape(batch, hq, queries, dim)
    return out.transpose(1, 2).contiguous().to(query.dtype)


# ------------------------------------------------------------------------------------------ per-cache state
