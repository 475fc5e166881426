"""Fused Triton encode for appending tokens to a KVQuant (nuq) cache on the GPU: one launch per block
normalizes, finds the outliers, picks the nearest level and packs the codes; it stores exactly what
`NuqCodec.encode` stores (tests compare bit for bit under TRITON_INTERPRET=1).

keys (per channel, offline ranges): u = (x - zero_c) / scale_c, outliers |u| > 1.
values (per token): the k smallest and k largest of each token vector (all KV heads of the token with
span "all") are outliers; zero/scale (fp16) come from the range of the rest.
Codes: nearest of the sorted levels (count of midpoints below u), packed 8 codes per BITS bytes.
The sparse outlier tensors are built from the kernel's mask by the codec's own layout code.
`nuq_encode` returns None for what it does not cover (per-matrix outlier thresholds, head_dim not a
multiple of 8, no triton), and the caller uses `codec.encode`.
"""
from __future__ import annotations

import torch

from kvpack.codecs import Encoded
from kvpack.codecs.nuq import NuqCodec, outliers_per_side
from kvpack.codecs import sparse
from kvpack.kernels.triton_attention import HAVE_TRITON, available, _pow2

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _pack_store(code, out_row, tmask, BT: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
        """Pack codes [BT, D] (int64) into BITS bytes per 8 channels at out_row [BT] (pointers)."""
        c3 = tl.reshape(code, [BT, D // 8, 8])
        shifts = (tl.arange(0, 8) * BITS).to(tl.int64)
        word = tl.sum(c3 << shifts[None, None, :], axis=2)  # [BT, D/8], 8 * BITS bits each
        grp = tl.arange(0, D // 8)
        for j in tl.static_range(BITS):
            byte = ((word >> (8 * j)) & 255).to(tl.uint8)
            tl.store(out_row[:, None] + grp[None, :] * BITS + j, byte, mask=tmask[:, None])

    @triton.jit
    def _nearest(u, mid_ptr, L: tl.constexpr):
        code = tl.zeros(u.shape, dtype=tl.int64)
        for j in tl.static_range(L - 1):
            code += (u > tl.load(mid_ptr + j)).to(tl.int64)
        return code

    @triton.jit
    def _encode_keys_kernel(x_ptr, sx_b, sx_h, sx_t, zero_ptr, scale_ptr, mid_ptr, mid_h, codes_ptr, so_b, so_h,
                            mask_ptr, T, H, D: tl.constexpr, BITS: tl.constexpr, OUTLIERS: tl.constexpr,
                            BT: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        t = tl.program_id(1) * BT + tl.arange(0, BT)
        tmask = t < T
        d = tl.arange(0, D)
        m2 = tmask[:, None] & (d[None, :] >= 0)
        x = tl.load(x_ptr + b * sx_b + h * sx_h + t[:, None] * sx_t + d[None, :], mask=m2, other=0.0)
        zero = tl.load(zero_ptr + h * D + d)
        scale = tl.load(scale_ptr + h * D + d)
        u = tl.math.div_rn(x - zero[None, :], tl.broadcast_to(scale[None, :], x.shape))
        if OUTLIERS:
            tl.store(mask_ptr + ((b * H + h) * T + t[:, None]) * D + d[None, :], (tl.abs(u) > 1).to(tl.int8), mask=m2)
        u = tl.minimum(tl.maximum(u, -1.0), 1.0)
        code = _nearest(u, mid_ptr + h * mid_h, 1 << BITS)
        _pack_store(code, codes_ptr + b * so_b + h * so_h + t * (D * BITS // 8), tmask, BT, D, BITS)

    @triton.jit
    def _encode_values_kernel(x_ptr, sx_b, sx_h, sx_t, mid_ptr, mid_h, codes_ptr, so_b, so_h, zero_ptr, scale_ptr,
                              mask_ptr, T, H, HS, D: tl.constexpr, HP: tl.constexpr, BITS: tl.constexpr,
                              K: tl.constexpr):
        """One program per token vector: (b, t) over HS = H heads (span all) or (b, h, t) with HS = 1."""
        pid = tl.program_id(0)
        t = pid % T
        rest = pid // T
        if HS == 1:
            h0 = rest % H
            b = rest // H
        else:
            h0 = 0
            b = rest
        r = tl.arange(0, HP)
        d = tl.arange(0, D)
        valid = (r < HS)[:, None] & (d[None, :] >= 0)
        heads = h0 + r
        x = tl.load(x_ptr + b * sx_b + heads[:, None] * sx_h + t * sx_t + d[None, :], mask=valid, other=0.0)
        big = float("inf")
        lo_work = tl.where(valid, x, big)
        hi_work = tl.where(valid, x, -big)
        flat = tl.reshape(r[:, None] * D + d[None, :], [HP * D])
        for _ in tl.static_range(K):  # drop the k smallest / largest occurrences
            lo_flat = tl.reshape(lo_work, [HP * D])
            hi_flat = tl.reshape(hi_work, [HP * D])
            i_lo = tl.argmin(lo_flat, axis=0)
            i_hi = tl.argmax(hi_flat, axis=0)
            lo_work = tl.reshape(tl.where(flat == i_lo, big, lo_flat), [HP, D])
            hi_work = tl.reshape(tl.where(flat == i_hi, -big, hi_flat), [HP, D])
        lo = tl.min(tl.reshape(lo_work, [HP * D]), axis=0)
        hi = tl.max(tl.reshape(hi_work, [HP * D]), axis=0)
        if K > 0:
            outlier = valid & ((x < lo) | (x > hi))
            tl.store(mask_ptr + ((b * H + heads[:, None]) * T + t) * D + d[None, :], outlier.to(tl.int8), mask=valid)
        zero = ((hi + lo) / 2).to(tl.float16).to(tl.float32)
        scale = ((hi - lo) / 2).to(tl.float16).to(tl.float32)
        scale = tl.where(scale > 0, scale, 5.9604645e-08)  # constant group: tiniest fp16 scale
        hs_store = heads if HS == 1 else tl.zeros([HP], dtype=tl.int32)
        first = r == 0
        tl.store(zero_ptr + (b * (H // HS) + hs_store * (HS == 1)) * T + t, tl.zeros([HP], tl.float32).to(tl.float16) + zero.to(tl.float16), mask=first)
        tl.store(scale_ptr + (b * (H // HS) + hs_store * (HS == 1)) * T + t, tl.zeros([HP], tl.float32).to(tl.float16) + scale.to(tl.float16), mask=first)
        u = tl.math.div_rn(x - zero, tl.broadcast_to(scale, x.shape))
        u = tl.minimum(tl.maximum(u, -1.0), 1.0)
        # per-head codebooks: each head row uses its own midpoints
        code = tl.zeros([HP, D], dtype=tl.int64)
        L: tl.constexpr = 1 << BITS
        for j in tl.static_range(L - 1):
            mid = tl.load(mid_ptr + heads * mid_h + j, mask=r < HS, other=0.0)
            code += (u > mid[:, None]).to(tl.int64)
        for i in tl.static_range(HP):
            if i < HS:
                row_code = tl.sum(tl.where(r[:, None] == i, code, 0), axis=0)  # [D]
                c3 = tl.reshape(row_code, [D // 8, 8])
                shifts = (tl.arange(0, 8) * BITS).to(tl.int64)
                word = tl.sum(c3 << shifts[None, :], axis=1)
                grp = tl.arange(0, D // 8)
                base = codes_ptr + b * so_b + (h0 + i) * so_h + t * (D * BITS // 8)
                for j in tl.static_range(BITS):
                    tl.store(base + grp * BITS + j, ((word >> (8 * j)) & 255).to(tl.uint8))


def _midpoints(codec: NuqCodec, device) -> tuple[torch.Tensor, int]:
    levels = codec.levels.to(device).float()
    mid = ((levels[:, 1:] + levels[:, :-1]) / 2).contiguous()
    return mid, (mid.shape[1] if mid.shape[0] > 1 else 0)


def nuq_encode(codec: NuqCodec, x: torch.Tensor) -> Encoded | None:
    """`codec.encode(x)` for x [B, H, T, D] in one fused launch (+ the sparse layout in torch); None if not covered."""
    if not (HAVE_TRITON and available() and isinstance(codec, NuqCodec)) or x.dim() != 4:
        return None
    B, H, T, D = x.shape
    if H != codec.heads or D != codec.head_dim or D % 8 or D & (D - 1) or codec.outlier_scope != "vector":
        return None
    if codec.levels.shape[0] not in (1, H) or getattr(codec, "channel_bits", None) is not None:
        return None
    x = x.float().contiguous()
    bits = codec.bits
    mid, mid_h = _midpoints(codec, x.device)
    codes = torch.empty(B, H, T * D * bits // 8, dtype=torch.uint8, device=x.device)
    outliers = codec.outlier_frac > 0
    mask = torch.zeros(B, H, T, D, dtype=torch.int8, device=x.device) if outliers else None
    tensors = {}
    if codec.axis == "channel":
        zero = codec.zero.reshape(H, D).to(x.device).float().contiguous()
        scale = codec.scale.reshape(H, D).to(x.device).float().contiguous()
        bt = 16
        _encode_keys_kernel[(B * H, triton.cdiv(T, bt))](
            x, *x.stride()[:3], zero, scale, mid, mid_h, codes, codes.stride(0), codes.stride(1),
            mask if outliers else codes, T, H, D=D, BITS=bits, OUTLIERS=outliers, BT=bt)
        tensors["codes"] = codes
    else:
        span_heads = H if codec.span == "all" else 1
        n = span_heads * D
        k = outliers_per_side(codec.outlier_frac, n) if outliers else 0
        zero = torch.empty(B, H // span_heads, T, 1, dtype=torch.float16, device=x.device)
        scale = torch.empty_like(zero)
        programs = B * T * (H // span_heads)
        _encode_values_kernel[(programs,)](
            x, *x.stride()[:3], mid, mid_h, codes, codes.stride(0), codes.stride(1), zero, scale,
            mask if outliers else codes, T, H, span_heads, D=D, HP=_pow2(span_heads), BITS=bits, K=k)
        tensors.update(codes=codes, zero=zero, scale=scale)
    if outliers:
        m = mask.bool()
        for key, t in sparse.encode_rows(sparse.to_rows(x, codec.outlier_rows), sparse.to_rows(m, codec.outlier_rows)).items():
            tensors[f"outlier_{key}"] = t
    return Encoded(tensors, tuple(x.shape))
