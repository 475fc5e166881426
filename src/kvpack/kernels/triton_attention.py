"""Triton kernels for decode-step attention over packed KV blocks (GPU; tested on CPU with TRITON_INTERPRET=1).

Same contract as the C++ CPU path, one run of blocks at a time (see kernels.layout):
  key_scores(run, codec, q, rope, out)  out[b, h, g, n] = q[b, h, g] . RoPE(k_n)   q [B, H, G, D] fp32
  value_accum(run, codec, p, out)       out[b, h, g]   += p[b, h, g, n] . v_n     out [B, H, G, D] fp32
Both return False when the run has no kernel here (the caller then uses the torch reference).

nuq (KVQuant) keys: a program takes BLOCK_N tokens of one (batch, KV head): unpacks the codes of
channel halves [0, D/2) and [D/2, D) (codes straddling a byte boundary read two bytes), looks the
levels up, applies the per-channel scale/zero, rotates the pair with the compact RoPE rows and
reduces against the G query rows. Sparse outliers then add (value - dequantized) * (R^T q)_c with
atomics (second launch over the nonzeros). nuq values: split-K programs accumulate
p . (scale * level + zero) into partial sums, outliers likewise. rvq: per channel, the code of its
group and stage is unpacked (any code width up to 16 bits), codewords summed over the stages,
scaled, rotated, reduced. RVQ outliers are not handled here (reference path).

Importing this module never needs triton; `available()` says whether the kernels can run.
`layer_attention` (kernels.triton_decode) is the one-call-per-layer split-K path that supersedes these
two per-run entry points for nuq, mixed-width nuq (kvpack presets) and TurboQuant caches.
"""
from __future__ import annotations

import os

import torch

from kvpack.kernels.layout import NuqView, RvqView, nuq_view, rvq_view

try:  # triton is optional (GPU extra)
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = tl = None
    HAVE_TRITON = False

BLOCK_N = 32


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """Triton importable and a CUDA device to run on (or the interpreter, for tests)."""
    return HAVE_TRITON and (torch.cuda.is_available() or interpreting())


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if HAVE_TRITON:

    @triton.jit
    def _nuq_levels(row, d, nmask, lev, BITS: tl.constexpr):
        """Decoded levels of channels d [C] for token rows `row` [N] (pointers): [N, C] fp32."""
        bit = d * BITS
        byte = bit // 8
        shift = bit % 8
        m2 = nmask[:, None] & (d[None, :] >= 0)
        word = tl.load(row[:, None] + byte[None, :], mask=m2, other=0).to(tl.int32)
        if 8 % BITS != 0:  # a code may continue in the next byte
            nxt = tl.load(row[:, None] + byte[None, :] + 1, mask=m2 & ((shift + BITS) > 8)[None, :], other=0)
            word = word | (nxt.to(tl.int32) << 8)
        code = (word >> shift[None, :]) & ((1 << BITS) - 1)
        return tl.load(lev + code)

    @triton.jit
    def _nuq_keys_kernel(q_ptr, sq_b, sq_h, sq_g, codes_ptr, sc_blk, sc_b, sc_h, sc_t, lev_ptr, lev_h, ks_ptr, kz_ptr,
                         cos_ptr, sin_ptr, sr_b, sr_t, out_ptr, so_b, so_h, so_g, N, T, H,
                         D: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, BITS: tl.constexpr, ROPE: tl.constexpr,
                         BLOCK: tl.constexpr):
        HALF: tl.constexpr = D // 2
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        nmask = n < N
        row = codes_ptr + (n // T) * sc_blk + b * sc_b + h * sc_h + (n % T) * sc_t
        d = tl.arange(0, HALF)
        lev = lev_ptr + h * lev_h
        ks = ks_ptr + h * D
        kz = kz_ptr + h * D
        lo = _nuq_levels(row, d, nmask, lev, BITS) * tl.load(ks + d)[None, :] + tl.load(kz + d)[None, :]
        hi = _nuq_levels(row, d + HALF, nmask, lev, BITS) * tl.load(ks + HALF + d)[None, :] + tl.load(kz + HALF + d)[None, :]
        if ROPE:
            rp = b * sr_b + n[:, None] * sr_t + d[None, :]
            c = tl.load(cos_ptr + rp, mask=nmask[:, None], other=0.0)
            s = tl.load(sin_ptr + rp, mask=nmask[:, None], other=0.0)
            lo, hi = lo * c - hi * s, hi * c + lo * s
        g = tl.arange(0, GP)
        gmask = g < G
        qp = q_ptr + b * sq_b + h * sq_h + g[:, None] * sq_g + d[None, :]
        q_lo = tl.load(qp, mask=gmask[:, None], other=0.0)
        q_hi = tl.load(qp + HALF, mask=gmask[:, None], other=0.0)
        score = tl.sum(q_lo[:, None, :] * lo[None, :, :], axis=2) + tl.sum(q_hi[:, None, :] * hi[None, :, :], axis=2)
        optr = out_ptr + b * so_b + h * so_h + g[:, None] * so_g + n[None, :]
        tl.store(optr, score, mask=gmask[:, None] & nmask[None, :])

    @triton.jit
    def _nuq_key_outliers_kernel(q_ptr, sq_b, sq_h, sq_g, codes_ptr, sc_blk, sc_b, sc_h, sc_t, lev_ptr, lev_h, ks_ptr,
                                 kz_ptr, cos_ptr, sin_ptr, sr_b, sr_t, out_ptr, so_b, so_h, so_g, ent_b, ent_h, ent_c,
                                 ent_n, val_ptr, NNZ, T, D: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                                 BITS: tl.constexpr, ROPE: tl.constexpr, BLOCK: tl.constexpr):
        HALF: tl.constexpr = D // 2
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        jm = j < NNZ
        b = tl.load(ent_b + j, mask=jm, other=0)
        h = tl.load(ent_h + j, mask=jm, other=0)
        c = tl.load(ent_c + j, mask=jm, other=0)
        n = tl.load(ent_n + j, mask=jm, other=0)
        value = tl.load(val_ptr + j, mask=jm, other=0.0).to(tl.float32)
        row = codes_ptr + (n // T) * sc_blk + b * sc_b + h * sc_h + (n % T) * sc_t
        bit = c * BITS
        word = tl.load(row + bit // 8, mask=jm, other=0).to(tl.int32)
        if 8 % BITS != 0:
            nxt = tl.load(row + bit // 8 + 1, mask=jm & ((bit % 8 + BITS) > 8), other=0)
            word = word | (nxt.to(tl.int32) << 8)
        code = (word >> (bit % 8)) & ((1 << BITS) - 1)
        deq = tl.load(lev_ptr + h * lev_h + code, mask=jm, other=0.0) * tl.load(ks_ptr + h * D + c, mask=jm, other=0.0) \
            + tl.load(kz_ptr + h * D + c, mask=jm, other=0.0)
        delta = value - deq
        g = tl.arange(0, GP)
        m2 = jm[:, None] & (g < G)[None, :]
        qrow = q_ptr + b[:, None] * sq_b + h[:, None] * sq_h + g[None, :] * sq_g
        qc = tl.load(qrow + c[:, None], mask=m2, other=0.0)
        if ROPE:
            lowhalf = c < HALF
            i = tl.where(lowhalf, c, c - HALF)
            partner = tl.where(lowhalf, c + HALF, c - HALF)
            cs = tl.load(cos_ptr + b * sr_b + n * sr_t + i, mask=jm, other=0.0)
            sn = tl.load(sin_ptr + b * sr_b + n * sr_t + i, mask=jm, other=0.0)
            qp = tl.load(qrow + partner[:, None], mask=m2, other=0.0)
            sign = tl.where(lowhalf, 1.0, -1.0)
            qc = qc * cs[:, None] + sign[:, None] * qp * sn[:, None]
        optr = out_ptr + b[:, None] * so_b + h[:, None] * so_h + g[None, :] * so_g + n[:, None]
        tl.atomic_add(optr, qc * delta[:, None], mask=m2)

    @triton.jit
    def _nuq_values_kernel(p_ptr, sp_b, sp_h, sp_g, codes_ptr, sc_blk, sc_b, sc_h, sc_t, lev_ptr, lev_h, vs_ptr,
                           vz_ptr, sv_blk, sv_b, sv_h, sv_t, part_ptr, N, T, H, PER_SPLIT,
                           D: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, BITS: tl.constexpr,
                           BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // H
        h = pid % H
        d = tl.arange(0, D)
        g = tl.arange(0, GP)
        gmask = g < G
        acc = tl.zeros([GP, D], dtype=tl.float32)
        lev = lev_ptr + h * lev_h
        start = split * PER_SPLIT
        for n0 in range(start, start + PER_SPLIT, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            nmask = n < N
            row = codes_ptr + (n // T) * sc_blk + b * sc_b + h * sc_h + (n % T) * sc_t
            level = _nuq_levels(row, d, nmask, lev, BITS)
            sptr = (n // T) * sv_blk + b * sv_b + h * sv_h + (n % T) * sv_t
            scale = tl.load(vs_ptr + sptr, mask=nmask, other=0.0).to(tl.float32)
            zero = tl.load(vz_ptr + sptr, mask=nmask, other=0.0).to(tl.float32)
            v = level * scale[:, None] + zero[:, None]
            p = tl.load(p_ptr + b * sp_b + h * sp_h + g[:, None] * sp_g + n[None, :],
                        mask=gmask[:, None] & nmask[None, :], other=0.0)
            acc += tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        pptr = part_ptr + ((split * tl.num_programs(0) + pid) * GP + g[:, None]) * D + d[None, :]
        tl.store(pptr, acc)

    @triton.jit
    def _nuq_value_outliers_kernel(p_ptr, sp_b, sp_h, sp_g, codes_ptr, sc_blk, sc_b, sc_h, sc_t, lev_ptr, lev_h,
                                   vs_ptr, vz_ptr, sv_blk, sv_b, sv_h, sv_t, out_ptr, so_b, so_h, so_g, ent_b, ent_h,
                                   ent_c, ent_n, val_ptr, NNZ, T, D: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                                   BITS: tl.constexpr, BLOCK: tl.constexpr):
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        jm = j < NNZ
        b = tl.load(ent_b + j, mask=jm, other=0)
        h = tl.load(ent_h + j, mask=jm, other=0)
        c = tl.load(ent_c + j, mask=jm, other=0)
        n = tl.load(ent_n + j, mask=jm, other=0)
        value = tl.load(val_ptr + j, mask=jm, other=0.0).to(tl.float32)
        row = codes_ptr + (n // T) * sc_blk + b * sc_b + h * sc_h + (n % T) * sc_t
        bit = c * BITS
        word = tl.load(row + bit // 8, mask=jm, other=0).to(tl.int32)
        if 8 % BITS != 0:
            nxt = tl.load(row + bit // 8 + 1, mask=jm & ((bit % 8 + BITS) > 8), other=0)
            word = word | (nxt.to(tl.int32) << 8)
        code = (word >> (bit % 8)) & ((1 << BITS) - 1)
        sptr = (n // T) * sv_blk + b * sv_b + h * sv_h + (n % T) * sv_t
        deq = tl.load(lev_ptr + h * lev_h + code, mask=jm, other=0.0) * tl.load(vs_ptr + sptr, mask=jm, other=0.0).to(tl.float32) \
            + tl.load(vz_ptr + sptr, mask=jm, other=0.0).to(tl.float32)
        g = tl.arange(0, GP)
        m2 = jm[:, None] & (g < G)[None, :]
        p = tl.load(p_ptr + b[:, None] * sp_b + h[:, None] * sp_h + g[None, :] * sp_g + n[:, None], mask=m2, other=0.0)
        optr = out_ptr + b[:, None] * so_b + h[:, None] * so_h + g[None, :] * so_g + c[:, None]
        tl.atomic_add(optr, p * (value - deq)[:, None], mask=m2)

    @triton.jit
    def _rvq_decode(row, c, nmask, inv_ptr, books_ptr, RB, PERM: tl.constexpr, DEPTH: tl.constexpr, C: tl.constexpr,
                    GS: tl.constexpr, CBITS: tl.constexpr, NB: tl.constexpr, CH: tl.constexpr):
        """Sum over stages of the codewords of channels c [CH] for token rows `row` [N]: [N, CH] fp32 (unscaled)."""
        if PERM:
            m = tl.load(inv_ptr + c)
        else:
            m = c
        grp = m // GS
        e = m % GS
        m2 = nmask[:, None] & (c[None, :] >= 0)
        acc = tl.zeros([NB, CH], dtype=tl.float32)
        for s in tl.static_range(DEPTH):
            bit = (grp * DEPTH + s) * CBITS
            byte = bit // 8
            word = tl.load(row[:, None] + byte[None, :], mask=m2, other=0).to(tl.int32)
            word = word | (tl.load(row[:, None] + byte[None, :] + 1, mask=m2 & (byte + 1 < RB)[None, :], other=0).to(tl.int32) << 8)
            word = word | (tl.load(row[:, None] + byte[None, :] + 2, mask=m2 & (byte + 2 < RB)[None, :], other=0).to(tl.int32) << 16)
            code = (word >> (bit % 8)[None, :]) & ((1 << CBITS) - 1)
            acc += tl.load(books_ptr + (s * C + code) * GS + e[None, :], mask=m2, other=0.0)
        return acc

    @triton.jit
    def _rvq_keys_kernel(q_ptr, sq_b, sq_h, sq_g, codes_ptr, sc_blk, sc_b, sc_h, sc_t, RB, scale_ptr, ss_blk, ss_b,
                         ss_h, ss_t, books_ptr, inv_ptr, cos_ptr, sin_ptr, sr_b, sr_t, out_ptr, so_b, so_h, so_g, N, T,
                         H, D: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DEPTH: tl.constexpr, C: tl.constexpr,
                         GS: tl.constexpr, CBITS: tl.constexpr, PERM: tl.constexpr, ROPE: tl.constexpr,
                         BLOCK: tl.constexpr):
        HALF: tl.constexpr = D // 2
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        nmask = n < N
        row = codes_ptr + (n // T) * sc_blk + b * sc_b + h * sc_h + (n % T) * sc_t
        scale = tl.load(scale_ptr + (n // T) * ss_blk + b * ss_b + h * ss_h + (n % T) * ss_t, mask=nmask,
                        other=0.0).to(tl.float32)
        d = tl.arange(0, HALF)
        lo = _rvq_decode(row, d, nmask, inv_ptr, books_ptr, RB, PERM, DEPTH, C, GS, CBITS, BLOCK, HALF) * scale[:, None]
        hi = _rvq_decode(row, d + HALF, nmask, inv_ptr, books_ptr, RB, PERM, DEPTH, C, GS, CBITS, BLOCK, HALF) * scale[:, None]
        if ROPE:
            rp = b * sr_b + n[:, None] * sr_t + d[None, :]
            c = tl.load(cos_ptr + rp, mask=nmask[:, None], other=0.0)
            s = tl.load(sin_ptr + rp, mask=nmask[:, None], other=0.0)
            lo, hi = lo * c - hi * s, hi * c + lo * s
        g = tl.arange(0, GP)
        gmask = g < G
        qp = q_ptr + b * sq_b + h * sq_h + g[:, None] * sq_g + d[None, :]
        q_lo = tl.load(qp, mask=gmask[:, None], other=0.0)
        q_hi = tl.load(qp + HALF, mask=gmask[:, None], other=0.0)
        score = tl.sum(q_lo[:, None, :] * lo[None, :, :], axis=2) + tl.sum(q_hi[:, None, :] * hi[None, :, :], axis=2)
        tl.store(out_ptr + b * so_b + h * so_h + g[:, None] * so_g + n[None, :], score,
                 mask=gmask[:, None] & nmask[None, :])

    @triton.jit
    def _rvq_values_kernel(p_ptr, sp_b, sp_h, sp_g, codes_ptr, sc_blk, sc_b, sc_h, sc_t, RB, scale_ptr, ss_blk, ss_b,
                           ss_h, ss_t, books_ptr, inv_ptr, part_ptr, N, T, H, PER_SPLIT, D: tl.constexpr,
                           G: tl.constexpr, GP: tl.constexpr, DEPTH: tl.constexpr, C: tl.constexpr, GS: tl.constexpr,
                           CBITS: tl.constexpr, PERM: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // H
        h = pid % H
        d = tl.arange(0, D)
        g = tl.arange(0, GP)
        gmask = g < G
        acc = tl.zeros([GP, D], dtype=tl.float32)
        start = split * PER_SPLIT
        for n0 in range(start, start + PER_SPLIT, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            nmask = n < N
            row = codes_ptr + (n // T) * sc_blk + b * sc_b + h * sc_h + (n % T) * sc_t
            scale = tl.load(scale_ptr + (n // T) * ss_blk + b * ss_b + h * ss_h + (n % T) * ss_t, mask=nmask,
                            other=0.0).to(tl.float32)
            v = _rvq_decode(row, d, nmask, inv_ptr, books_ptr, RB, PERM, DEPTH, C, GS, CBITS, BLOCK, D) * scale[:, None]
            p = tl.load(p_ptr + b * sp_b + h * sp_h + g[:, None] * sp_g + n[None, :],
                        mask=gmask[:, None] & nmask[None, :], other=0.0)
            acc += tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        tl.store(part_ptr + ((split * tl.num_programs(0) + pid) * GP + g[:, None]) * D + d[None, :], acc)


# ---------------------------------------------------------------------------------------------- host side
def _fits(view, rope, groups: int) -> bool:
    dim = view.dim
    return dim >= 16 and dim & (dim - 1) == 0 and groups <= 64 and (rope is None or (rope.half and rope.rot == dim))


def _rope_args(rope, device):
    if rope is None:
        dummy = torch.zeros(1, device=device)
        return dummy, dummy, 0, 0
    cos, sin = rope.halves()
    return cos, sin, cos.stride(0), cos.stride(1)


def _entries(view: NuqView) -> tuple[torch.Tensor, ...]:
    """Per outlier (b, h, channel, run token) of a run, from its sparse rows (see layout.Outliers.mode), cached."""
    memo = view.__dict__.get("_triton_entries")
    if memo is None:
        o = view.outliers
        rows = torch.arange(o.counts.numel(), device=o.counts.device)
        row = torch.repeat_interleave(rows, o.counts.long())
        pos = o.positions.long()
        D, H, B, T = view.dim, view.heads, view.batch, view.tokens
        if o.mode == 1:  # rows (blk, b, t) over h * D + c
            t, b, blk, h, c = row % T, (row // T) % B, row // (T * B), pos // D, pos % D
        else:  # rows (blk, b, h, t) over c
            t, h, b, blk, c = row % T, (row // T) % H, (row // (T * H)) % B, row // (T * H * B), pos
        memo = tuple(x.to(torch.int32).contiguous() for x in (b, h, c, blk * T + t))
        view.__dict__["_triton_entries"] = memo
    return memo


def _codes_strides(view) -> list[int]:
    return list(view.codes.stride()[:4])


def _splits(tokens: int) -> tuple[int, int]:
    """(split count, tokens per split) for split-K value programs; tokens per split is a multiple of BLOCK_N."""
    per = max(BLOCK_N, -(-tokens // 64))
    per = -(-per // BLOCK_N) * BLOCK_N
    return -(-tokens // per), per


def key_scores(run, codec, q: torch.Tensor, rope, out: torch.Tensor) -> bool:
    """Scores of q [B, H, G, D] against one run's keys into out [B, H, G, run tokens]; False if no kernel fits."""
    if not available():
        return False
    B, H, G, D = q.shape
    view = nuq_view(run, codec)
    if view is not None and view.axis == "channel" and _fits(view, rope, G):
        cos, sin, sr_b, sr_t = _rope_args(rope, q.device)
        N = view.run_tokens
        common = (q, *q.stride()[:3], view.codes, *_codes_strides(view), view.levels,
                  view.levels.shape[1] if view.levels.shape[0] > 1 else 0, view.kscale, view.kzero, cos, sin, sr_b,
                  sr_t, out, *out.stride()[:3])
        _nuq_keys_kernel[(B * H, triton.cdiv(N, BLOCK_N))](
            *common, N, view.tokens, H, D=D, G=G, GP=_pow2(G), BITS=view.bits, ROPE=rope is not None, BLOCK=BLOCK_N)
        o = view.outliers
        if o is not None and o.values.numel():
            nnz = o.values.numel()
            _nuq_key_outliers_kernel[(triton.cdiv(nnz, BLOCK_N),)](
                *common, *_entries(view), o.values, nnz, view.tokens, D=D, G=G, GP=_pow2(G), BITS=view.bits,
                ROPE=rope is not None, BLOCK=BLOCK_N)
        return True
    view = rvq_view(run, codec)
    if view is not None and view.outliers is None and _fits(view, rope, G) and view.books.shape[2] <= D:
        cos, sin, sr_b, sr_t = _rope_args(rope, q.device)
        depth, size, group = view.books.shape
        N = view.run_tokens
        inv = view.inv_perm if view.inv_perm is not None else torch.zeros(1, dtype=torch.int32, device=q.device)
        _rvq_keys_kernel[(B * H, triton.cdiv(N, BLOCK_N))](
            q, *q.stride()[:3], view.codes, *_codes_strides(view), view.codes.shape[-1], view.scale,
            *view.scale.stride(), view.books, inv, cos, sin, sr_b, sr_t, out, *out.stride()[:3], N, view.tokens, H,
            D=D, G=G, GP=_pow2(G), DEPTH=depth, C=size, GS=group, CBITS=view.code_bits,
            PERM=view.inv_perm is not None, ROPE=rope is not None, BLOCK=BLOCK_N)
        return True
    return False


def value_accum(run, codec, p: torch.Tensor, out: torch.Tensor) -> bool:
    """out [B, H, G, D] += p [B, H, G, run tokens] . one run's values; False if no kernel fits."""
    if not available():
        return False
    B, H, G, N = p.shape
    D = out.shape[-1]
    view = nuq_view(run, codec)
    if view is not None and view.axis == "token" and _fits(view, None, G):
        splits, per = _splits(N)
        part = torch.empty(splits, B * H, _pow2(G), D, dtype=torch.float32, device=p.device)
        sv = list(view.vscale.stride())
        if view.vscale.shape[2] == 1:
            sv[2] = 0
        common = (p, *p.stride()[:3], view.codes, *_codes_strides(view), view.levels,
                  view.levels.shape[1] if view.levels.shape[0] > 1 else 0, view.vscale, view.vzero, *sv)
        _nuq_values_kernel[(B * H, splits)](*common, part, N, view.tokens, H, per, D=D, G=G, GP=_pow2(G),
                                           BITS=view.bits, BLOCK=BLOCK_N)
        out += part.sum(0).view(B, H, -1, D)[:, :, :G]
        o = view.outliers
        if o is not None and o.values.numel():
            nnz = o.values.numel()
            _nuq_value_outliers_kernel[(triton.cdiv(nnz, BLOCK_N),)](
                *common, out, *out.stride()[:3], *_entries(view), o.values, nnz, view.tokens, D=D, G=G,
                GP=_pow2(G), BITS=view.bits, BLOCK=BLOCK_N)
        return True
    view = rvq_view(run, codec)
    if view is not None and view.outliers is None and _fits(view, None, G):
        depth, size, group = view.books.shape
        splits, per = _splits(N)
        part = torch.empty(splits, B * H, _pow2(G), D, dtype=torch.float32, device=p.device)
        inv = view.inv_perm if view.inv_perm is not None else torch.zeros(1, dtype=torch.int32, device=p.device)
        _rvq_values_kernel[(B * H, splits)](
            p, *p.stride()[:3], view.codes, *_codes_strides(view), view.codes.shape[-1], view.scale,
            *view.scale.stride(), view.books, inv, part, N, view.tokens, H, per, D=D, G=G, GP=_pow2(G), DEPTH=depth,
            C=size, GS=group, CBITS=view.code_bits, PERM=view.inv_perm is not None, BLOCK=BLOCK_N)
        out += part.sum(0).view(B, H, -1, D)[:, :, :G]
        return True
    return False
