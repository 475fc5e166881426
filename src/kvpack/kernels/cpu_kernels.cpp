// kvpack CPU kernels: decode-step attention read straight from packed KV blocks (AVX2 + FMA + F16C, AVX-512 where the build has it; OpenMP).
//
// Built on first use by kernels/cpu.py (g++ -O3 -march=native -fopenmp, a plain shared library called
// through ctypes; no torch headers, so it compiles in about a second). Every function works on one
// *run* of blocks of a layer's BlockStore: `nblk` blocks of x [B, H, T, D], token n = blk * T + t of
// the run. Query heads are grouped per KV head: q [B, H, G, D] (G = query heads per KV head x query
// tokens), already multiplied by the softmax scaling. Scores are written to out[b, h, g, n]
// (n contiguous); value kernels add p[b, h, g, n] . v into out[b, h, g, d].
//
// nuq (KVQuant): a code row of D codes of BITS bits, 8 codes in BITS bytes; decoded level = levels[code], the
//   codec's fp16 levels (Q-Norm applied) and keys' ranges expanded to float32 per call (decode_levels).
//   keys   (per channel): k = kscale[h, c] * level + kzero[h, c]; sparse outliers (CSC: rows (blk, b, h, c),
//          entries = token) replace elements, added here as a correction (v - dequantized) * (R^T q)_c.
//   values (per token):  v = vscale[t] * level + vzero[t]; outliers (CSR: rows (blk, b, [h,] t)) likewise.
// rvq: a code row holds n_groups * depth codes of `cbits` bits (group-major); the group vector is the sum of
//   one codeword per stage, times the per-token fp16 scale; channel c = group vector element inv_perm[c].
//   Outliers (per token row: count, channel, fp16 value) replace elements before RoPE.
// RoPE ("rotate_half", channel i paired with i + rot/2): cos/sin rows [rot/2] per run token (fp32).
//
// One family per header in cpu_kernels/ (common, nuq, rvq, tq, mixed, fp16, softmax, encode, pages: kvpack's vLLM
// pages; simd: the vector width);
// this file holds the segment reader and the C API. The ABI version lives in cpu_kernels/abi.h (read by cpu.py).
#include "cpu_kernels/abi.h"
#include "cpu_kernels/common.h"
#include "cpu_kernels/fp16.h"
#include "cpu_kernels/softmax.h"
#include "cpu_kernels/nuq.h"
#include "cpu_kernels/rvq.h"
#include "cpu_kernels/tq.h"
#include "cpu_kernels/mixed.h"
#include "cpu_kernels/encode.h"
#include "cpu_kernels/pages.h"

namespace {

// ------------------------------------------------------------------------------------------------ C API
// Compile-time (BITS, G) for the common shapes: bits 2..4 with G = 1..8 query rows per KV head; others at run time.
#define NUQ_G_CASES(CALL, N)                                                                                   \
  switch (G) {                                                                                                \
    case 1: CALL(N, 1); break;                                                                                \
    case 2: CALL(N, 2); break;                                                                                \
    case 3: CALL(N, 3); break;                                                                                \
    case 4: CALL(N, 4); break;                                                                                \
    case 5: CALL(N, 5); break;                                                                                \
    case 6: CALL(N, 6); break;                                                                                \
    case 7: CALL(N, 7); break;                                                                                \
    case 8: CALL(N, 8); break;                                                                                \
    default: CALL(N, 0); break;                                                                               \
  }
#define NUQ_BITS_SWITCH(CALL)                 \
  switch (bits) {                             \
    case 1: CALL(1, 0); break;                \
    case 2: NUQ_G_CASES(CALL, 2); break;      \
    case 3: NUQ_G_CASES(CALL, 3); break;      \
    case 4: NUQ_G_CASES(CALL, 4); break;      \
    case 5: CALL(5, 0); break;                \
    case 6: CALL(6, 0); break;                \
    case 7: CALL(7, 0); break;                \
    case 8: CALL(8, 0); break;                \
    default: return -2;                       \
  }


// ------------------------------------------------------------------------------------------------ segments
// A layer's keys or values are segments in token order: fp16 (head / tail) or one run of encoded blocks.
// Each segment's arguments follow its kind in the int64 array; `x`/`out` point at its first token.
enum { SEG_FP16 = 0, SEG_NUQ = 1, SEG_RVQ = 2, SEG_TQ = 3, SEG_MIXED = 4 };

struct Reader {
  const i64* a;
  int k = 0;
  i64 next() { return a[k++]; }
  const void* ptr() { return (const void*)a[k++]; }
};

struct Common {  // the arguments shared by all segments of a call
  int B, H, G, D, threads;
  const float* x;  // q [B, H, G, D] (keys) or p [B, H, G, K] (values), at this segment's first token for values
  i64 xb, xh, xg;
  float* out;      // scores at this segment's first token (keys) or out [B, H, G, D] (values)
  i64 ob, oh, og;
  Rope rope;       // at this segment's first token
};

// A mixed-width segment's groups, value ranges and outliers (the arguments after nblk and T); 0 or an error code.
int read_mixed(Reader& r, int nblk, int B, int H, int T, int D, bool keys, mixed::Mixed* out) {
  mixed::Mixed& m = *out;
  m.ng = (int)r.next();
  if (m.ng < 1 || m.ng > 9 || D % 8) return -1;
  // the codec's state, shared by every group: levels, widths, Q-Norm, keys' ranges
  const uint16_t* levels = (const uint16_t*)r.ptr();
  const uint8_t* widths = (const uint8_t*)r.ptr();
  const uint16_t* qnorm = (const uint16_t*)r.ptr();
  const uint16_t* scale = (const uint16_t*)r.ptr();
  const uint16_t* zero = (const uint16_t*)r.ptr();
  for (int i = 0; i < m.ng; ++i) {
    mixed::Group& g = m.g[i];
    g.bits = (int)r.next(); g.n = (int)r.next();
    g.codes = (const uint8_t*)r.ptr(); g.sblk = r.next(); g.sb = r.next(); g.st = r.next();
    g.levels = levels; g.widths = widths; g.qnorm = qnorm; g.scale = scale; g.zero = zero;
    if (g.bits < 1 || g.bits > 8 || g.n % 8 || !g.levels || !g.widths || (keys && !(g.scale && g.zero))) return -1;
  }
  // each group's members, from the widths (the codec holds no column lists)
  const int HD = H * D;
  int total = 0;
  for (int i = 0; i < m.ng; ++i) total += m.g[i].n;
  m.cols.resize((size_t)total);
  for (int i = 0, at = 0; i < m.ng; at += m.g[i].n, ++i) {
    if (width_columns(m.g[i].widths, HD, m.g[i].bits, m.cols.data() + at, m.g[i].n) != m.g[i].n) return -1;
    m.g[i].cols = m.cols.data() + at;
  }
  const uint16_t* vs = (const uint16_t*)r.ptr();
  const uint16_t* vz = (const uint16_t*)r.ptr();
  const i64 s0 = r.next(), s1 = r.next(), s2 = r.next(), s3 = r.next();
  m.vs = Half4{vs, s0, s1, s2, s3};
  m.vz = Half4{vz, s0, s1, s2, s3};
  if (!keys && (!vs || !vz)) return -1;
  m.ov = (const uint16_t*)r.ptr(); m.oi = r.ptr(); m.ois = (int)r.next();
  const void* oc = r.ptr();
  const int ocs = (int)r.next();
  m.omode = (int)r.next();
  if (m.ov) {
    if (m.omode != 1 && m.omode != 2) return -5;
    const i64 rows = m.omode == 1 ? (i64)nblk * B * T : (i64)nblk * B * H * T;
    m.per_row = same_count(oc, ocs, rows);
    if (m.per_row < 0) m.ptr = row_pointers(oc, ocs, rows);
  }
  return 0;
}

int run_segment(Reader& r, const Common& c, bool keys) {
  const int kind = (int)r.next();
  if (kind == SEG_FP16) {
    const uint16_t* x = (const uint16_t*)r.ptr();
    const i64 xb = r.next(), xh = r.next(), xt = r.next();
    const int n = (int)r.next();
    if (keys) fp16_keys(c.x, c.xb, c.xh, c.xg, x, xb, xh, xt, c.B, c.H, n, c.D, c.G, c.rope, c.out, c.ob, c.oh, c.og);
    else fp16_values(c.x, c.xb, c.xh, c.xg, x, xb, xh, xt, c.B, c.H, n, c.D, c.G, c.out, c.ob, c.oh, c.og);
    return 0;
  }
  const Codes codes{(const uint8_t*)r.ptr(), r.next(), r.next(), r.next(), r.next()};
  const int nblk = (int)r.next(), T = (int)r.next();
  const int B = c.B, H = c.H, D = c.D, G = c.G;
  if (kind == SEG_NUQ) {  // the codec's fp16 levels, Q-Norm and keys' ranges as it holds them, decoded here per call
    const int bits = (int)r.next();
    const uint16_t* levels16 = (const uint16_t*)r.ptr();
    const int per_head = (int)r.next();
    const uint16_t* qnorm16 = (const uint16_t*)r.ptr();
    if (!levels16 || bits < 1 || bits > 8) return -1;
    std::vector<float> level_table;
    decode_levels(levels16, qnorm16, per_head ? H : 1, 1 << bits, &level_table);
    const float* levels = level_table.data();
    const uint16_t* ov = (const uint16_t*)r.ptr();
    const void* oi = r.ptr();
    const int ois = (int)r.next();
    const void* oc = r.ptr();
    const int ocs = (int)r.next();
    const int omode = (int)r.next();
    if (keys) {
      const uint16_t* kscale16 = (const uint16_t*)r.ptr();
      const uint16_t* kzero16 = (const uint16_t*)r.ptr();
      if (!kscale16 || !kzero16) return -1;
      std::vector<float> ranges;
      key_ranges(kscale16, kzero16, H * D, &ranges);
      const float* kscale = ranges.data();
      const float* kzero = ranges.data() + H * D;
      KeyOutliers o;
      const KeyOutliers* op_ = nullptr;
      if (ov) { prepare_key_outliers(ov, oi, ois, oc, ocs, omode, nblk, B, H, T, D, &o); op_ = &o; }
#define CALL(N, GG) nuq_keys<N, GG>(c.x, c.xb, c.xh, c.xg, codes, nblk, B, H, T, D, G, levels, per_head, kscale, kzero, c.rope, op_, c.out, c.ob, c.oh, c.og, c.threads)
      NUQ_BITS_SWITCH(CALL)
#undef CALL
    } else {
      const uint16_t* vs = (const uint16_t*)r.ptr();
      const uint16_t* vz = (const uint16_t*)r.ptr();
      const i64 s0 = r.next(), s1 = r.next(), s2 = r.next(), s3 = r.next();
      (void)r.next();  // span (the outlier mode says how rows run)
      const int span_all = omode == 1;
      if (ov && omode == 0) return -5;
      const Half4 hs{vs, s0, s1, s2, s3}, hz{vz, s0, s1, s2, s3};
      ValueOutliers o{ov, oi, ois, span_all, {}};
      const ValueOutliers* op_ = nullptr;
      if (ov) { o.ptr = row_pointers(oc, ocs, span_all ? (i64)nblk * B * T : (i64)nblk * B * H * T); op_ = &o; }
#define CALL(N, GG) nuq_values<N, GG>(c.x, c.xb, c.xh, c.xg, codes, nblk, B, H, T, D, G, levels, per_head, hs, hz, op_, c.out, c.ob, c.oh, c.og, c.threads)
      NUQ_BITS_SWITCH(CALL)
#undef CALL
    }
    return 0;
  }
  if (kind == SEG_RVQ) {
    const uint16_t* sc = (const uint16_t*)r.ptr();
    const Half4 scale{sc, r.next(), r.next(), r.next(), r.next()};
    Rvq q{};
    q.books = (const uint16_t*)r.ptr();
    q.depth = (int)r.next(); q.C = (int)r.next(); q.gs = (int)r.next(); q.cbits = (int)r.next();
    q.inv_perm = (const int32_t*)r.ptr();
    q.values = (const uint16_t*)r.ptr();
    q.channels = r.ptr();
    q.channel_size = (int)r.next();
    q.counts = r.ptr();
    q.count_size = (int)r.next();
    if (!q.values) q.counts = nullptr;
    if (q.cbits > 16 || q.gs < 1 || D % q.gs) return -1;
    if (keys) rvq_keys(c.x, c.xb, c.xh, c.xg, codes, nblk, B, H, T, D, G, scale, q, c.rope, c.out, c.ob, c.oh, c.og, c.threads);
    else rvq_values(c.x, c.xb, c.xh, c.xg, codes, nblk, B, H, T, D, G, scale, q, c.out, c.ob, c.oh, c.og, c.threads);
    return 0;
  }
  if (kind == SEG_MIXED) {  // the common codes prefix is unused (0); groups follow
    mixed::Mixed m;
    const int bad = read_mixed(r, nblk, B, H, T, D, keys, &m);
    if (bad) return bad;
#define CALL(N, GG)                                                                                                  \
  if (keys) mixed::keys<GG>(c.x, c.xb, c.xh, c.xg, m, nblk, B, H, T, D, G, c.rope, c.out, c.ob, c.oh, c.og, c.threads); \
  else mixed::values<GG>(c.x, c.xb, c.xh, c.xg, m, nblk, B, H, T, D, G, c.out, c.ob, c.oh, c.og, c.threads)
    NUQ_G_CASES(CALL, 0)
#undef CALL
    return 0;
  }
  if (kind == SEG_TQ) {
    Tq z{};
    z.lo = Codes{(const uint8_t*)r.ptr(), r.next(), r.next(), r.next(), r.next()};
    z.wh = (int)r.next(); z.wl = (int)r.next(); z.k = (int)r.next();
    z.lvh = (const float*)r.ptr(); z.lvl = (const float*)r.ptr();
    const uint16_t* nm = (const uint16_t*)r.ptr();
    z.norm = Half4{nm, r.next(), r.next(), r.next(), r.next()};
    z.rot = (const float*)r.ptr();
    if (z.k < 0 || z.k > D || z.wh < 1 || z.wh > 8 || z.wl < 1 || z.wl > 8 || D > 1024 || !z.rot || !nm) return -1;
    if (keys) tq_keys(c.x, c.xb, c.xh, c.xg, codes, z, nblk, B, H, T, D, G, c.out, c.ob, c.oh, c.og, c.threads);
    else tq_values(c.x, c.xb, c.xh, c.xg, codes, z, nblk, B, H, T, D, G, c.out, c.ob, c.oh, c.og, c.threads);
    return 0;
  }
  return -3;
}

}  // namespace

extern "C" {

int kvpack_abi_version() { return KVPACK_ABI_VERSION; }

// The vector width the library was built for: 512 (AVX-512) or 256 (AVX2).
int kvpack_isa() { return simd::ISA_BITS; }

// Attention of one layer for a decode step. Array layout:
//   query ptr (float32 [B, Hq, Q, D], any strides with a contiguous last dim), its strides b, head, token,
//   B, H (KV heads), G0 (query heads per KV head), Q (query tokens), D, K (stored tokens), threads,
//   scaling (float bits), out ptr (float32 [B, Q, Hq, D] contiguous), softcap (float bits, 0 = none),
//   mask ptr (0 = none), kind (1 bool / 2 float32), strides b, q, k, causal (no mask, Q > 1),
//   rope: positions ptr (int32 [B, slots], 0: keys not rotated), its batch stride, hi table ptr, lo table ptr,
//   shift, rot (see Rope),
//   number of key segments, each: tokens, kind, arguments (see run_segment); then the value segments.
int kvpack_layer(const i64* a) {
  Reader r{a};
  const float* query = (const float*)r.ptr();
  const i64 sb = r.next(), shq = r.next(), sq = r.next();
  const int B = (int)r.next(), H = (int)r.next(), G0 = (int)r.next(), Q = (int)r.next(), D = (int)r.next();
  const i64 K = r.next();
  const int threads = (int)r.next();
  const uint32_t scale_bits = (uint32_t)r.next();
  float* final_out = (float*)r.ptr();
  const uint32_t cap_bits = (uint32_t)r.next();
  float scaling, softcap;
  std::memcpy(&scaling, &scale_bits, 4);
  std::memcpy(&softcap, &cap_bits, 4);
  Mask m{};
  m.ptr = r.ptr(); m.kind = (int)r.next(); m.sb = r.next(); m.sq = r.next(); m.sk = r.next(); m.causal = (int)r.next();
  const int32_t* pos = (const int32_t*)r.ptr();
  const i64 pb = r.next();
  const float* hi = (const float*)r.ptr();
  const float* lo = (const float*)r.ptr();
  const int shift = (int)r.next(), rot = (int)r.next();
  const int G = G0 * Q;
  if (G > MAXG || D > 1024 || D % 8 || rot % 16 || rot > D || shift < 0 || shift > 16) return -1;
  // q [B, H, G, D], row g = g0 * Q + query token, pre-scaled
  std::vector<float> q((size_t)B * H * G * D);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int g = 0; g < G; ++g) {
        const float* src = query + b * sb + (i64)(h * G0 + g / Q) * shq + (i64)(g % Q) * sq;
        float* dst = q.data() + (((i64)b * H + h) * G + g) * D;
        for (int d = 0; d < D; ++d) dst[d] = src[d] * scaling;
      }
  // scratch reused across calls (a fresh multi-MB buffer per call costs page faults at long contexts)
  static thread_local std::vector<float> scores;
  if (scores.size() < (size_t)B * H * G * K) scores.resize((size_t)B * H * G * K);
  const int nk = (int)r.next();
  i64 off = 0;
  for (int s = 0; s < nk; ++s) {
    const i64 n = r.next();
    Common c{B, H, G, D, threads, q.data(), (i64)H * G * D, (i64)G * D, D, scores.data() + off, (i64)H * G * K,
             (i64)G * K, K, Rope{pos ? pos + off : nullptr, pb, hi, lo, shift, pos ? rot : 0}};
    const int code = run_segment(r, c, true);
    if (code) return code;
    off += n;
  }
  if (off != K) return -4;
  static thread_local std::vector<float> inv;  // 1 / each row's sum of exp: applied to the row's output
  inv.resize((size_t)B * H * G);
  softmax_rows(scores.data(), B, H, G, Q, K, softcap, m, threads, inv.data());
  static thread_local std::vector<float> out;
  out.assign((size_t)B * H * G * D, 0.0f);
  const int nv = (int)r.next();
  off = 0;
  for (int s = 0; s < nv; ++s) {
    const i64 n = r.next();
    Common c{B, H, G, D, threads, scores.data() + off, (i64)H * G * K, (i64)G * K, K, out.data(), (i64)H * G * D,
             (i64)G * D, D, Rope{nullptr, 0, nullptr, nullptr, 0, 0}};
    const int code = run_segment(r, c, false);
    if (code) return code;
    off += n;
  }
  if (off != K) return -4;
  const int HQ = H * G0;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int g = 0; g < G; ++g) {
        const i64 row = ((i64)b * H + h) * G + g;
        const float* src = out.data() + row * D;
        float* dst = final_out + (((i64)b * Q + g % Q) * HQ + h * G0 + g / Q) * D;
        for (int d = 0; d < D; ++d) dst[d] = src[d] * inv[row];
      }
  return 0;
}


// NuqCodec.encode (see nuq_encode). Array: x ptr, B, H, T, D, bits, axis_token, the codec's fp16 levels ptr
// [1 | H][2**bits], levels_per_head, its fp16 kzero ptr and kscale ptr [H * D] (keys; 0 for values), span_heads,
// k_side, codes ptr, vzero ptr, vscale ptr, mask ptr (0: no outliers), sparse mode, outlier values, positions,
// counts, nnz ptrs (the sparse layout, see sparse_rows).
// The codec's sparse layout of the outliers (codecs/sparse.py encode_rows over NuqCodec._rows): keys CSC, rows
// (b, h, c) over the T tokens; values CSR, rows (b, t) over H*D channels (span all) or (b, h, t) over D.
// Fills values (fp16), positions and counts (int32) and returns the number of outliers.
i64 sparse_rows(const float* x, const uint8_t* mask, int B, int H, int T, int D, int mode, uint16_t* values,
                int32_t* positions, int32_t* counts) {
  i64 nnz = 0, row = 0;
  auto at = [&](i64 b, i64 h, i64 t, i64 c) { return (((b * H + h) * T + t) * D + c); };
  auto put = [&](i64 idx, i64 pos) {
    values[nnz] = _cvtss_sh(x[idx], _MM_FROUND_TO_NEAREST_INT);
    positions[nnz++] = (int32_t)pos;
  };
  if (mode == 0) {
    for (i64 b = 0; b < B; ++b)
      for (i64 h = 0; h < H; ++h)
        for (i64 c = 0; c < D; ++c, ++row) {
          const i64 before = nnz;
          for (i64 t = 0; t < T; ++t)
            if (mask[at(b, h, t, c)]) put(at(b, h, t, c), t);
          counts[row] = (int32_t)(nnz - before);
        }
  } else if (mode == 1) {
    for (i64 b = 0; b < B; ++b)
      for (i64 t = 0; t < T; ++t, ++row) {
        const i64 before = nnz;
        for (i64 h = 0; h < H; ++h)
          for (i64 c = 0; c < D; ++c)
            if (mask[at(b, h, t, c)]) put(at(b, h, t, c), h * D + c);
        counts[row] = (int32_t)(nnz - before);
      }
  } else {
    for (i64 b = 0; b < B; ++b)
      for (i64 h = 0; h < H; ++h)
        for (i64 t = 0; t < T; ++t, ++row) {
          const i64 before = nnz;
          for (i64 c = 0; c < D; ++c)
            if (mask[at(b, h, t, c)]) put(at(b, h, t, c), c);
          counts[row] = (int32_t)(nnz - before);
        }
  }
  return nnz;
}

// Tokens start..stop-1 of one mixed-width run decoded to float32 (mixed::decode_tokens):
// [B, H, D, keys, start, stop, out, ob, oh, ot, then the run's segment arguments as kvpack_layer reads them].
int kvpack_mixed_decode(const i64* a) {
  Reader r{a};
  const int B = (int)r.next(), H = (int)r.next(), D = (int)r.next(), keys = (int)r.next();
  const i64 start = r.next(), stop = r.next();
  float* out = (float*)r.ptr();
  const i64 ob = r.next(), oh = r.next(), ot = r.next();
  (void)r.next();  // the run's tokens
  if (r.next() != SEG_MIXED) return -3;
  for (int k = 0; k < 5; ++k) (void)r.next();  // the unused codes prefix
  const int nblk = (int)r.next(), T = (int)r.next();
  if (start < 0 || stop > (i64)nblk * T || start > stop || !out) return -1;
  mixed::Mixed m;
  const int bad = read_mixed(r, nblk, B, H, T, D, keys != 0, &m);
  if (bad) return bad;
  mixed::decode_tokens(m, nblk, B, H, T, D, keys != 0, start, stop, out, ob, oh, ot);
  return 0;
}

int kvpack_nuq_encode(const i64* a) {
  Reader r{a};
  const float* x = (const float*)r.ptr();
  const int B = (int)r.next(), H = (int)r.next(), T = (int)r.next(), D = (int)r.next(), bits = (int)r.next();
  const int axis_token = (int)r.next();
  const uint16_t* levels16 = (const uint16_t*)r.ptr();
  const int levels_per_head = (int)r.next();
  const uint16_t* kzero16 = (const uint16_t*)r.ptr();
  const uint16_t* kscale16 = (const uint16_t*)r.ptr();
  const int span_heads = (int)r.next(), k_side = (int)r.next();
  uint8_t* codes = (uint8_t*)r.ptr();
  uint16_t* vzero = (uint16_t*)r.ptr();
  uint16_t* vscale = (uint16_t*)r.ptr();
  uint8_t* mask = (uint8_t*)r.ptr();
  const int mode = (int)r.next();
  uint16_t* out_values = (uint16_t*)r.ptr();
  int32_t* out_positions = (int32_t*)r.ptr();
  int32_t* out_counts = (int32_t*)r.ptr();
  i64* out_nnz = (i64*)r.ptr();
  if (D % 8 || bits < 1 || bits > 8 || span_heads < 1 || H % span_heads || !levels16) return -1;
  if (!axis_token && !(kzero16 && kscale16)) return -1;
  const int code = nuq_encode(x, B, H, T, D, bits, axis_token, levels16, levels_per_head, kzero16, kscale16,
                              span_heads, k_side, codes, vzero, vscale, mask);
  if (code == 0 && mask)
    *out_nnz = sparse_rows(x, mask, B, H, T, D, mode, out_values, out_positions, out_counts);
  return code;
}

// Mixed-width encode (see mixed_encode). Array: x ptr, B, H, T, D, axis_token, mids ptr, L1, kzero ptr, kscale ptr,
// span_heads, k_side, number of groups, groups ptr (int64 [g][bits, n, codes ptr]), vzero ptr, vscale ptr,
// mask ptr (0: no outliers), sparse mode, outlier values, positions, counts, nnz ptrs (as kvpack_nuq_encode).
int kvpack_mixed_encode(const i64* a) {
  Reader r{a};
  const float* x = (const float*)r.ptr();
  const int B = (int)r.next(), H = (int)r.next(), T = (int)r.next(), D = (int)r.next();
  const int axis_token = (int)r.next();
  const uint16_t* levels = (const uint16_t*)r.ptr();
  const uint8_t* widths = (const uint8_t*)r.ptr();
  const uint16_t* kzero = (const uint16_t*)r.ptr();
  const uint16_t* kscale = (const uint16_t*)r.ptr();
  const int span_heads = (int)r.next(), k_side = (int)r.next(), ng = (int)r.next();
  const i64* groups = (const i64*)r.ptr();
  uint16_t* vzero = (uint16_t*)r.ptr();
  uint16_t* vscale = (uint16_t*)r.ptr();
  uint8_t* mask = (uint8_t*)r.ptr();
  const int mode = (int)r.next();
  uint16_t* out_values = (uint16_t*)r.ptr();
  int32_t* out_positions = (int32_t*)r.ptr();
  int32_t* out_counts = (int32_t*)r.ptr();
  i64* out_nnz = (i64*)r.ptr();
  if (D % 8 || span_heads < 1 || H % span_heads || !levels || !widths || (!axis_token && !(kzero && kscale))) return -1;
  for (int c = 0; c < H * D; ++c)
    if (widths[c] < 1 || widths[c] > 8) return -1;
  for (int g = 0; g < ng; ++g)
    if (groups[3 * g] < 1 || groups[3 * g] > 8 || groups[3 * g + 1] % 8) return -1;
  const int code = mixed_encode(x, B, H, T, D, axis_token, levels, widths, kzero, kscale, span_heads, k_side, ng, groups,
                                vzero, vscale, mask);
  if (code == 0 && mask)
    *out_nnz = sparse_rows(x, mask, B, H, T, D, mode, out_values, out_positions, out_counts);
  return code;
}

// Attention over kvpack's vLLM pages (pages.h). Array: query ptr (float32 [T, Hq, D] contiguous), out ptr (float32
// [T, Hq, D]), requests R, H (KV heads), G (query heads per KV head), D, threads, scale (float bits), query_start_loc
// ptr (int64 [R + 1]), seq_lens ptr (int64 [R]), block table ptr (int32), its row stride, block size, slot rows ptr,
// slot bytes, sink records ptr, sink tokens, sink dtype (0 float32, 1 float16, 2 bfloat16), key-outlier pools ptr,
// pool entries, RoPE cos ptr (0: none), sin ptr, their row stride, rotated channels, the split tables of the
// channel-major path (pages::Args::rope_hi, rope_lo; 0: none, the token-major path rotates), what their composed cos/sin
// are rounded to (pages::Args::rope_round: the table's dtype, coded as the sink dtype), the channel-major cos/sin table
// (pages::Args::rope_cm; 0: none, the split tables are composed); then the key part and the value
// part, each: kind, raw type, offset, code bytes, byte, shift, mask, base, levels ptrs, pairs, pair_div, outlier
// slots, index bytes; then the most query tokens of a request this call attends for (0: no limit; longer requests are
// skipped, the caller attends for them).
static pages::Args pages_args(Reader& r) {
  pages::Args A{};
  A.query = (const float*)r.ptr();
  A.out = (float*)r.ptr();
  A.R = (int)r.next(); A.H = (int)r.next(); A.G = (int)r.next(); A.D = (int)r.next(); A.threads = (int)r.next();
  const uint32_t scale_bits = (uint32_t)r.next();
  std::memcpy(&A.scale, &scale_bits, 4);
  A.qsl = (const i64*)r.ptr();
  A.seq_lens = (const i64*)r.ptr();
  A.table = (const int32_t*)r.ptr();
  A.ts = r.next();
  A.bs = (int)r.next();
  A.slots = (const uint8_t*)r.ptr();
  A.slot_bytes = r.next();
  A.sinks = (const uint8_t*)r.ptr();
  A.sink_tokens = (int)r.next(); A.sink_type = (int)r.next();
  A.pool = (const uint8_t*)r.ptr();
  A.pool_entries = (int)r.next();
  A.cos = (const float*)r.ptr();
  A.sin = (const float*)r.ptr();
  A.rope_stride = r.next();
  A.rot = (int)r.next();
  A.rope_hi = (const float*)r.ptr();
  A.rope_lo = (const float*)r.ptr();
  A.rope_round = (int)r.next();
  A.rope_cm = (const float*)r.ptr();
  for (pages::Part* p : {&A.key, &A.value}) {
    p->kind = (int)r.next(); p->raw_type = (int)r.next(); p->offset = r.next(); p->code_bytes = (int)r.next();
    p->byte = (const int32_t*)r.ptr(); p->shift = (const int32_t*)r.ptr(); p->mask = (const int32_t*)r.ptr();
    p->base = (const int32_t*)r.ptr(); p->levels = (const float*)r.ptr();
    p->pairs = (int)r.next(); p->pair_div = (int)r.next(); p->outliers = (int)r.next(); p->index_bytes = (int)r.next();
  }
  A.max_query = r.next();
  return A;
}

int kvpack_pages_attention(const i64* a) {
  Reader r{a};
  pages::Args A = pages_args(r);
  return pages::attention(A);
}

// The decoded K and V of every cached token (pages.h, pages::dense). Array: as kvpack_pages_attention's, with the K
// and V outputs ([sum(seq_lens), H, D] each) in place of the query and out pointers, then their type (0 float32,
// 1 float16, 2 bfloat16).
int kvpack_pages_dense(const i64* a) {
  Reader r{a};
  pages::Args A = pages_args(r);
  const int type = (int)r.next();
  return pages::dense(A, (void*)A.query, (void*)A.out, type);
}

// The write path over kvpack's vLLM pages (pages.h, pages::write). Array: keys ptr, values ptr ([T, H * D]
// contiguous, in the type given last), T, H, D, threads, slot ids ptr (int64 [T]), positions ptr (int64 [T]), slot rows ptr, slot
// bytes, block size, key-outlier pools ptr (0: none), pool entries, sink tokens, RoPE cos ptr (0: the keys are
// pre-RoPE; else post-RoPE, rotated back at their positions), sin ptr, their row stride, rotated channels; then the
// key part and the value part,
// each: axis_token, offset, code bytes, byte, shift, mask ptrs (int32 [C]), midpoints ptr (float32 [C, M]), M, zero,
// scale ptrs (float32 [C], keys), has outliers, outliers per side, ranges per token, outlier slots, index bytes;
// then the keys' and values' type (0 float32, 1 float16, 2 bfloat16) and a peaks ptr (float32 [2]: max |keys|,
// max |values|, NaN where one is NaN or inf; 0: not checked).
// Returns the key outliers clamped for lack of a slot / pool entry (>= 0), -3 (nothing written) where a peak is NaN,
// inf or beyond fp16's range, or another value < 0 if the arguments are refused.
i64 kvpack_pages_write(const i64* a) {
  Reader r{a};
  pages::WriteArgs A{};
  A.kx = (const float*)r.ptr();
  A.vx = (const float*)r.ptr();
  A.T = (int)r.next(); A.H = (int)r.next(); A.D = (int)r.next(); A.threads = (int)r.next();
  A.slots = (const i64*)r.ptr();
  A.pos = (const i64*)r.ptr();
  A.rows = (uint8_t*)r.ptr();
  A.slot_bytes = r.next();
  A.bs = (int)r.next();
  A.pool = (uint8_t*)r.ptr();
  A.pool_entries = (int)r.next(); A.sink_tokens = (int)r.next();
  A.cos = (const float*)r.ptr(); A.sin = (const float*)r.ptr(); A.rope_stride = r.next(); A.rot = (int)r.next();
  for (pages::EncPart* p : {&A.key, &A.value}) {
    p->axis_token = (int)r.next(); p->offset = r.next(); p->code_bytes = (int)r.next();
    p->byte = (const int32_t*)r.ptr(); p->shift = (const int32_t*)r.ptr(); p->mask = (const int32_t*)r.ptr();
    p->mid = (const float*)r.ptr(); p->M = (int)r.next();
    p->zero = (const float*)r.ptr(); p->scale = (const float*)r.ptr();
    p->outliers = (int)r.next(); p->k_side = (int)r.next(); p->pairs = (int)r.next(); p->slots = (int)r.next();
    p->index_bytes = (int)r.next();
  }
  A.x_type = (int)r.next();
  A.peaks = (float*)r.ptr();
  return pages::write(A);
}

}  // extern "C"
