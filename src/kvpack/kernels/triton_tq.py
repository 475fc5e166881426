"""Split-K decode attention over runs of TurboQuant blocks (keys stored post-RoPE, values per token), on the GPU.

One launch per run pair (keys, values) inside triton_decode's layer pass, with the same partials and reduction.
What it reads comes from the run's kernel view (kernels.layout.tq_view): per token and head the codes of the
first `high_count` rotated coordinates at `high` bits and of the rest at `low` bits (two packed tensors), the fp16
norm, the Lloyd-Max levels of each width and the rotation M = R^T [D, D] (decoded x = M (norm * y)).

- keys: q . k = (M^T q) . (norm * y): the query is rotated once per call on the host side (a [B, Hq, Q, D] matmul,
  no sync), the kernel scores it against norm * levels, never turning keys back;
- values: acc^T [D, GP] sums norm * p * y in the rotated frame; each program turns its partial back once (M @ acc^T,
  one tl.dot) before the reduction combines it with the other segments;
- codes are read by the mixed-width kernel's byte gathers (triton_mixed._mixed_lookup) from a per-codec table:
  coordinate c has a width, a slot (high or low part), a bit offset in its token row and the row's bytes, and
  its levels in a compact table. Rows are per (token, head): r = ((block * B + b) * H + h) * T + t.

Not covered (None, the caller takes another path): QJL sketches, centers, keys stored pre-RoPE (a rotation does
not commute with RoPE), head_dim not a power of two in 32..128.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpack.kernels import triton_device, triton_mixed
from kvpack.kernels.layout import TqView, tq_view
from kvpack.kernels.triton_attention import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    _dot, _mask_scores, _online = triton_device._dot, triton_device._mask_scores, triton_device._online
    _mixed_lookup = triton_mixed._mixed_lookup


@dataclass
class TqTables:
    """Per-coordinate table of one TurboQuant codec on one device: meta int32 [1, 5, D] (coordinate, width | slot
    << 4, bit offset in its part's row, the row's bytes, first level), levels fp32 [1, L] (each coordinate's levels
    one after another), rotation fp32 [D, D] (M = R^T)."""

    meta: torch.Tensor
    levels: torch.Tensor
    rotation: torch.Tensor


def tq_tables(codec, view: TqView) -> TqTables:
    """The tables of `codec` for `view`'s device, built once (kept with the codec's kernel constants)."""
    memo = codec.__dict__.setdefault("_kvpack_triton_tq", {})
    key = (str(view.norm.device), view.dim, id(view.levels_lo), id(view.rotation))
    if key not in memo:
        memo[key] = _build(view)
    return memo[key]


def _build(view: TqView) -> TqTables:
    dim, hc = view.dim, view.high_count
    meta = torch.zeros(1, 5, dim, dtype=torch.int64)
    c = torch.arange(dim)
    high = c < hc
    width = torch.where(high, view.high, view.low)
    slot = torch.where(high, 0, 1) if view.codes_hi is not None else torch.zeros(dim, dtype=torch.int64)
    meta[0, 0] = c
    meta[0, 1] = width | slot << 4
    meta[0, 2] = torch.where(high, c, c - hc) * width
    meta[0, 3] = torch.where(high, (hc * view.high + 7) // 8, ((dim - hc) * view.low + 7) // 8)
    meta[0, 4] = torch.cumsum(1 << width, 0) - (1 << width)
    levels = torch.cat([(view.levels_hi if bool(h) else view.levels_lo).float().cpu() for h in high])
    dev = view.norm.device
    return TqTables(meta.to(torch.int32).to(dev).contiguous(), levels[None].to(dev).contiguous(),
                    view.rotation.float().to(dev).contiguous())


if HAVE_TRITON:

    @triton.jit
    def _tq_split_kernel(
            q_ptr, sq_b, sq_h, sq_q, scaling,
            kc0, kc1, kmeta_ptr, klev_ptr, kn_ptr, TK,
            vc0, vc1, vmeta_ptr, vlev_ptr, vn_ptr, TV, vrot_ptr,
            mask_ptr, sm_b, sm_q, sm_k,
            acc_ptr, ml_ptr,
            N, B, H, start, total, split0, per_split, softcap,
            D: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, Q: tl.constexpr, G0: tl.constexpr,
            MASK: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, DOT16: tl.constexpr,
            BLOCK: tl.constexpr):
        """Partials of one (batch, KV head) x one split of a run pair of TurboQuant blocks; q is the rotated query
        (M^T q) [B, Hq, Q, D]. Tiles are channel-major [D, BLOCK] in the rotated frame."""
        pid = tl.program_id(0)
        sp = tl.program_id(1)
        b = pid // H
        h = pid % H
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        g = tl.arange(0, GP)
        j = tl.arange(0, D)
        qrow = q_ptr + b64 * sq_b + (h * G0 + g // Q).to(tl.int64) * sq_h + (g % Q) * sq_q
        qr = tl.load(qrow[:, None] + j[None, :], mask=(g < G)[:, None], other=0.0).to(tl.float32) * scaling
        if DOT16:
            qr = qr.to(tl.float16)
        m = tl.full([GP], float("-inf"), dtype=tl.float32)
        l = tl.zeros([GP], dtype=tl.float32)
        acc = tl.zeros([D, GP], dtype=tl.float32)  # acc^T, rotated frame
        n_begin = sp * per_split
        n_end = tl.minimum(n_begin + per_split, N)
        for n0 in range(n_begin, n_end, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            nmask = n < n_end
            slot = start + n
            kr = (((n // TK).to(tl.int64) * B + b64) * H + h64) * TK + n % TK
            kn = tl.load(kn_ptr + kr, mask=nmask, other=0.0).to(tl.float32)
            k = _mixed_lookup(kmeta_ptr, kc0, kc1, kc1, kc1, kc1, kc1, kc1, kc1, klev_ptr, kr, nmask, n0, n_end, D)
            s = _dot(qr, k * kn[None, :], tl.zeros([GP, BLOCK], dtype=tl.float32), DOT16)
            s = _mask_scores(s, slot, nmask, b, mask_ptr, sm_b, sm_q, sm_k, total, softcap, GP, Q, MASK, CAUSAL,
                             SOFTCAP)
            p, m, l, alpha = _online(s, m, l)
            acc = acc * alpha[None, :]
            vr = (((n // TV).to(tl.int64) * B + b64) * H + h64) * TV + n % TV
            vn = tl.load(vn_ptr + vr, mask=nmask, other=0.0).to(tl.float32)
            v = _mixed_lookup(vmeta_ptr, vc0, vc1, vc1, vc1, vc1, vc1, vc1, vc1, vlev_ptr, vr, nmask, n0, n_end, D)
            acc = _dot(v * vn[None, :], p, acc, DOT16)
        cell = (split0 + sp).to(tl.int64) * (B * H) + pid
        for i0 in range(0, D, 16):  # acc^T back to channels, M @ acc^T, 16 rows of M at a time (smem)
            rows = i0 + tl.arange(0, 16)
            part = _dot(tl.load(vrot_ptr + rows[:, None] * D + j[None, :]), acc, tl.zeros([16, GP], dtype=tl.float32),
                        DOT16)
            tl.store(acc_ptr + (cell * GP + g)[None, :] * D + rows[:, None], part)
        tl.store(ml_ptr + cell * 2 * GP + g, m)
        tl.store(ml_ptr + cell * 2 * GP + GP + g, l)


def _codes(view: TqView) -> list[torch.Tensor]:
    """The two code tensors (high part first; the one present twice when there is only one)."""
    parts = [c for c in (view.codes_hi, view.codes_lo) if c is not None]
    return parts + parts[:1] if len(parts) == 1 else parts


def pair_args(k_run, v_run, key_codec, value_codec, pb) -> tuple[list, dict] | None:
    """(launch arguments, from the rotated query M_k^T q [B, Hq, Q, D] fp32 on, and constexprs) of `_tq_split_kernel`
    for a (keys run, values run) pair of TurboQuant blocks (pb: triton_decode.Problem), or None if no kernel fits."""
    if pb.positions is not None:  # keys stored pre-RoPE: the rotation does not commute with RoPE
        return None
    kv, vv = tq_view(k_run, key_codec), tq_view(v_run, value_codec)
    if kv is None or vv is None:
        return None
    for view in (kv, vv):
        if (view.heads, view.dim, view.batch) != (pb.heads, pb.dim, pb.batch) or not 1 <= view.low <= view.high <= 8:
            return None
    kt, vt = tq_tables(key_codec, kv), tq_tables(value_codec, vv)
    qr = (pb.q.float() @ kt.rotation).contiguous()
    args = [qr, qr.stride(0), qr.stride(1), qr.stride(2), pb.scaling, *_codes(kv), kt.meta, kt.levels, kv.norm, kv.tokens, *_codes(vv), vt.meta, vt.levels, vv.norm, vv.tokens,
            vt.rotation]
    return args, {}
