"""Split-K flash-decoding over one layer's packed KV cache (GPU; tested on CPU with TRITON_INTERPRET=1).

One call per layer and step reads every stored token once and never materializes scores or the
decoded history:

    out = layer_attention(layer, query, mask, scaling, softcap, positions, inv_freq, rope_scaling)
    # query [B, Hq, Q, D] -> out [B, Q, Hq, D] in query's dtype (transformers' layout), or None

The layer's tokens are segments: the fp16 sink (head), runs of packed blocks, the fp16 recent window
(tail). A run pair (keys, values) has a kernel here for single-width KVQuant (nuq, below), in
triton_mixed.py for per-channel mixed widths (the kvpack presets) and in triton_tq.py for TurboQuant;
any other run makes the call return None. Per segment one launch of grid (B * Hkv, splits); a
program takes `per_split` tokens of one (batch, KV head) in blocks of BLOCK tokens and keeps an
online softmax over them (nuq):

- keys: int32 code words loaded per token row (a row of D codes is D * bits / 32 words), codes
  unpacked by shifts into channel-major tiles [D/2, BLOCK] (what tl.dot takes), levels looked up
  with `tl.gather` from the 2**bits-entry codebook held in shared memory, per-channel scale/zero,
  sparse outliers put in place (CSR pointers per (token row, KV head), extended once per appended
  block, see `_cell_pointers`), RoPE from int32 positions and inv_freq (rotate_half, attention
  scaling; angles reduced to [-pi, pi], polynomial cos/sin; no per-token cos/sin table);
- q . k and p . v with `tl.dot`, the GQA query group (query heads per KV head x query tokens)
  padded to 16 rows; channel halves [0, D/2) and [D/2, D) are separate tiles (RoPE pairs them);
- values: per-token fp16 scale/zero, outliers, acc^T [D/2, G] += v^T p^T.

Partials (max, sum, acc) per split go to a buffer; one reduction kernel combines them and writes the
output. Host side: no .item(), no torch.equal, no device-to-host copy; launch grids depend only on
shapes, so a step can be captured in a CUDA graph. Offsets that can pass 2**31 are int64.

`DOT16` (default on a GPU): tl.dot operands in fp16 with fp32 accumulation (tensor cores). Off:
fp32 operands with input_precision="ieee" (exact to fp32 rounding; used by tests for tight checks).
"""
from __future__ import annotations

import contextlib
import io
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch

from kvpack.kernels import triton_device, triton_mixed, triton_tq
from kvpack.kernels.layout import NuqView, nuq_view
from kvpack.kernels.triton_attention import HAVE_TRITON, available
from kvpack.kernels.triton_device import cell_pointers as _cell_pointers

if HAVE_TRITON:
    import triton
    import triton.language as tl

    _cos_sin_at, _dot, _lookup, _mask_scores = (triton_device._cos_sin_at, triton_device._dot, triton_device._lookup,
                                                triton_device._mask_scores)
    _outlier, _outlier_rows = triton_device._outlier, triton_device._outlier_rows
    _softmax_step, _store_partial = triton_device._softmax_step, triton_device._store_partial

BLOCK_N = 32  # granularity of tokens per split (a multiple of every split kernel's BLOCK); no kernel's inner block
NUQ_BLOCK = 16  # tokens per inner block of every split kernel: nuq, mixed, fp16 (tl.dot's smallest N; see split_launch)
SUPPORTED_BITS = (1, 2, 3, 4, 8)
MAX_GROUPS = 32  # query rows per KV head (heads per KV head x query tokens) the compile checks cover


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if HAVE_TRITON:

    # ------------------------------------------------------------------------------------ device helpers
    @triton.jit
    def _unpack(w_ptr, row, nmask, HALF_IDX: tl.constexpr, HALF: tl.constexpr, BITS: tl.constexpr,
                BN: tl.constexpr):
        """Codes [HALF, BN] int32 (channel-major) of channels HALF_IDX * HALF + [0, HALF) of token rows `row` [BN]
        (int64 offsets in int32 words); the bitstream is little-endian, code c at bits [c * BITS, (c + 1) * BITS)."""
        if 32 % BITS == 0:  # whole codes per word
            PER: tl.constexpr = 32 // BITS
            NW: tl.constexpr = HALF // PER
            w = HALF_IDX * NW + tl.arange(0, NW)
            words = tl.load(w_ptr + row[None, :] + w[:, None], mask=nmask[None, :], other=0)  # [NW, BN]
            sh = tl.arange(0, PER) * BITS
            codes = (words[:, None, :] >> sh[None, :, None]) & ((1 << BITS) - 1)
        else:  # 3 bits: 32 codes fill 3 words; a code starting in word j lies in (word j, word j + 1)
            tl.static_assert(BITS == 3)
            NCH: tl.constexpr = HALF // 32
            base = w_ptr + row[None, :] + ((HALF_IDX * NCH + tl.arange(0, NCH)) * 3)[:, None]
            w0 = tl.load(base, mask=nmask[None, :], other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
            w1 = tl.load(base + 1, mask=nmask[None, :], other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
            w2 = tl.load(base + 2, mask=nmask[None, :], other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
            pair01 = w0 | (w1 << 32)
            pair12 = w1 | (w2 << 32)
            bit = tl.arange(0, 32) * 3
            second = bit >= 32
            sh = tl.where(second, bit - 32, bit).to(tl.uint64)
            sel = tl.where(second[None, :, None], pair12[:, None, :], pair01[:, None, :])
            codes = ((sel >> sh[None, :, None]) & 7).to(tl.int32)
        return tl.reshape(codes, [HALF, BN])

    @triton.jit
    def _outliers(k_lo, k_hi, ptr_ptr, pos_ptr, val_ptr, cell, nmask, base_c, HALF: tl.constexpr):
        """Keys or values x [HALF, BN] x 2 (channel-major) with the stored outliers of cells `cell` [BN] put in place."""
        first, last, count = _outlier_rows(ptr_ptr, cell, nmask)
        cols = tl.arange(0, HALF)[:, None]
        for j in range(0, count):
            ok, c, val = _outlier(pos_ptr, val_ptr, first, last, j, nmask, base_c)
            k_lo = tl.where(ok[None, :] & (cols == c[None, :]), val[None, :], k_lo)
            k_hi = tl.where(ok[None, :] & (cols + HALF == c[None, :]), val[None, :], k_hi)
        return k_lo, k_hi

    @triton.jit
    def _rope(k_lo, k_hi, pos_row, slot, nmask, freq, rope_scale):
        """Rotate keys k [HALF, BN] x 2 by the angles pos * inv_freq (rotate_half pairs c, c + HALF); pos [BN]."""
        p = tl.load(pos_row + slot, mask=nmask, other=0).to(tl.float32)
        c, s = _cos_sin_at(freq, p, rope_scale)
        return k_lo * c - k_hi * s, k_hi * c + k_lo * s

    @triton.jit
    def _load_q(q_ptr, sq_b, sq_h, sq_q, scaling, b, h, G: tl.constexpr, GP: tl.constexpr, Q: tl.constexpr,
                G0: tl.constexpr, HALF: tl.constexpr, DOT16: tl.constexpr):
        """The (scaled) query rows of KV head h: [GP, HALF] x 2; row g = query head h * G0 + g // Q, token g % Q."""
        g = tl.arange(0, GP)
        hq = h * G0 + g // Q
        row = q_ptr + b.to(tl.int64) * sq_b + hq.to(tl.int64) * sq_h + (g % Q) * sq_q
        dh = tl.arange(0, HALF)
        m = (g < G)[:, None]
        q_lo = tl.load(row[:, None] + dh[None, :], mask=m, other=0.0).to(tl.float32) * scaling
        q_hi = tl.load(row[:, None] + HALF + dh[None, :], mask=m, other=0.0).to(tl.float32) * scaling
        if DOT16:
            q_lo = q_lo.to(tl.float16)
            q_hi = q_hi.to(tl.float16)
        return q_lo, q_hi

    @triton.jit
    def _scores(q_lo, q_hi, k_lo, k_hi, slot, nmask, b, mask_ptr, sm_b, sm_q, sm_k, total, softcap, GP: tl.constexpr,
                Q: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
                DOT16: tl.constexpr):
        """Masked scores [GP, BN] of the query rows against keys k [HALF, BN] x 2 (-inf where not attended)."""
        s = _dot(q_lo, k_lo, tl.zeros([GP, k_lo.shape[1]], dtype=tl.float32), DOT16)
        s = _dot(q_hi, k_hi, s, DOT16)
        return _mask_scores(s, slot, nmask, b, mask_ptr, sm_b, sm_q, sm_k, total, softcap, GP, Q, MASK, CAUSAL,
                            SOFTCAP)

    # ------------------------------------------------------------------------------------ kernels
    @triton.jit
    def _nuq_split_kernel(
            q_ptr, sq_b, sq_h, sq_q, scaling,
            kw_ptr, sk_blk, sk_b, sk_h, sk_t, TK, klev_ptr, klev_h, ks_ptr, kz_ptr, ko_ptr, ko_pos, ko_val,
            vw_ptr, sv_blk, sv_b, sv_h, sv_t, TV, vlev_ptr, vlev_h, vs_ptr, vz_ptr, ss_blk, ss_b, ss_h, ss_t,
            vo_ptr, vo_pos, vo_val,
            pos_ptr, sp_b, sp_t, freq_ptr, rope_scale,
            mask_ptr, sm_b, sm_q, sm_k,
            acc_ptr, ml_ptr,
            N, B, H, start, total, split0, per_split, softcap,
            D: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, Q: tl.constexpr, G0: tl.constexpr,
            BITS_K: tl.constexpr, BITS_V: tl.constexpr, KO: tl.constexpr, VO: tl.constexpr, ROPE: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
            SOFTCAP: tl.constexpr, DOT16: tl.constexpr, BLOCK: tl.constexpr):
        """Partials of one (batch, KV head) x one split of a run of nuq blocks (keys per channel, values per token).

        Keys are channel-major tiles [HALF, BLOCK] (they feed tl.dot as is), values token-major [BLOCK, HALF]."""
        HALF: tl.constexpr = D // 2
        pid = tl.program_id(0)
        sp = tl.program_id(1)
        b = pid // H
        h = pid % H
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        q_lo, q_hi = _load_q(q_ptr, sq_b, sq_h, sq_q, scaling, b, h, G, GP, Q, G0, HALF, DOT16)
        klev = tl.load(klev_ptr + h * klev_h + tl.arange(0, 1 << BITS_K))
        dh = tl.arange(0, HALF)
        vlev = tl.load(vlev_ptr + h * vlev_h + tl.arange(0, 1 << BITS_V))
        freq = tl.load(freq_ptr + tl.arange(0, HALF)) if ROPE else tl.arange(0, HALF).to(tl.float32)
        pos_row = pos_ptr + b64 * sp_b
        m = tl.full([GP], float("-inf"), dtype=tl.float32)
        l = tl.zeros([GP], dtype=tl.float32)
        acc_lo = tl.zeros([HALF, GP], dtype=tl.float32)  # acc^T
        acc_hi = tl.zeros([HALF, GP], dtype=tl.float32)
        n_begin = sp * per_split
        n_end = tl.minimum(n_begin + per_split, N)
        for n0 in range(n_begin, n_end, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            nmask = n < n_end
            slot = start + n
            # keys [HALF, BLOCK] x 2: table lookups, outliers, RoPE; scores
            kb = (n // TK).to(tl.int64)
            kt = n % TK
            row = kb * sk_blk + b64 * sk_b + h64 * sk_h + kt * sk_t
            k_lo = _lookup(klev, _unpack(kw_ptr, row, nmask, 0, HALF, BITS_K, BLOCK), HALF, BLOCK)
            k_hi = _lookup(klev, _unpack(kw_ptr, row, nmask, 1, HALF, BITS_K, BLOCK), HALF, BLOCK)
            k_lo = k_lo * tl.load(ks_ptr + h * D + dh)[:, None] + tl.load(kz_ptr + h * D + dh)[:, None]
            k_hi = k_hi * tl.load(ks_ptr + h * D + HALF + dh)[:, None] + tl.load(kz_ptr + h * D + HALF + dh)[:, None]
            if KO == 1:  # rows (blk, b, t) over h * D + c: pointers per (row, head)
                k_lo, k_hi = _outliers(k_lo, k_hi, ko_ptr, ko_pos, ko_val, ((kb * B + b64) * TK + kt) * H + h64,
                                           nmask, h * D, HALF)
            if KO == 2:  # rows (blk, b, h, t) over c
                k_lo, k_hi = _outliers(k_lo, k_hi, ko_ptr, ko_pos, ko_val, ((kb * B + b64) * H + h64) * TK + kt,
                                           nmask, 0, HALF)
            if ROPE:
                k_lo, k_hi = _rope(k_lo, k_hi, pos_row, slot.to(tl.int64) * sp_t, nmask, freq, rope_scale)
            s = _scores(q_lo, q_hi, k_lo, k_hi, slot, nmask, b, mask_ptr, sm_b, sm_q, sm_k, total, softcap, GP, Q,
                        MASK, CAUSAL, SOFTCAP, DOT16)
            p, m, l, acc_lo, acc_hi = _softmax_step(s, m, l, acc_lo, acc_hi)
            # values [HALF, BLOCK] x 2: levels * scale + zero (per token), outliers; acc^T += v^T p^T
            vb = (n // TV).to(tl.int64)
            vt = n % TV
            row = vb * sv_blk + b64 * sv_b + h64 * sv_h + vt * sv_t
            srow = vb * ss_blk + b64 * ss_b + h64 * ss_h + vt * ss_t
            vs = tl.load(vs_ptr + srow, mask=nmask, other=0.0).to(tl.float32)[None, :]
            vz = tl.load(vz_ptr + srow, mask=nmask, other=0.0).to(tl.float32)[None, :]
            v_lo = _lookup(vlev, _unpack(vw_ptr, row, nmask, 0, HALF, BITS_V, BLOCK), HALF, BLOCK) * vs + vz
            v_hi = _lookup(vlev, _unpack(vw_ptr, row, nmask, 1, HALF, BITS_V, BLOCK), HALF, BLOCK) * vs + vz
            if VO == 1:
                v_lo, v_hi = _outliers(v_lo, v_hi, vo_ptr, vo_pos, vo_val, ((vb * B + b64) * TV + vt) * H + h64,
                                       nmask, h * D, HALF)
            if VO == 2:
                v_lo, v_hi = _outliers(v_lo, v_hi, vo_ptr, vo_pos, vo_val, ((vb * B + b64) * H + h64) * TV + vt,
                                       nmask, 0, HALF)
            acc_lo = _dot(v_lo, p, acc_lo, DOT16)
            acc_hi = _dot(v_hi, p, acc_hi, DOT16)
        _store_partial(acc_ptr, ml_ptr, split0 + sp, pid, B * H, m, l, acc_lo, acc_hi, GP, HALF)

    @triton.jit
    def _dense_split_kernel(
            q_ptr, sq_b, sq_h, sq_q, scaling,
            k_ptr, sk_b, sk_h, sk_t, v_ptr, sv_b, sv_h, sv_t,
            pos_ptr, sp_b, sp_t, freq_ptr, rope_scale,
            mask_ptr, sm_b, sm_q, sm_k,
            acc_ptr, ml_ptr,
            N, B, H, start, total, split0, per_split, softcap,
            D: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, Q: tl.constexpr, G0: tl.constexpr,
            ROPE: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
            DOT16: tl.constexpr, BLOCK: tl.constexpr):
        """Partials of one (batch, KV head) x one split of unquantized tokens k, v [B, H, N, D] (the sink, the window)."""
        HALF: tl.constexpr = D // 2
        pid = tl.program_id(0)
        sp = tl.program_id(1)
        b = pid // H
        h = pid % H
        q_lo, q_hi = _load_q(q_ptr, sq_b, sq_h, sq_q, scaling, b, h, G, GP, Q, G0, HALF, DOT16)
        dh = tl.arange(0, HALF)
        freq = tl.load(freq_ptr + dh) if ROPE else dh.to(tl.float32)
        pos_row = pos_ptr + b.to(tl.int64) * sp_b
        kbase = k_ptr + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
        vbase = v_ptr + b.to(tl.int64) * sv_b + h.to(tl.int64) * sv_h
        m = tl.full([GP], float("-inf"), dtype=tl.float32)
        l = tl.zeros([GP], dtype=tl.float32)
        acc_lo = tl.zeros([HALF, GP], dtype=tl.float32)  # acc^T
        acc_hi = tl.zeros([HALF, GP], dtype=tl.float32)
        n_begin = sp * per_split
        n_end = tl.minimum(n_begin + per_split, N)
        for n0 in range(n_begin, n_end, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            nmask = n < n_end
            slot = start + n
            kp = kbase + n.to(tl.int64)[None, :] * sk_t + dh[:, None]
            k_lo = tl.load(kp, mask=nmask[None, :], other=0.0).to(tl.float32)
            k_hi = tl.load(kp + HALF, mask=nmask[None, :], other=0.0).to(tl.float32)
            if ROPE:
                k_lo, k_hi = _rope(k_lo, k_hi, pos_row, slot.to(tl.int64) * sp_t, nmask, freq, rope_scale)
            s = _scores(q_lo, q_hi, k_lo, k_hi, slot, nmask, b, mask_ptr, sm_b, sm_q, sm_k, total, softcap, GP, Q,
                        MASK, CAUSAL, SOFTCAP, DOT16)
            p, m, l, acc_lo, acc_hi = _softmax_step(s, m, l, acc_lo, acc_hi)
            vp = vbase + n.to(tl.int64)[None, :] * sv_t + dh[:, None]
            acc_lo = _dot(tl.load(vp, mask=nmask[None, :], other=0.0).to(tl.float32), p, acc_lo, DOT16)
            acc_hi = _dot(tl.load(vp + HALF, mask=nmask[None, :], other=0.0).to(tl.float32), p, acc_hi, DOT16)
        _store_partial(acc_ptr, ml_ptr, split0 + sp, pid, B * H, m, l, acc_lo, acc_hi, GP, HALF)

    @triton.jit
    def _reduce_kernel(acc_ptr, ml_ptr, out_ptr, so_b, so_h, so_q, S, BH, H,
                       D: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, Q: tl.constexpr, G0: tl.constexpr):
        """Combine the S partials of one (batch, KV head) into out[b, h * G0 + g // Q, g % Q, :] (strided)."""
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        big = tl.full([GP], float("-inf"), dtype=tl.float32)
        for s in range(0, S):
            big = tl.maximum(big, tl.load(ml_ptr + (s * BH + pid).to(tl.int64) * 2 * GP + g))
        big = tl.where(big == float("-inf"), 0.0, big)
        total = tl.zeros([GP], dtype=tl.float32)
        out = tl.zeros([GP, D], dtype=tl.float32)
        for s in range(0, S):
            cell = (s * BH + pid).to(tl.int64)
            w = tl.exp(tl.load(ml_ptr + cell * 2 * GP + g) - big)
            total += w * tl.load(ml_ptr + cell * 2 * GP + GP + g)
            out += w[:, None] * tl.load(acc_ptr + (cell * GP + g)[:, None] * D + d[None, :])
        out = out / tl.where(total > 0, total, 1.0)[:, None]
        hq = h * G0 + g // Q
        optr = out_ptr + b.to(tl.int64) * so_b + hq.to(tl.int64) * so_h + (g % Q).to(tl.int64) * so_q
        tl.store(optr[:, None] + d[None, :], out, mask=(g < G)[:, None])


    SPLIT_KERNELS = {"nuq": _nuq_split_kernel, "mixed": triton_mixed._mixed_split_kernel, "tq": triton_tq._tq_split_kernel,
                     "dense": _dense_split_kernel}


# ---------------------------------------------------------------------------------------------- host side
@dataclass
class Problem:
    """Shapes and per-call arguments shared by every segment launch of one layer call."""

    batch: int
    heads: int
    groups: int  # G = query heads per KV head x query tokens
    gp: int  # G padded to a power of two >= 16
    queries: int
    per_head: int  # query heads per KV head
    dim: int
    total: int  # stored tokens of the layer
    q: torch.Tensor  # [B, Hq, Q, D]
    scaling: float
    softcap: float
    positions: torch.Tensor | None  # int32 [B, >= total]
    inv_freq: torch.Tensor | None  # fp32 [D / 2]
    rope_scaling: float
    mask: tuple  # (tensor, sm_b, sm_q, sm_k, kind 0/1/2)
    causal: bool
    dot16: bool


def _outlier_args(run, view: NuqView) -> tuple[list, int]:
    """([cell pointers, positions, values], mode 0/1/2) of a run's outliers."""
    o = view.outliers
    if o is None or o.values.numel() == 0:
        dummy = view.codes.new_zeros(1, dtype=torch.int32)
        return [dummy, dummy, dummy], 0
    return [_cell_pointers(run, view), o.positions, o.values], o.mode


def _words(view: NuqView) -> tuple[torch.Tensor, list[int]] | None:
    """Codes as int32 words [nblk, B, H, T, W] and their strides (in words), or None if rows are not whole words."""
    codes = view.codes
    if codes.shape[-1] % 4 or codes.data_ptr() % 4 or codes.stride(-1) != 1 or any(s % 4 for s in codes.stride()[:4]):
        return None
    words = codes.view(torch.int32)
    return words, [words.stride(i) for i in range(4)]


def _unpackable(dim: int, bits: int) -> bool:
    """A half row of codes is whole words (bits dividing 32) or whole 3-word chunks of 32 codes (3 bits)."""
    if bits not in SUPPORTED_BITS:
        return False
    return (dim // 2) % (32 if bits == 3 else 32 // bits) == 0


def _levels(view: NuqView) -> tuple[torch.Tensor, int]:
    return view.levels, view.levels.shape[1] if view.levels.shape[0] > 1 else 0


def _nuq_pair_args(k_run, v_run, key_codec, value_codec, pb: Problem) -> tuple[list, dict] | None:
    """Launch arguments of a (keys run, values run) pair covering the same tokens, or None if no kernel fits."""
    kv, vv = nuq_view(k_run, key_codec), nuq_view(v_run, value_codec)
    if kv is None or vv is None or kv.axis != "channel" or vv.axis != "token":
        return None
    for view in (kv, vv):
        if (view.heads, view.dim, view.batch) != (pb.heads, pb.dim, pb.batch) or not _unpackable(view.dim, view.bits):
            return None
    kw, vw = _words(kv), _words(vv)
    if kw is None or vw is None:
        return None
    klev, klev_h = _levels(kv)
    vlev, vlev_h = _levels(vv)
    ko, ko_mode = _outlier_args(k_run, kv)
    vo, vo_mode = _outlier_args(v_run, vv)
    ss = list(vv.vscale.stride())
    if vv.vscale.shape[2] == 1:
        ss[2] = 0
    args = [kw[0], *kw[1], kv.tokens, klev, klev_h, kv.kscale, kv.kzero, *ko,
            vw[0], *vw[1], vv.tokens, vlev, vlev_h, vv.vscale, vv.vzero, *ss, *vo]
    consts = dict(BITS_K=kv.bits, BITS_V=vv.bits, KO=ko_mode, VO=vo_mode)
    return args, consts


def _segments(k_stream, v_stream, key_codec, value_codec, pb: Problem) -> list[tuple] | None:
    """[(kind, tokens, args, constexprs)] covering the layer's tokens in order, or None if a part has no kernel."""
    segs = []
    if k_stream.head_len != v_stream.head_len or k_stream.tail_len != v_stream.tail_len:
        return None
    if k_stream.head is not None:
        segs.append(("dense", k_stream.head_len, [k_stream.head, *k_stream.head.stride()[:3], v_stream.head,
                                                  *v_stream.head.stride()[:3]], {}))
    k_runs = [r for r in k_stream.body.runs if r.count]
    v_runs = [r for r in v_stream.body.runs if r.count]
    if len(k_runs) != len(v_runs):
        return None
    for k_run, v_run in zip(k_runs, v_runs):
        if k_run.tokens != v_run.tokens:
            return None
        pair = _nuq_pair_args(k_run, v_run, key_codec, value_codec, pb)
        kind = "nuq"
        if pair is None:
            pair, kind = triton_mixed.pair_args(k_run, v_run, key_codec, value_codec, pb), "mixed"
        if pair is None:
            pair, kind = triton_tq.pair_args(k_run, v_run, key_codec, value_codec, pb), "tq"
        if pair is None:
            return None
        segs.append((kind, k_run.tokens, *pair))
    if k_stream.tail is not None:
        segs.append(("dense", k_stream.tail_len, [k_stream.tail, *k_stream.tail.stride()[:3], v_stream.tail,
                                                  *v_stream.tail.stride()[:3]], {}))
    for kind, _, args, _ in segs:
        if kind == "dense" and (args[0].shape[1] != pb.heads or args[0].shape[-1] != pb.dim or args[0].stride(-1) != 1
                                or args[4].stride(-1) != 1):
            return None
    return segs


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _split_tokens(pb: Problem, device: torch.device, split_tokens: int | None) -> int:
    """Tokens per split (a multiple of BLOCK_N): enough programs to fill the device, from shapes only."""
    if split_tokens is not None:
        return max(BLOCK_N, -(-split_tokens // BLOCK_N) * BLOCK_N)
    splits = max(1, -(-_target_programs(device) // (pb.batch * pb.heads)))
    per = -(-pb.total // splits)
    return max(BLOCK_N, -(-per // BLOCK_N) * BLOCK_N)


def _mask_args(mask: torch.Tensor | None, queries: int, total: int, device) -> tuple | None:
    """(tensor, stride b, stride q, stride k, kind) of a [B | 1, 1, Q | 1, >= total] mask: kind 1 bool, 2 additive."""
    if mask is None:
        return (torch.zeros(1, dtype=torch.float32, device=device), 0, 0, 0, 0)
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] < total or mask.shape[2] not in (1, queries):
        return None
    m = mask[..., mask.shape[-1] - total:]
    if m.dtype == torch.bool:
        m, kind = m.view(torch.uint8), 1
    elif m.dtype.is_floating_point:
        kind = 2
    else:
        return None
    return (m, m.stride(0) if m.shape[0] > 1 else 0, m.stride(2) if m.shape[2] > 1 else 0, m.stride(3), kind)


def stream_attention(k_stream, v_stream, key_codec, value_codec, query: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float, softcap: float | None = None, positions: torch.Tensor | None = None,
                     inv_freq: torch.Tensor | None = None, rope_scaling: float = 1.0, dot16: bool | None = None,
                     split_tokens: int | None = None) -> torch.Tensor | None:
    """Attention of query [B, Hq, Q, D] over the tokens of two TokenStreams (keys, values): [B, Q, Hq, D] in query's
    dtype, or None when a part has no kernel (the caller then takes another path).

    positions int32 [B, >= stored] (the stored tokens' positions, slot order) and inv_freq fp32 [D / 2] for keys
    stored before RoPE (None: keys are stored post-RoPE); rope_scaling multiplies cos and sin (attention scaling).
    mask: None (causal when Q > 1) or [B | 1, 1, Q | 1, >= stored], bool (True = attend) or additive float.
    """
    if not available():
        return None
    batch, hq, queries, dim = query.shape
    total = k_stream.stored
    heads = _kv_heads(k_stream)
    if heads is None or hq % heads or total == 0 or v_stream.stored != total:
        return None
    per_head = hq // heads
    groups = per_head * queries
    if dim < 32 or dim & (dim - 1) or dim > 128 or groups > MAX_GROUPS:
        return None
    rope = positions is not None
    if rope and (inv_freq is None or inv_freq.numel() * 2 != dim or positions.shape[-1] < total):
        return None
    margs = _mask_args(mask, queries, total, query.device)
    if margs is None:
        return None
    pb = Problem(batch, heads, groups, max(16, _pow2(groups)), queries, per_head, dim, total, query, float(scaling),
                 float(softcap or 0.0), positions, inv_freq, float(rope_scaling), margs,
                 mask is None and queries > 1, query.is_cuda if dot16 is None else dot16)
    segs = _segments(k_stream, v_stream, key_codec, value_codec, pb)
    if segs is None:
        return None
    return _launch(pb, segs, _split_tokens(pb, query.device, split_tokens))


def _kv_heads(stream) -> int | None:
    for t in (stream.head, stream.tail):
        if t is not None:
            return t.shape[1]
    for run in stream.body.runs:
        return run.block_shape[1]
    return None


def _launch(pb: Problem, segs: list, per: int) -> torch.Tensor:
    """Run every segment's split kernel, then the reduction; returns [B, Q, Hq, D]."""
    dev = pb.q.device
    bh = pb.batch * pb.heads
    counts = [-(-tokens // per) for _, tokens, _, _ in segs]
    total_splits = sum(counts)
    acc = torch.empty(total_splits, bh, pb.gp, pb.dim, dtype=torch.float32, device=dev)
    ml = torch.empty(total_splits, bh, 2, pb.gp, dtype=torch.float32, device=dev)
    q = pb.q
    dummy = torch.zeros(1, dtype=torch.float32, device=dev)
    if pb.positions is not None:
        pos, sp_b, sp_t = pb.positions, pb.positions.stride(0), pb.positions.stride(1)
        freq = pb.inv_freq.to(device=dev, dtype=torch.float32).contiguous()
    else:
        pos, sp_b, sp_t, freq = dummy.to(torch.int32), 0, 0, dummy
    mask_t, sm_b, sm_q, sm_k, mask_kind = pb.mask
    head = [q, q.stride(0), q.stride(1), q.stride(2), pb.scaling]
    rope = [pos, sp_b, sp_t, freq, pb.rope_scaling]
    tail = [mask_t, sm_b, sm_q, sm_k, acc, ml]
    common = dict(D=pb.dim, G=pb.groups, GP=pb.gp, Q=pb.queries, G0=pb.per_head, MASK=mask_kind, CAUSAL=pb.causal,
                  SOFTCAP=pb.softcap > 0, DOT16=pb.dot16)
    start = split0 = 0
    for (kind, tokens, args, consts), splits in zip(segs, counts):
        sizes = [tokens, pb.batch, pb.heads, start, pb.total, split0, per, pb.softcap]
        kernel = SPLIT_KERNELS[kind]
        launch = dict(triton_mixed.launch(pb.dim) if kind in ("mixed", "tq") else split_launch(pb.dim), BLOCK=NUQ_BLOCK)
        if kind == "tq":  # its own (rotated) query first; keys post-RoPE: no RoPE arguments
            kernel[(bh, splits)](*args, *tail, *sizes, **consts, **common, **launch)
        else:
            kernel[(bh, splits)](*head, *args, *rope, *tail, *sizes, **consts, **common, ROPE=pb.positions is not None,
                                 **launch)
        start += tokens
        split0 += splits
    out = torch.empty(pb.batch, pb.queries, pb.heads * pb.per_head, pb.dim, dtype=q.dtype, device=dev)
    _reduce_kernel[(bh,)](acc, ml, out, out.stride(0), out.stride(2), out.stride(1), total_splits, bh, pb.heads,
                          D=pb.dim, G=pb.groups, GP=pb.gp, Q=pb.queries, G0=pb.per_head, **REDUCE_LAUNCH)
    return out


def layer_attention(layer, query: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                    softcap: float | None = None, positions: torch.Tensor | None = None,
                    inv_freq: torch.Tensor | None = None, rope_scaling: float = 1.0) -> torch.Tensor | None:
    """One CompressedLayer's decode-step attention: query [B, Hq, Q, D] -> [B, Q, Hq, D] (query's dtype), or None.

    Keys stored before RoPE: positions int32 [B, >= stored] of the layer's stored tokens (slot order, from the
    layer's first slot), inv_freq fp32 [D / 2] and rope_scaling (the rotary module's `inv_freq` and
    `attention_scaling`). Keys stored post-RoPE: positions None. See `stream_attention`.
    """
    return stream_attention(layer.k, layer.v, layer.key_codec, layer.value_codec, query, mask, scaling, softcap,
                            positions, inv_freq, rope_scaling)


# ---------------------------------------------------------------------------------------------- ahead of time
# Compiling for a GPU needs no GPU: triton.compile with a GPUTarget runs Triton's passes and the bundled ptxas.
# `aot_stats` reports what ptxas allocated (registers, spills, stack, shared memory) per kernel and target.
POINTER_TYPES = {  # argument name -> pointee type for signatures; other `*_ptr` arguments are fp32
    "kw_ptr": "i32", "vw_ptr": "i32", "ko_ptr": "i32", "vo_ptr": "i32", "ko_pos": "i16", "vo_pos": "i16",
    "ko_val": "fp16", "vo_val": "fp16", "vs_ptr": "fp16", "vz_ptr": "fp16", "pos_ptr": "i32", "k_ptr": "fp16",
    "v_ptr": "fp16", "codes_ptr": "u8", "ent_b": "i32", "ent_h": "i32", "ent_c": "i32", "ent_n": "i32",
    "val_ptr": "fp16", "inv_ptr": "i32", "scale_ptr": "fp16",
    **{f"{side}c{i}": "u8" for side in "kv" for i in range(8)},  # mixed widths: one codes tensor per width
    "kmeta_ptr": "i32", "vmeta_ptr": "i32", "kinv_ptr": "i32", "vinv_ptr": "i32", "kn_ptr": "fp16", "vn_ptr": "fp16",
}
FLOAT_SCALARS = {"scaling", "rope_scale", "softcap"}


def signature(fn, constexprs: dict) -> dict[str, str]:
    """Triton signature of a @triton.jit function: pointers by POINTER_TYPES, float scalars, i32 otherwise."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in POINTER_TYPES:
            sig[name] = "*" + POINTER_TYPES[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return sig


def _ptxas_stats(ptx: str, arch: int) -> dict:
    """Run the bundled ptxas -v on `ptx` as Triton does for `arch`; parse registers, spills, stack, shared memory."""

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/k.ptx"
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}", src,
               "-o", f"{tmp}/k.cubin"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr

    return _parse_ptxas(log)


def _parse_ptxas(log: str) -> dict:
    """registers, spill stores/loads, stack frame (bytes) and ptxas-reported smem from a `ptxas -v` log."""

    def grab(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return {"registers": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"), "stack": grab(r"(\d+) bytes stack frame"),
            "ptxas_smem": grab(r"(\d+) bytes smem")}


def aot_stats(fn, constexprs: dict, arch: int, num_warps: int = 4, num_stages: int = 1,
              maxnreg: int | None = None) -> dict:
    """Compile `fn` for sm_`arch` (80, 90, ...) without a GPU; registers, spills and shared memory per thread block.

    ptxas's own log is captured when Triton runs it; a kernel from Triton's cache is re-assembled with ptxas -v."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg:
        options["maxnreg"] = maxnreg
    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(ASTSource(fn, signature(fn, constexprs), constexprs),
                                target=GPUTarget("cuda", arch, 32), options=options)
    stats = _parse_ptxas(log.getvalue())
    if not stats["registers"]:
        stats = _ptxas_stats(kernel.asm["ptx"], arch)
    stats.update(shared=kernel.metadata.shared, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg,
                 tl_dot="mma" in kernel.asm["ptx"])
    return stats


def aot_available() -> tuple[bool, str]:
    """(True, "") when Triton and its bundled ptxas can compile for sm_80/sm_90 here, else (False, why)."""
    if not HAVE_TRITON:
        return False, "triton is not installed"
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas

        for arch in (80, 90):
            path = get_ptxas(arch).path
            if not path:
                return False, f"no ptxas for sm_{arch}"
    except Exception as exc:  # noqa: BLE001 - any failure means: cannot compile here
        return False, f"triton's CUDA backend or bundled ptxas unavailable: {exc}"
    return True, ""


REDUCE_LAUNCH = {"num_warps": 4, "num_stages": 1}
WIDTH_KERNELS = ("nuq_split",)  # kernels compiled per bit width


def split_launch(dim: int) -> dict:
    """Launch options of the split kernels: head_dim <= 64 fits 4 warps (~100 registers); 128 takes 8 warps capped
    at 128 registers (two programs per SM); checked free of spills by tests/test_triton_compile.py."""
    if dim <= 64:
        return {"num_warps": 4, "num_stages": 1}
    return {"num_warps": 8, "num_stages": 1, "maxnreg": 128}


def kernel_configs(dim: int, bits: int, groups: int = 16, queries: int = 1) -> dict[str, tuple]:
    """Representative (function, constexprs, launch options) of every decode kernel for a head_dim and bit width."""
    gp = max(16, _pow2(groups))
    shape = dict(D=dim, G=groups, GP=gp, Q=queries, G0=groups // queries)
    step = dict(ROPE=True, MASK=0, CAUSAL=False, SOFTCAP=False, DOT16=True)
    return {
        "nuq_split": (_nuq_split_kernel, {**shape, **step, "BITS_K": bits, "BITS_V": bits, "KO": 1, "VO": 1,
                                          "BLOCK": NUQ_BLOCK}, split_launch(dim)),
        "mixed_split": (triton_mixed._mixed_split_kernel, {**shape, **step, "KO": 1, "VO": 1, "BLOCK": NUQ_BLOCK},
                        triton_mixed.launch(dim)),
        "tq_split": (triton_tq._tq_split_kernel, {**shape, **{k: v for k, v in step.items() if k != "ROPE"},
                                                  "BLOCK": NUQ_BLOCK}, triton_mixed.launch(dim)),
        "dense_split": (_dense_split_kernel, {**shape, **step, "BLOCK": NUQ_BLOCK}, split_launch(dim)),
        "reduce": (_reduce_kernel, shape, REDUCE_LAUNCH),
    }


def aot_rows(dims=(64, 128), bits=(2, 3, 4), groups=((4, 1),), archs=(80, 90), kernels=None) -> list[dict]:
    """Compile stats of the decode kernels for every (head_dim, bits, (G, Q), arch); `kernels` filters by name.
    The bit width only changes nuq_split (mixed_split and tq_split read their widths at run time; the other
    kernels are compiled once per head_dim and group)."""
    rows = []
    for dim in dims:
        for g, q in groups:
            for b in bits:
                for name, (fn, consts, launch) in kernel_configs(dim, b, g, q).items():
                    if (kernels and name not in kernels) or (name not in WIDTH_KERNELS and b != bits[0]):
                        continue
                    for arch in archs:
                        stats = aot_stats(fn, consts, arch, **launch)
                        rows.append({"kernel": name, "target": f"sm_{arch}", "head_dim": dim,
                                     "bits": b if name in WIDTH_KERNELS else None, "groups": g, "padded_groups":
                                     consts["GP"], "block_tokens": consts.get("BLOCK"), **stats})
    return rows
