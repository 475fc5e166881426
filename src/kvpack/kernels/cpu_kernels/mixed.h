// NuqCodec with per-channel bit widths (the kvpack presets): the channels of one width form a group whose codes
// are a bitstream of n codes per token (n a multiple of 8, so every token starts at a byte boundary), in the
// group's channel order (cols), each channel with its own codebook.
//
// Tokens run across the vector lanes. A tile of TILE = 4 W tokens is turned channel-major once (codes_tile:
// unpacked and transposed, AVX-512 VBMI: vpermb + vpmultishiftqb + a 16 x 16 transpose per 64 channels), then
// every channel's W tokens are one table lookup (the channel's levels sit in one register for <= 4 bits: one
// permute). Keys: per channel, the lookup table already holds scale * level + zero; the W decoded keys of every
// channel go to a small buffer in natural channel order, sparse outliers written over them, then RoPE (cos/sin of
// the W tokens transposed alongside) and q . k for every query row of the head, accumulators in registers, G a
// template parameter. Values: per-token scale folded into the softmax weights (w = p * scale) and the zero into
// one sum per row (sum p * zero); each channel's W-lane partial sums accumulate over the tile in registers;
// outliers add p * (value - dequantized). Work is split over (batch, tile); value partials per thread are summed
// once at the end (a few KB).
#pragma once
#include <algorithm>
#include <cstring>
#include <vector>

#include "common.h"
#include "simd.h"

namespace {  // one translation unit (cpu_kernels.cpp) includes this
namespace mixed {

using simd::W;
using simd::vf;
using simd::code_t;
constexpr int TILE = 4 * W;  // tokens per tile
constexpr int VECS = TILE / W;

struct Group {
  int bits, n;
  const uint8_t* codes;  // token (blk, b, t) at codes + blk * sblk + b * sb + t * st
  i64 sblk, sb, st;
  const int32_t* cols;      // [n] channel (h * D + c) of each member
  const uint16_t* levels;   // fp16 [H * D, lstride]: the codec's levels, one row per channel
  int lstride;
  const uint16_t* qnorm;    // fp16 [H * D, 2]: decoded level = level * a + b (Q-Norm); nullptr: none
  const uint16_t* scale;    // keys: fp16 [H * D] per-channel scale and zero; values: nullptr
  const uint16_t* zero;
};

struct Mixed {
  int ng = 0;
  Group g[9];
  Half4 vs{}, vz{};  // values: per-token scale / zero (blk, b, h | 0, t)
  const uint16_t* ov = nullptr;
  const void* oi = nullptr;
  int ois = 0, omode = 0;
  std::vector<i64> ptr;
};

inline int table_size(int bits) { return bits <= 4 ? 16 : 1 << bits; }

// Per call: every channel's lookup table (keys: scale * level + zero, one rounding; values: the level), padded,
// and where each channel (h * D + c) sits: its slot (group base + member) and its table.
struct Plan {
  std::vector<float, std::allocator<float>> tabs;  // aligned by construction below
  float* tab0 = nullptr;
  int base[9];     // first slot of each group
  i64 toff[9];     // first table float of each group
  std::vector<int32_t> slot_of;   // [H * D]
  std::vector<int32_t> tab_of;    // [H * D] float offset of the channel's table
  int slots = 0;
};

inline void make_plan(const Mixed& m, int HD, bool keys, Plan* p) {
  i64 floats = 16;
  p->slots = 0;
  for (int i = 0; i < m.ng; ++i) {
    p->base[i] = p->slots;
    p->toff[i] = floats;
    p->slots += m.g[i].n;
    floats += (i64)m.g[i].n * table_size(m.g[i].bits);
  }
  p->tabs.assign(floats + 16, 0.0f);
  float* t = p->tabs.data();
  t += (16 - ((uintptr_t)t / 4) % 16) % 16;  // 64-byte aligned
  p->tab0 = t;
  p->slot_of.assign(HD, -1);
  p->tab_of.assign(HD, 0);
  for (int i = 0; i < m.ng; ++i) {
    const Group& g = m.g[i];
    const int L = 1 << g.bits, P = table_size(g.bits);
    for (int j = 0; j < g.n; ++j) {  // expanded per call from the codec's fp16 state (held once per model)
      const int ch = g.cols[j];
      float* dst = t + p->toff[i] + (i64)j * P;
      const uint16_t* lv = g.levels + (i64)ch * g.lstride;
      const float qa = g.qnorm ? h2f(g.qnorm[2 * ch]) : 1.0f, qb = g.qnorm ? h2f(g.qnorm[2 * ch + 1]) : 0.0f;
      for (int e = 0; e < P; ++e) {
        float level = h2f(lv[std::min(e, L - 1)]);
        if (g.qnorm) level = level * qa + qb;  // as NuqCodec.decode_levels (fp32 mul, then add)
        dst[e] = keys ? std::fma(level, h2f(g.scale[ch]), h2f(g.zero[ch])) : level;
      }
      if (ch >= 0 && ch < HD) {
        p->slot_of[ch] = p->base[i] + j;
        p->tab_of[ch] = (int32_t)(p->toff[i] + (i64)j * P);
      }
    }
  }
}

// Where the W codes of tile vector v of slot s are: AVX-512 bytes, 4 slots x 16 tokens per 64-byte line;
// AVX2 int32 [slot][TILE].
inline code_t* cslot(code_t* ct, int s, int v) {
#if KVPACK_AVX512
  return ct + ((i64)(s >> 2) * VECS + v) * 64 + (s & 3) * 16;
#else
  return ct + (i64)s * TILE + v * W;
#endif
}

inline const uint8_t* group_row(const Group& g, i64 b, i64 n, int T) {
  return g.codes + (n / T) * g.sblk + b * g.sb + (n % T) * g.st;
}

inline void prefetch(const void* p, i64 bytes) {
  const char* c = (const char*)p;
  for (i64 o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
}

// The codes of the tile at n0 (each vector's rows are contiguous), fetched ahead: a tile's rows cross pages,
// where the hardware prefetchers stop.
inline void prefetch_tile(const Mixed& m, i64 b, i64 n0, i64 N, int T) {
  for (i64 nv = n0; nv < std::min(N, n0 + TILE); nv += W)
    for (int i = 0; i < m.ng; ++i) prefetch(group_row(m.g[i], b, nv, T), m.g[i].st * std::min<i64>(W, N - nv));
}

// Codes of tokens n0 .. n0 + W - 1 (clamped to N - 1) of one group, any layout: 8 codes (BITS bytes) at a time.
template <int BITS>
inline void codes_generic(const Group& g, i64 b, i64 n0, i64 N, int T, int base, int v, code_t* ct) {
  for (int l = 0; l < W; ++l) {
    const uint8_t* row = group_row(g, b, std::min(n0 + l, N - 1), T);
    for (int j = 0; j < g.n; j += 8) {
      uint64_t w = 0;
      std::memcpy(&w, row + (j / 8) * BITS, BITS);
      for (int e = 0; e < 8; ++e) cslot(ct, base + j + e, v)[l] = (code_t)((w >> (e * BITS)) & ((1u << BITS) - 1));
    }
  }
}

#if KVPACK_AVX512
// 16 tokens of one group whose rows follow each other (one block): the stream of 16 n codes unpacked to bytes
// (vpermb + vpmultishiftqb, 64 codes at a time) into u [16][S] at columns base .. base + n (masked stores).
template <int BITS>
inline void unpack16(const uint8_t* src, int n, int S, int base, uint8_t* u) {
  alignas(64) static const struct Consts {
    uint8_t perm[64], shift[64];
    Consts() {
      for (int k = 0; k < 8; ++k)
        for (int e = 0; e < 8; ++e) {
          perm[8 * k + e] = (uint8_t)(k * BITS + e);
          shift[8 * k + e] = (uint8_t)(e * BITS);
        }
    }
  } K;
  const __m512i perm = _mm512_load_si512(K.perm), shift = _mm512_load_si512(K.shift);
  const __m512i mask = _mm512_set1_epi8((char)((1 << BITS) - 1));
  const __mmask64 lm = BITS == 8 ? ~0ULL : ((1ULL << (8 * BITS)) - 1);
  const int chunks = 16 * n / 64;
  int t0 = 0;
  for (int q = 0; q < chunks; ++q) {
    __m512i x = _mm512_maskz_loadu_epi8(lm, src + (i64)q * 8 * BITS);
    x = _mm512_and_si512(_mm512_multishift_epi64_epi8(shift, _mm512_permutexvar_epi8(perm, x)), mask);
    const int s0 = 64 * q;  // stream position of byte 0
    while ((t0 + 1) * n <= s0) ++t0;  // token of byte 0
    for (int t = t0; t < 16 && t * n < s0 + 64; ++t) {
      const int lo = std::max(s0, t * n) - s0, hi = std::min(s0 + 64, (t + 1) * n) - s0;
      const __mmask64 mk = (hi == 64 ? ~0ULL : ((1ULL << hi) - 1)) & ~((1ULL << lo) - 1);
      _mm512_mask_storeu_epi8(u + (i64)t * S + base + (s0 - t * n), mk, x);
    }
  }
}

// u [16][S] (token-major bytes) -> the tile's [channel][token] lines: per 64 channels a 16 x 16 transpose of
// 4-byte words, then a byte shuffle to 4 channels x 16 tokens.
inline void transpose16(const uint8_t* u, int S, int v, code_t* ct) {
  alignas(64) static const struct Consts {
    uint8_t bt[64];
    Consts() {
      for (int c = 0; c < 4; ++c)
        for (int t = 0; t < 16; ++t) bt[c * 16 + t] = (uint8_t)(4 * t + c);
    }
  } K;
  const __m512i bt = _mm512_load_si512(K.bt);
  for (int c0 = 0; c0 < S; c0 += 64) {
    const int w = std::min(64, S - c0);
    const __mmask64 cm = w == 64 ? ~0ULL : ((1ULL << w) - 1);
    __m512i r[16];
    for (int t = 0; t < 16; ++t) r[t] = _mm512_maskz_loadu_epi8(cm, u + (i64)t * S + c0);
    simd::transpose(r);
    for (int k = 0; k < w / 4; ++k) _mm512_store_si512(cslot(ct, c0 + 4 * k, v), _mm512_permutexvar_epi8(bt, r[k]));
  }
}
#else
// 8 tokens of one group (any rows): 8 codes of each token as int32 lanes, 8 x 8 transposes to [channel][token].
template <int BITS>
inline void codes_fast8(const Group& g, i64 b, i64 n0, i64 N, int T, int base, int v, code_t* ct) {
  const uint8_t* rows[8];
  for (int l = 0; l < 8; ++l) rows[l] = group_row(g, b, std::min(n0 + l, N - 1), T);
  for (int j = 0; j < g.n; j += 8) {
    vf r[8];
    for (int l = 0; l < 8; ++l) r[l] = _mm256_castsi256_ps(codes8<BITS>(rows[l] + (j / 8) * BITS));
    simd::transpose(r);
    for (int e = 0; e < 8; ++e) _mm256_store_ps((float*)cslot(ct, base + j + e, v), r[e]);
  }
}
#endif

#define MIXED_BITS_SWITCH(bits, CALL) \
  switch (bits) {                     \
    case 1: CALL(1); break;           \
    case 2: CALL(2); break;           \
    case 3: CALL(3); break;           \
    case 4: CALL(4); break;           \
    case 5: CALL(5); break;           \
    case 6: CALL(6); break;           \
    case 7: CALL(7); break;           \
    default: CALL(8); break;          \
  }

// Codes of every group for the tile vectors [0, vecs) starting at token n0; u: scratch of TILE x slots bytes.
// AVX-512: every vector's codes are unpacked first and transposed after, so that the transposes' loads do not wait
// on the unpacking's byte-masked stores (no store-to-load forwarding across several stores).
inline void tile_codes(const Mixed& m, const Plan& p, i64 b, i64 n0, int vecs, i64 N, int T, uint8_t* u, code_t* ct) {
#if KVPACK_AVX512
  bool fast[VECS];
  for (int v = 0; v < vecs; ++v) {
    const i64 nv = n0 + (i64)v * W;
    fast[v] = nv + W <= N && nv / T == (nv + W - 1) / T;  // W rows one after another in one block
    for (int i = 0; i < m.ng; ++i) fast[v] = fast[v] && m.g[i].st * 8 == (i64)m.g[i].n * m.g[i].bits;
    uint8_t* uv = u + (i64)v * W * p.slots;
    for (int i = 0; i < m.ng; ++i) {
      if (fast[v]) {
#define CALL(B) unpack16<B>(group_row(m.g[i], b, nv, T), m.g[i].n, p.slots, p.base[i], uv)
        MIXED_BITS_SWITCH(m.g[i].bits, CALL)
#undef CALL
      } else {
#define CALL(B) codes_generic<B>(m.g[i], b, nv, N, T, p.base[i], v, ct)
        MIXED_BITS_SWITCH(m.g[i].bits, CALL)
#undef CALL
      }
    }
  }
  for (int v = 0; v < vecs; ++v)
    if (fast[v]) transpose16(u + (i64)v * W * p.slots, p.slots, v, ct);
#else
  (void)u;
  for (int v = 0; v < vecs; ++v)
    for (int i = 0; i < m.ng; ++i) {
#define CALL(B) codes_fast8<B>(m.g[i], b, n0 + (i64)v * W, N, T, p.base[i], v, ct)
      MIXED_BITS_SWITCH(m.g[i].bits, CALL)
#undef CALL
    }
#endif
}

// Outliers of tokens n0 .. n0 + count - 1: fix(token offset, channel h * D + c, value) for each.
template <typename I, typename F>
inline void range_outliers_as(const Mixed& m, i64 b, i64 n0, int count, int B, int H, int T, int D, F fix) {
  const I* idx = (const I*)m.oi;
  i64 blk = n0 / T, t = n0 % T;
  for (int l = 0; l < count; ++l) {
    if (m.omode == 1) {  // rows (blk, b, t) over H * D
      const i64 row = (blk * B + b) * T + t;
      for (i64 j = m.ptr[row]; j < m.ptr[row + 1]; ++j) fix(l, (int)idx[j], h2f(m.ov[j]));
    } else {  // rows (blk, b, h, t) over D
      for (int h = 0; h < H; ++h) {
        const i64 row = ((blk * B + b) * H + h) * T + t;
        for (i64 j = m.ptr[row]; j < m.ptr[row + 1]; ++j) fix(l, h * D + (int)idx[j], h2f(m.ov[j]));
      }
    }
    if (++t == T) {
      t = 0;
      ++blk;
    }
  }
}

template <typename F>
inline void range_outliers(const Mixed& m, i64 b, i64 n0, int count, int B, int H, int T, int D, F fix) {
  switch (m.ois) {
    case 1: range_outliers_as<uint8_t>(m, b, n0, count, B, H, T, D, fix); break;
    case 2: range_outliers_as<int16_t>(m, b, n0, count, B, H, T, D, fix); break;
    case 4: range_outliers_as<int32_t>(m, b, n0, count, B, H, T, D, fix); break;
    default: range_outliers_as<int64_t>(m, b, n0, count, B, H, T, D, fix); break;
  }
}

template <int BITS>
inline void decode_group(const float* tab, int n, const int32_t* cols, int base, int v, const code_t* ct, float* kd) {
  constexpr int P = BITS <= 4 ? 16 : 1 << BITS;
  for (int j = 0; j < n; ++j)
    simd::storea(kd + (i64)cols[j] * W, simd::lut<BITS>(tab + (i64)j * P, simd::index(cslot((code_t*)ct, base + j, v))));
}

// cos/sin of the W tokens from n (rows clamped to N - 1) transposed: cs[i * W + lane], sn likewise, i < half;
// rows is scratch [W][rot].
inline void rope_tile(const Rope& rope, i64 b, i64 n, i64 N, int half, float* rows, float* cs, float* sn) {
  for (int l = 0; l < W; ++l) rope.row(b, std::min(n + l, N - 1), rows + (i64)l * rope.rot);
  for (int i0 = 0; i0 < half; i0 += W) {
    const int w = std::min(W, half - i0);
    for (int pass = 0; pass < 2; ++pass) {
      float* dst = pass ? sn : cs;
      vf r[W];
      for (int l = 0; l < W; ++l) {
        const float* row = rows + (i64)l * rope.rot + (pass ? half : 0) + i0;
#if KVPACK_AVX512
        r[l] = _mm512_maskz_loadu_ps((__mmask16)((1u << w) - 1), row);
#else
        r[l] = w == W ? _mm256_loadu_ps(row) : _mm256_castps128_ps256(_mm_loadu_ps(row));  // w is 8 or 16 here
#endif
      }
      simd::transpose(r);
      for (int c = 0; c < w; ++c) simd::storea(dst + (i64)(i0 + c) * W, r[c]);
    }
  }
}

template <int GT>
void keys(const float* q, i64 qb, i64 qh, i64 qg, const Mixed& m, int nblk, int B, int H, int T, int D, int Gr,
          Rope rope, float* out, i64 ob, i64 oh, i64 og, int threads) {
  const int G = GT > 0 ? GT : Gr;
  const int HD = H * D;
  const i64 N = (i64)nblk * T, tiles = (N + TILE - 1) / TILE, items = (i64)B * tiles;
  const int half = rope.pos ? rope.rot / 2 : 0, rot = rope.pos ? rope.rot : 0;
  Plan plan;
  make_plan(m, HD, true, &plan);
#pragma omp parallel num_threads(threads)
  {
    static thread_local std::vector<float> kbuf, rbuf;
    static thread_local std::vector<code_t> cbuf;
    static thread_local std::vector<uint8_t> ubuf;
    kbuf.resize((size_t)HD * W + 16);
    rbuf.resize((size_t)4 * std::max(half, 1) * W + 16);
    cbuf.resize((size_t)(plan.slots + 4) * TILE + 64);
    ubuf.resize((size_t)TILE * HD + 64);
    float* kd = kbuf.data() + (16 - ((uintptr_t)kbuf.data() / 4) % 16) % 16;
    float* cs = rbuf.data() + (16 - ((uintptr_t)rbuf.data() / 4) % 16) % 16;
    float* sn = cs + (i64)std::max(half, 1) * W;
    float* rows = sn + (i64)std::max(half, 1) * W;
    code_t* ct = (code_t*)((uint8_t*)cbuf.data() + (64 - (uintptr_t)cbuf.data() % 64) % 64);
    i64 begin, end;
    share(items, omp_get_num_threads(), omp_get_thread_num(), &begin, &end);
    for (i64 it = begin; it < end; ++it) {
      const i64 b = it / tiles, n0 = (it % tiles) * TILE;
      const int vecs = (int)std::min<i64>(VECS, (N - n0 + W - 1) / W);
      if (n0 + TILE < N) prefetch_tile(m, b, n0 + TILE, N, T);
      tile_codes(m, plan, b, n0, vecs, N, T, ubuf.data(), ct);
      for (int v = 0; v < vecs; ++v) {
        const i64 nv = n0 + (i64)v * W;
        const int lanes = (int)std::min<i64>(W, N - nv);
        for (int i = 0; i < m.ng; ++i) {
          const Group& g = m.g[i];
#define CALL(BB) decode_group<BB>(plan.tab0 + plan.toff[i], g.n, g.cols, plan.base[i], v, ct, kd)
          MIXED_BITS_SWITCH(g.bits, CALL)
#undef CALL
        }
        if (m.ov) range_outliers(m, b, nv, lanes, B, H, T, D, [&](int l, int ch, float x) { kd[(i64)ch * W + l] = x; });
        if (half) rope_tile(rope, b, nv, N, half, rows, cs, sn);
        for (int h = 0; h < H; ++h) {
          const float* kh = kd + (i64)h * D * W;
          const float* qq = q + b * qb + h * qh;
          vf acc[GT > 0 ? GT : MAXG], acc2[GT > 0 ? GT : MAXG];
          for (int g = 0; g < G; ++g) acc[g] = acc2[g] = simd::zero();
          auto pair = [&](int i, vf* a) __attribute__((always_inline)) {
            const vf k1 = simd::loada(kh + (i64)i * W), k2 = simd::loada(kh + (i64)(i + half) * W);
            const vf c = simd::loada(cs + (i64)i * W), s = simd::loada(sn + (i64)i * W);
            const vf r1 = simd::fmsub(k1, c, simd::mul(k2, s));
            const vf r2 = simd::fmadd(k2, c, simd::mul(k1, s));
            for (int g = 0; g < G; ++g) {
              const float* qr = qq + g * qg;
              a[g] = simd::fmadd(simd::set1(qr[i]), r1, a[g]);
              a[g] = simd::fmadd(simd::set1(qr[i + half]), r2, a[g]);
            }
          };
          int i = 0;
          for (; i + 2 <= half; i += 2) {
            pair(i, acc);
            pair(i + 1, acc2);
          }
          if (i < half) pair(i, acc);
          for (int c = rot; c < D; ++c) {
            const vf k = simd::loada(kh + (i64)c * W);
            for (int g = 0; g < G; ++g) {
              vf* a = (c & 1) ? acc2 : acc;
              a[g] = simd::fmadd(simd::set1(qq[g * qg + c]), k, a[g]);
            }
          }
          float* o = out + b * ob + h * oh + nv;
          for (int g = 0; g < G; ++g) simd::store_n(o + g * og, simd::add(acc[g], acc2[g]), lanes);
        }
      }
    }
  }
}

template <int BITS, int GT>
inline void value_group(const float* tab, int n, const int32_t* cols, int base, int vecs, const code_t* ct,
                        const float* w, int D, int G_, float* acc) {
  constexpr int P = BITS <= 4 ? 16 : 1 << BITS;
  const int G = GT > 0 ? GT : G_;
  for (int j = 0; j < n; ++j) {
    const int ch = cols[j], h = ch / D;
    const float* wh = w + (i64)h * G * TILE;
    vf a[GT > 0 ? GT : MAXG];
    for (int g = 0; g < G; ++g) a[g] = simd::zero();
    const float* t = tab + (i64)j * P;
    for (int v = 0; v < vecs; ++v) {
      const vf x = simd::lut<BITS>(t, simd::index(cslot((code_t*)ct, base + j, v)));
      for (int g = 0; g < G; ++g) a[g] = simd::fmadd(simd::loada(wh + (i64)g * TILE + v * W), x, a[g]);
    }
    float* dst = acc + (i64)ch * G * W;
    for (int g = 0; g < G; ++g) simd::storea(dst + g * W, simd::add(simd::loada(dst + g * W), a[g]));
  }
}

template <int GT>
void values(const float* p, i64 pb, i64 ph, i64 pg, const Mixed& m, int nblk, int B, int H, int T, int D, int Gr,
            float* out, i64 ob, i64 oh, i64 og, int threads) {
  const int G = GT > 0 ? GT : Gr;
  const int HD = H * D;
  const i64 N = (i64)nblk * T, tiles = (N + TILE - 1) / TILE, items = (i64)B * tiles;
  Plan plan;
  make_plan(m, HD, false, &plan);
  // per thread: lane sums [B][HD][G][W], scalar corrections and zero sums [B][H][G][D + 1]
  const i64 lane_part = (i64)B * HD * G * W, fix_part = (i64)B * H * G * (D + 1);
  std::vector<float> lanes_all((size_t)threads * lane_part + 16, 0.0f), fixes((size_t)threads * fix_part, 0.0f);
  float* lanes0 = lanes_all.data() + (16 - ((uintptr_t)lanes_all.data() / 4) % 16) % 16;
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    float* acc_all = lanes0 + tid * lane_part;
    float* fix_all = fixes.data() + tid * fix_part;
    static thread_local std::vector<float> wbuf;
    static thread_local std::vector<code_t> cbuf;
    static thread_local std::vector<uint8_t> ubuf;
    wbuf.resize((size_t)H * G * TILE + 16);
    cbuf.resize((size_t)(plan.slots + 4) * TILE + 64);
    ubuf.resize((size_t)TILE * HD + 64);
    float* w = wbuf.data() + (16 - ((uintptr_t)wbuf.data() / 4) % 16) % 16;
    code_t* ct = (code_t*)((uint8_t*)cbuf.data() + (64 - (uintptr_t)cbuf.data() % 64) % 64);
    i64 begin, end;
    share(items, omp_get_num_threads(), tid, &begin, &end);
    for (i64 it = begin; it < end; ++it) {
      const i64 b = it / tiles, n0 = (it % tiles) * TILE;
      const int count = (int)std::min<i64>(TILE, N - n0), vecs = (count + W - 1) / W;
      if (n0 + TILE < N) prefetch_tile(m, b, n0 + TILE, N, T);
      tile_codes(m, plan, b, n0, vecs, N, T, ubuf.data(), ct);
      float* fx = fix_all + b * H * G * (D + 1);
      for (int h = 0; h < H; ++h) {  // w = p * scale per token; the zeros' share sum p * zero per row
        const float* pp = p + b * pb + h * ph + n0;
        vf zacc[GT > 0 ? GT : MAXG];
        for (int g = 0; g < G; ++g) zacc[g] = simd::zero();
        for (int v = 0; v < vecs; ++v) {
          const i64 nv = n0 + (i64)v * W;
          if (nv + W <= N && nv / T == (nv + W - 1) / T && m.vs.st == 1 && m.vz.st == 1) {  // one block: W scales
            const i64 blk = nv / T, t = nv % T;
            const vf sv = simd::load_half(m.vs.base + blk * m.vs.sblk + b * m.vs.sb + h * m.vs.sh + t);
            const vf zv = simd::load_half(m.vz.base + blk * m.vz.sblk + b * m.vz.sb + h * m.vz.sh + t);
            for (int g = 0; g < G; ++g) {
              const vf pv = simd::load(pp + g * pg + v * W);
              simd::storea(w + ((i64)h * G + g) * TILE + v * W, simd::mul(pv, sv));
              zacc[g] = simd::fmadd(pv, zv, zacc[g]);
            }
            continue;
          }
          for (int l = 0; l < W; ++l) {
            const int j = v * W + l;
            const i64 n = n0 + j;
            float sc = 0.0f, z = 0.0f;
            if (j < count) {
              sc = m.vs.at(n / T, b, h, n % T);
              z = m.vz.at(n / T, b, h, n % T);
            }
            for (int g = 0; g < G; ++g) {
              const float pv = j < count ? pp[g * pg + j] : 0.0f;
              w[((i64)h * G + g) * TILE + j] = pv * sc;
              fx[((i64)h * G + g) * (D + 1) + D] += pv * z;
            }
          }
        }
        for (int g = 0; g < G; ++g) fx[((i64)h * G + g) * (D + 1) + D] += simd::hsum(zacc[g]);
      }
      float* acc = acc_all + b * HD * G * W;
      for (int i = 0; i < m.ng; ++i) {
        const Group& g = m.g[i];
#define CALL(BB) value_group<BB, GT>(plan.tab0 + plan.toff[i], g.n, g.cols, plan.base[i], vecs, ct, w, D, G, acc)
        MIXED_BITS_SWITCH(g.bits, CALL)
#undef CALL
      }
      if (m.ov)
        range_outliers(m, b, n0, count, B, H, T, D, [&](int j, int ch, float x) {
          const i64 n = n0 + j;
          const int h = ch / D, c = ch % D;
          const int code = (int)cslot(ct, plan.slot_of[ch], j / W)[j % W];
          const float deq = plan.tab0[plan.tab_of[ch] + code] * m.vs.at(n / T, b, h, n % T) + m.vz.at(n / T, b, h, n % T);
          const float delta = x - deq;
          for (int g = 0; g < G; ++g) fx[((i64)h * G + g) * (D + 1) + c] += p[b * pb + h * ph + g * pg + n] * delta;
        });
    }
  }
  for (int tid = 0; tid < threads; ++tid) {
    const float* acc_all = lanes0 + tid * lane_part;
    const float* fix_all = fixes.data() + tid * fix_part;
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        for (int g = 0; g < G; ++g) {
          float* dst = out + b * ob + h * oh + g * og;
          const float* fx = fix_all + (((i64)b * H + h) * G + g) * (D + 1);
          for (int c = 0; c < D; ++c)
            dst[c] += simd::hsum(simd::loada(acc_all + (((i64)b * HD + h * D + c) * G + g) * W)) + fx[c] + fx[D];
        }
  }
}

}  // namespace mixed
}  // namespace
