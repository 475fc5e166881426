// NuqCodec with per-channel bit widths (the kvpack presets): the channels of one width form a group whose codes
// are a bitstream of n codes per token (n a multiple of 8, so every token starts at a byte boundary), in the
// group's channel order (cols), each channel with its own codebook.
//
// Tokens run across the vector lanes. AVX-512: the codes of W = 16 tokens are read as 32-bit windows (window k,
// lane l = bytes 4k .. 4k + 3 of token l's row of a group; short rows by one byte permute per window, long rows by
// a 16 x 16 transpose of their words, no gathers: docs/results.md, the 32K profile), and member j's W codes are one
// funnel shift of two windows (bits j * BITS ..; keys: members in runs of 32 / gcd(BITS, 32), whose shifts repeat,
// get them at compile time), left with their neighbours' bits above them, which the level lookup ignores (a permute
// of the channel's table, repeated to 16 entries for <= 4 bits). AVX2: a tile's codes are unpacked and transposed to
// int32 lanes [slot][token]. Keys: per channel, the lookup table already holds
// scale * level + zero; the W decoded keys of every channel go to a small buffer in natural channel order, sparse
// outliers written over them, then RoPE (cos/sin of the W tokens: for consecutive positions inside one row of the
// coarse table, one broadcast of the coarse row times the fine table read transposed; else per token) and q . k for
// every query row of the head, accumulators in registers, G a template parameter. Values: per-token scale folded
// into the softmax weights (w = p * scale) and the zero into one sum per row (sum p * zero); each channel's W-lane
// partial sums accumulate over the tile (TILE = 4 W tokens) in registers; an outlier's lane is masked out of
// its code's sum (AVX-512; a 16-bit lane mask per channel and vector of the tile) and p * (value - zero) added apart
// (AVX2: p * (value - dequantized)).
// Work is split over (batch, tile); value partials per thread are summed once at the end (a few KB).
#pragma once
#include <algorithm>
#include <cstring>
#include <utility>
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
  const int16_t* cols;      // [n] channel (h * D + c) of each member, ascending (width_columns)
  const uint16_t* levels;   // fp16 [sum over channels of 2**width]: the codec's levels, channel after channel
  const uint8_t* widths;    // [H * D] every channel's width (where its levels start follows from them)
  const uint16_t* qnorm;    // fp16 [H * D, 2]: decoded level = level * a + b (Q-Norm); nullptr: none
  const uint16_t* scale;    // keys: fp16 [H * D] per-channel scale and zero; values: nullptr
  const uint16_t* zero;
};

struct Mixed {
  int ng = 0;
  Group g[9];
  std::vector<int16_t> cols;  // every group's members (Group::cols points here), derived from the widths per call
  Half4 vs{}, vz{};  // values: per-token scale / zero (blk, b, h | 0, t)
  const uint16_t* ov = nullptr;
  const void* oi = nullptr;
  int ois = 0, omode = 0;
  i64 per_row = -1;     // outliers in every row when all rows hold as many (no row pointers), else -1
  std::vector<i64> ptr;  // [rows + 1] first outlier of each row (per_row < 0)
  i64 row_start(i64 row) const { return per_row >= 0 ? row * per_row : ptr[row]; }
};

inline int table_size(int bits) { return bits <= 4 ? 16 : 1 << bits; }

// Where one channel's codes and table are (outliers look codes up one at a time).
struct Chan {
  int32_t tab;        // float offset of its table
  int32_t word;       // AVX-512: 32-bit word offset of its window in a vector's windows; AVX2: its slot * TILE
  int32_t shift, mask;
  int32_t slot;       // group base + member
};

// Per call: every channel's lookup table (keys: scale * level + zero, one rounding; values: the level), padded
// by repeating the levels, and where each channel (h * D + c) sits: its slot (group base + member) and its table.
// AVX-512: each group's windows per token vector (woff, wtotal) and each slot's shift in its window (sh).
struct Plan {
  std::vector<float> tabs;
  float* tab0 = nullptr;
  int base[9];     // first slot of each group
  i64 toff[9];     // first table float of each group
  int woff[9];     // first window of each group in a vector's windows
  int wtotal = 0;  // windows per token vector
  std::vector<Chan> chan;         // [H * D]
  std::vector<int32_t> head_of;   // [H * D]
  std::vector<int32_t> sh;        // [slots] bit offset of the member's code in its window
  int slots = 0;
#if KVPACK_AVX512
  struct Fetch {  // how a group's windows are read from W contiguous rows of R bytes (group_windows)
    int chunks = 0;       // > 0: byte permutes, lanes in `chunks` runs of `lanes` (each run's rows within 128 bytes)
    int lanes = 0;
    __m512i idx[2];       // per run: the source byte (of 128 from the run's first row + 4k) of every output byte
    __mmask64 out[2];     // per run: its output bytes
    __mmask64 lo[2], hi[2];  // per run: the bytes read of the 128 from the run's first row + 4k (two loads)
  } fetch[9];
#endif
};

inline int row_bytes(const Group& g) { return g.n * g.bits / 8; }  // one token's codes of the group
inline int window_count(const Group& g) { return (row_bytes(g) + 3) / 4 + 1; }  // + 1: the join's upper word

#if KVPACK_AVX512
inline __mmask64 first_bytes(int n) { return n >= 64 ? ~0ull : n <= 0 ? 0ull : (1ull << n) - 1; }

// Window k of W rows of R bytes (lane l: bytes l * R + 4k .. + 3) by byte permutes when the rows of at most two runs
// of lanes each lie within 128 bytes (R <= 17: one vpermi2b per run and window); otherwise (chunks 0) a 16 x 16
// transpose of the rows' words.
inline void plan_fetch(int R, Plan::Fetch* f) {
  const int lanes = std::min(W, (124 / std::max(R, 1)) + 1), chunks = (W + lanes - 1) / lanes;
  f->chunks = chunks <= 2 ? chunks : 0;
  f->lanes = lanes;
  for (int c = 0; c < f->chunks; ++c) {
    alignas(64) uint8_t idx[64] = {0};
    __mmask64 out = 0;
    const int first = c * lanes, count = std::min(W, first + lanes) - first;
    for (int q = 0; q < 64; ++q) {
      const int l = q / 4;
      if (l >= first && l < first + count) {
        idx[q] = (uint8_t)((l - first) * R + q % 4);
        out |= 1ull << q;
      }
    }
    const int need = (count - 1) * R + 4;
    f->idx[c] = _mm512_load_si512(idx);
    f->out[c] = out;
    f->lo[c] = first_bytes(need);
    f->hi[c] = first_bytes(need - 64);
  }
}
#endif

inline void make_plan(const Mixed& m, int HD, int D, bool keys, Plan* p) {
  i64 floats = 16;
  p->slots = 0;
  p->wtotal = 0;
  for (int i = 0; i < m.ng; ++i) {
    p->base[i] = p->slots;
    p->toff[i] = floats;
    p->woff[i] = p->wtotal;
    p->slots += m.g[i].n;
    p->wtotal += window_count(m.g[i]);
    floats += (i64)m.g[i].n * table_size(m.g[i].bits);
  }
  p->tabs.assign(floats + 16, 0.0f);
  float* t = p->tabs.data();
  t += (16 - ((uintptr_t)t / 4) % 16) % 16;  // 64-byte aligned
  p->tab0 = t;
  p->chan.assign(HD, Chan{0, 0, 0, 0, 0});
  std::vector<i64> loff(HD + 1, 0);  // first level of each channel
  for (int ch = 0; ch < HD; ++ch) loff[ch + 1] = loff[ch] + (1 << m.g[0].widths[ch]);
  p->head_of.resize(HD);
  for (int ch = 0; ch < HD; ++ch) p->head_of[ch] = ch / D;
  p->sh.assign(p->slots, 0);
#if KVPACK_AVX512
  for (int i = 0; i < m.ng; ++i) plan_fetch(row_bytes(m.g[i]), &p->fetch[i]);
#endif
  for (int i = 0; i < m.ng; ++i) {
    const Group& g = m.g[i];
    const int L = 1 << g.bits, P = table_size(g.bits);
    for (int j = 0; j < g.n; ++j) {  // expanded per call from the codec's fp16 state (held once per model)
      const int ch = g.cols[j];
      float* dst = t + p->toff[i] + (i64)j * P;
      const uint16_t* lv = g.levels + loff[ch];
      const float qa = g.qnorm ? h2f(g.qnorm[2 * ch]) : 1.0f, qb = g.qnorm ? h2f(g.qnorm[2 * ch + 1]) : 0.0f;
      for (int e = 0; e < L; ++e) {
        float level = h2f(lv[e]);
        if (g.qnorm) level = level * qa + qb;  // as NuqCodec.decode_levels (fp32 mul, then add)
        dst[e] = keys ? std::fma(level, h2f(g.scale[ch]), h2f(g.zero[ch])) : level;
      }
      for (int e = L; e < P; ++e) dst[e] = dst[e - L];  // the levels repeated
      p->sh[p->base[i] + j] = (j * g.bits) & 31;
      if (ch >= 0 && ch < HD) {
#if KVPACK_AVX512
        const int word = (p->woff[i] + ((j * g.bits) >> 5)) * W;
#else
        const int word = (p->base[i] + j) * TILE;
#endif
        p->chan[ch] = Chan{(int32_t)(p->toff[i] + (i64)j * P), word, (j * g.bits) & 31, L - 1, p->base[i] + j};
      }
    }
  }
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

#if KVPACK_AVX512
// A tile's codes: per token vector v, the windows of every group (Plan::woff), wtotal windows a vector.
struct TileCodes {
  __m512i* win;
  const Plan* p;
  const __m512i* group(int i, int v) const { return win + (i64)v * p->wtotal + p->woff[i]; }
};

inline size_t tile_bytes(const Plan& p) { return (size_t)VECS * p.wtotal * 64; }
inline TileCodes tile_buffer(const Plan& p, uint8_t* buf) {  // buf: tile_bytes + 64
  return {(__m512i*)(buf + (64 - (uintptr_t)buf % 64) % 64), &p};
}

// Windows of one group for tokens nv .. nv + W - 1 (clamped to N - 1): where the W rows follow each other in one
// block and the last window ends inside the codes, by byte permutes or a transpose of the rows' words (plan_fetch;
// masked loads read no byte past the last window's), else byte copies.
inline void group_windows(const Group& g, const Plan::Fetch& f, i64 b, i64 nv, i64 N, int B, int T, __m512i* win) {
  const int R = row_bytes(g), nw = window_count(g) - 1;
  const uint8_t* row0 = group_row(g, b, nv, T);
  const uint8_t* end = group_row(g, B - 1, N - 1, T) + R;  // the last row (non-negative strides)
  if (nv + W <= N && nv / T == (nv + W - 1) / T && g.st == R && row0 + (i64)(W - 1) * R + 4 * nw <= end) {
    if (f.chunks) {
      for (int k = 0; k < nw; ++k) {
        __m512i x = _mm512_setzero_si512();
        for (int c = 0; c < f.chunks; ++c) {
          const uint8_t* base = row0 + (i64)c * f.lanes * R + 4 * k;
          const __m512i lo = _mm512_maskz_loadu_epi8(f.lo[c], base);
          const __m512i hi = _mm512_maskz_loadu_epi8(f.hi[c], base + 64);
          x = _mm512_mask_mov_epi8(x, f.out[c], _mm512_permutex2var_epi8(lo, f.idx[c], hi));
        }
        win[k] = x;
      }
    } else {
      for (int k0 = 0; k0 < nw; k0 += W) {
        const int count = std::min(W, nw - k0);
        const __mmask16 words = (__mmask16)((1u << count) - 1);
        __m512i r[W];
        for (int l = 0; l < W; ++l) r[l] = _mm512_maskz_loadu_epi32(words, row0 + (i64)l * R + 4 * k0);
        simd::transpose(r);
        for (int k = 0; k < count; ++k) win[k0 + k] = r[k];
      }
    }
  } else {
    alignas(64) uint32_t lanes[W];
    for (int k = 0; k < nw; ++k) {
      for (int l = 0; l < W; ++l) {
        uint32_t x = 0;
        std::memcpy(&x, group_row(g, b, std::min(nv + l, N - 1), T) + 4 * k, std::min(4, R - 4 * k));
        lanes[l] = x;
      }
      win[k] = _mm512_load_si512(lanes);
    }
  }
  win[nw] = _mm512_setzero_si512();
}

// Codes of every group for the tile vectors [0, vecs) starting at token n0.
inline void tile_codes(const Mixed& m, const Plan& p, i64 b, i64 n0, int vecs, i64 N, int B, int T, TileCodes& tc) {
  for (int v = 0; v < vecs; ++v)
    for (int i = 0; i < m.ng; ++i) group_windows(m.g[i], p.fetch[i], b, n0 + (i64)v * W, N, B, T, (__m512i*)tc.group(i, v));
}

// One group's codes in a tile: the W codes of member j at vector v (bits above the code: the next members' codes).
struct GroupCodes {
  const __m512i* win;  // vector v's windows at win + v * vstride
  const int32_t* sh;   // [n] each member's shift in its window
  i64 vstride;
  template <int BITS>
  simd::vi at(int j, int v) const {
    const __m512i* w = win + v * vstride;
    const int k = (j * BITS) >> 5;
    return simd::join(w[k], w[k + 1], sh + j);
  }
};

inline GroupCodes group_codes(const TileCodes& tc, int i) { return {tc.group(i, 0), tc.p->sh.data() + tc.p->base[i], tc.p->wtotal}; }

// One code (lane l of vector v) of a channel.
inline int code_at(const TileCodes& tc, const Chan& c, int v, int l) {
  const uint32_t* w = (const uint32_t*)(tc.win + (i64)v * tc.p->wtotal) + c.word + l;
  const uint64_t joined = w[0] | ((uint64_t)w[W] << 32);
  return (int)(joined >> c.shift) & c.mask;
}
#else
// A tile's codes as int32 lanes [slot][TILE].
struct TileCodes {
  code_t* ct;
  const Plan* p;
  const code_t* slot(int s, int v) const { return ct + (i64)s * TILE + v * W; }
};

inline size_t tile_bytes(const Plan& p) { return (size_t)p.slots * TILE * sizeof(code_t); }
inline TileCodes tile_buffer(const Plan& p, uint8_t* buf) {  // buf: tile_bytes + 64
  return {(code_t*)(buf + (64 - (uintptr_t)buf % 64) % 64), &p};
}

// 8 tokens of one group (any rows): 8 codes of each token as int32 lanes, 8 x 8 transposes to [channel][token].
template <int BITS>
inline void codes_fast8(const Group& g, i64 b, i64 n0, i64 N, int T, int base, int v, TileCodes& tc) {
  const uint8_t* rows[8];
  for (int l = 0; l < 8; ++l) rows[l] = group_row(g, b, std::min(n0 + l, N - 1), T);
  for (int j = 0; j < g.n; j += 8) {
    vf r[8];
    for (int l = 0; l < 8; ++l) r[l] = _mm256_castsi256_ps(codes8<BITS>(rows[l] + (j / 8) * BITS));
    simd::transpose(r);
    for (int e = 0; e < 8; ++e) _mm256_store_ps((float*)(tc.ct + (i64)(base + j + e) * TILE + v * W), r[e]);
  }
}

inline void tile_codes(const Mixed& m, const Plan& p, i64 b, i64 n0, int vecs, i64 N, int B, int T, TileCodes& tc) {
  (void)B;
  for (int v = 0; v < vecs; ++v)
    for (int i = 0; i < m.ng; ++i) {
#define CALL(BB) codes_fast8<BB>(m.g[i], b, n0 + (i64)v * W, N, T, p.base[i], v, tc)
      MIXED_BITS_SWITCH(m.g[i].bits, CALL)
#undef CALL
    }
}

struct GroupCodes {
  const code_t* slot0;  // the group's first slot
  template <int BITS>
  simd::vi at(int j, int v) const { return simd::index(slot0 + (i64)j * TILE + v * W); }
};

inline GroupCodes group_codes(const TileCodes& tc, int i) { return {tc.slot(tc.p->base[i], 0)}; }

inline int code_at(const TileCodes& tc, const Chan& c, int v, int l) { return (int)tc.ct[c.word + v * W + l]; }
#endif

// Outliers of tokens n0 .. n0 + count - 1: fix(token offset, channel h * D + c, value) for each.
template <typename I, typename F>
inline void range_outliers_as(const Mixed& m, i64 b, i64 n0, int count, int B, int H, int T, int D, F fix) {
  const I* idx = (const I*)m.oi;
  i64 blk = n0 / T, t = n0 % T;
  for (int l = 0; l < count; ++l) {
    if (m.omode == 1) {  // rows (blk, b, t) over H * D
      const i64 row = (blk * B + b) * T + t;
      for (i64 j = m.row_start(row), e = m.row_start(row + 1); j < e; ++j) fix(l, (int)idx[j], h2f(m.ov[j]));
    } else {  // rows (blk, b, h, t) over D
      for (int h = 0; h < H; ++h) {
        const i64 row = ((blk * B + b) * H + h) * T + t;
        for (i64 j = m.row_start(row), e = m.row_start(row + 1); j < e; ++j) fix(l, h * D + (int)idx[j], h2f(m.ov[j]));
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

#if KVPACK_AVX512
// The code of member J (of a run of members starting at window w[0]) in one token vector: an immediate shift.
template <int BITS, int J>
inline __m512i member_code(const __m512i* w) {
  constexpr int bit = J * BITS, k = bit >> 5, s = bit & 31;
  if constexpr (s == 0) return w[k];
  else if constexpr (s + BITS <= 32) return _mm512_srli_epi32(w[k], s);
#if defined(__AVX512VBMI2__)
  else return _mm512_shrdi_epi32(w[k], w[k + 1], s);
#else
  else return _mm512_or_si512(_mm512_srli_epi32(w[k], s), _mm512_slli_epi32(w[k + 1], 32 - s));
#endif
}

// Members after which the shifts repeat (their codes fill whole windows): 32 / gcd(BITS, 32).
constexpr int member_period(int bits) { return bits % 2 ? 32 : bits % 4 ? 16 : bits % 8 ? 8 : 4; }

// Member J of a period of members (member_period) whose codes fill whole windows from w[0]: its shift is known at
// compile time (an immediate shift, no window or shift read per member; the period's last code ends its last window).
template <int BITS, int J>
inline void decode_member(const __m512i* w, const float* tab, const int16_t* cols, float* kd) {
  constexpr int P = BITS <= 4 ? 16 : 1 << BITS;
  simd::storea(kd + (i64)cols[J] * W, simd::lut<BITS>(tab + J * P, member_code<BITS, J>(w)));
}

template <int BITS, int... J>
inline void decode_period(const __m512i* w, const float* tab, const int16_t* cols, float* kd,
                          std::integer_sequence<int, J...>) {
  (decode_member<BITS, J>(w, tab, cols, kd), ...);
}
#endif

// Tokens start..stop-1 of a run decoded as NuqCodec.decode computes them in float32: level (fp16) * a + b
// (Q-Norm), then keys * scale + zero per channel, values * scale + zero per token, each operation rounded on its own
// as torch rounds it (no fused multiply-add here), sparse outliers written over them; token t of row b goes to
// out + b * ob + h * oh + (t - start) * ot + c.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
inline void decode_tokens(const Mixed& m, int nblk, int B, int H, int T, int D, bool keys, i64 start, i64 stop,
                          float* out, i64 ob, i64 oh, i64 ot) {
  (void)nblk;
  const int HD = H * D;
  std::vector<i64> first(HD + 1, 0);  // each channel's first level
  for (int ch = 0; ch < HD; ++ch) first[ch + 1] = first[ch] + (1 << m.g[0].widths[ch]);
  std::vector<float> level;  // decoded levels of every channel (Q-Norm applied), then keys' scale and zero
  level.resize(first[HD]);
  std::vector<float> kscale(HD), kzero(HD);
  for (int i = 0; i < m.ng; ++i) {
    const Group& g = m.g[i];
    for (int j = 0; j < g.n; ++j) {
      const int ch = g.cols[j];
      for (i64 e = first[ch]; e < first[ch + 1]; ++e) {
        float lv = h2f(g.levels[e]);
        if (g.qnorm) {
          const float scaled = lv * h2f(g.qnorm[2 * ch]);
          lv = scaled + h2f(g.qnorm[2 * ch + 1]);
        }
        level[e] = lv;
      }
      if (keys) {
        kscale[ch] = h2f(g.scale[ch]);
        kzero[ch] = h2f(g.zero[ch]);
      }
    }
  }
  for (int b = 0; b < B; ++b)
    for (i64 t = start; t < stop; ++t) {
      const i64 blk = t / T, tt = t % T;
      float* row = out + b * ob + (t - start) * ot;
      for (int i = 0; i < m.ng; ++i) {
        const Group& g = m.g[i];
        const uint8_t* codes = group_row(g, b, t, T);
        const int mask = (1 << g.bits) - 1;
        for (int j0 = 0; j0 < g.n; j0 += 8) {
          uint64_t w = 0;
          for (int k = 0; k < g.bits; ++k) w |= (uint64_t)codes[j0 / 8 * g.bits + k] << (8 * k);
          for (int k = 0; k < 8; ++k) {
            const int ch = g.cols[j0 + k], h = ch / D;
            const float lv = level[first[ch] + ((w >> (k * g.bits)) & mask)];
            float x;
            if (keys) {
              const float scaled = lv * kscale[ch];
              x = scaled + kzero[ch];
            } else {
              const float scaled = lv * m.vs.at(blk, b, h, tt);
              x = scaled + m.vz.at(blk, b, h, tt);
            }
            row[h * oh + ch % D] = x;
          }
        }
      }
      if (m.ov)
        range_outliers(m, b, t, 1, B, H, T, D, [&](int, int ch, float x) { row[(ch / D) * oh + ch % D] = x; });
    }
}
#pragma GCC pop_options

template <int BITS>
inline void decode_group(const float* tab, int n, const int16_t* cols, const GroupCodes& gc, int v, float* kd) {
  constexpr int P = BITS <= 4 ? 16 : 1 << BITS;
  int j = 0;
#if KVPACK_AVX512
  constexpr int PERIOD = member_period(BITS);
  for (const __m512i* w = gc.win + v * gc.vstride; j + PERIOD <= n; j += PERIOD, w += PERIOD * BITS / 32)
    decode_period<BITS>(w, tab + (i64)j * P, cols + j, kd, std::make_integer_sequence<int, PERIOD>{});
#endif
  for (; j < n; ++j) simd::storea(kd + (i64)cols[j] * W, simd::lut<BITS>(tab + (i64)j * P, gc.at<BITS>(j, v)));
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

// The fine RoPE table transposed, each row continued by its first W entries: lot[c * (rows + W) + j] =
// lo[(j % rows) * rot + c] (rows = 2^shift), so that W consecutive fine positions are one load.
inline void transpose_lo(const Rope& rope, std::vector<float>* lot) {
  const int rows = 1 << rope.shift, stride = rows + W;
  lot->resize((size_t)stride * rope.rot);
  for (int j = 0; j < stride; ++j)
    for (int c = 0; c < rope.rot; ++c) (*lot)[(size_t)c * stride + j] = rope.lo[(i64)(j % rows) * rope.rot + c];
}

// cos/sin of W tokens at consecutive positions p0 .. p0 + W - 1, as Rope::row composes them: the coarse row
// broadcast (two rows, blended by lane, where the positions cross into the next), the fine rows read across the
// lanes from the transposed table.
template <bool CROSS>
inline void rope_consecutive(const Rope& rope, const float* lot, i64 p0, int half, float* cs, float* sn) {
  const int rows = 1 << rope.shift, stride = rows + W, j0 = (int)(p0 & (rows - 1));
  const float* h = rope.hi + (p0 >> rope.shift) * rope.rot;
  const float* h1 = h + rope.rot;  // lanes from rows - j0 on (CROSS)
  const simd::vmask next = simd::lanes_from(rows - j0);
  const float* lc = lot + j0;
  const float* ls = lc + (i64)half * stride;
  for (int i = 0; i < half; ++i) {
    vf hc = simd::set1(h[i]), hs = simd::set1(h[half + i]);
    if (CROSS) {
      hc = simd::blend(next, hc, simd::set1(h1[i]));
      hs = simd::blend(next, hs, simd::set1(h1[half + i]));
    }
    const vf c = simd::load(lc + (i64)i * stride), s = simd::load(ls + (i64)i * stride);
    simd::storea(cs + (i64)i * W, simd::fmsub(hc, c, simd::mul(hs, s)));
    simd::storea(sn + (i64)i * W, simd::fmadd(hs, c, simd::mul(hc, s)));
  }
}

// cos/sin of the W tokens from n: from the tables directly where their positions are consecutive (within one
// coarse row or crossing into the next), else row by row (rope_tile).
inline void rope_vector(const Rope& rope, const float* lot, i64 b, i64 n, i64 N, int half, float* rows, float* cs,
                        float* sn) {
  const int32_t* p = rope.pos + b * rope.pb + n;
  bool run = n + W <= N && p[0] >= 0 && (1 << rope.shift) >= W;
  for (int l = 1; run && l < W; ++l) run = p[l] == p[0] + l;
  if (!run) return rope_tile(rope, b, n, N, half, rows, cs, sn);
  if ((p[0] & ((1 << rope.shift) - 1)) + W <= (1 << rope.shift)) rope_consecutive<false>(rope, lot, p[0], half, cs, sn);
  else rope_consecutive<true>(rope, lot, p[0], half, cs, sn);
}

template <int GT>
void keys(const float* q, i64 qb, i64 qh, i64 qg, const Mixed& m, int nblk, int B, int H, int T, int D, int Gr,
          Rope rope, float* out, i64 ob, i64 oh, i64 og, int threads) {
  const int G = GT > 0 ? GT : Gr;
  const int HD = H * D;
  const i64 N = (i64)nblk * T, tiles = (N + TILE - 1) / TILE, items = (i64)B * tiles;
  const int half = rope.pos ? rope.rot / 2 : 0, rot = rope.pos ? rope.rot : 0;
  Plan plan;
  make_plan(m, HD, D, true, &plan);
  std::vector<float> lot;
  if (half) transpose_lo(rope, &lot);
#pragma omp parallel num_threads(threads)
  {
    static thread_local std::vector<float> kbuf, rbuf;
    static thread_local std::vector<uint8_t> cbuf;
    kbuf.resize((size_t)HD * W + 16);
    rbuf.resize((size_t)4 * std::max(half, 1) * W + 16);
    cbuf.resize(tile_bytes(plan) + 64);
    float* kd = kbuf.data() + (16 - ((uintptr_t)kbuf.data() / 4) % 16) % 16;
    float* cs = rbuf.data() + (16 - ((uintptr_t)rbuf.data() / 4) % 16) % 16;
    float* sn = cs + (i64)std::max(half, 1) * W;
    float* rows = sn + (i64)std::max(half, 1) * W;
    TileCodes tc = tile_buffer(plan, cbuf.data());
    i64 begin, end;
    share(items, omp_get_num_threads(), omp_get_thread_num(), &begin, &end);
    for (i64 it = begin; it < end; ++it) {
      const i64 b = it / tiles, n0 = (it % tiles) * TILE;
      const int vecs = (int)std::min<i64>(VECS, (N - n0 + W - 1) / W);
      if (n0 + TILE < N) prefetch_tile(m, b, n0 + TILE, N, T);
      tile_codes(m, plan, b, n0, vecs, N, B, T, tc);
      for (int v = 0; v < vecs; ++v) {
        const i64 nv = n0 + (i64)v * W;
        const int lanes = (int)std::min<i64>(W, N - nv);
        for (int i = 0; i < m.ng; ++i) {
          const Group& g = m.g[i];
          const GroupCodes gc = group_codes(tc, i);
#define CALL(BB) decode_group<BB>(plan.tab0 + plan.toff[i], g.n, g.cols, gc, v, kd)
          MIXED_BITS_SWITCH(g.bits, CALL)
#undef CALL
        }
        if (m.ov) range_outliers(m, b, nv, lanes, B, H, T, D, [&](int l, int ch, float x) { kd[(i64)ch * W + l] = x; });
        if (half) rope_vector(rope, lot.data(), b, nv, N, half, rows, cs, sn);
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

// Member j's share of a tile added to its channel's lane sums dst [G][W]: its codes looked up (outliers' lanes left
// out, `keep`) times the weights of its head's query rows, summed over the tile's vectors. wv(g, v): the weights of
// row g, vector v.
template <int BITS, int GT, int VT, typename WV>
inline void value_channel(const float* t, const GroupCodes& gc, int j, int vecs_, int G_, const uint16_t* keep, WV wv,
                          float* dst) {
  const int G = GT > 0 ? GT : G_, vecs = VT > 0 ? VT : vecs_;
  vf a[GT > 0 ? GT : MAXG];
  for (int g = 0; g < G; ++g) a[g] = simd::zero();
#if KVPACK_AVX512
  if (keep) {
    for (int v = 0; v < vecs; ++v) {
      const vf x = simd::lut_keep<BITS>(t, gc.at<BITS>(j, v), keep[(i64)j * VECS + v]);
      for (int g = 0; g < G; ++g) a[g] = simd::fmadd(wv(g, v), x, a[g]);
    }
  } else
#endif
  for (int v = 0; v < vecs; ++v) {
    const vf x = simd::lut<BITS>(t, gc.at<BITS>(j, v));
    for (int g = 0; g < G; ++g) a[g] = simd::fmadd(wv(g, v), x, a[g]);
  }
  for (int g = 0; g < G; ++g) simd::storea(dst + g * W, simd::add(simd::loada(dst + g * W), a[g]));
}

constexpr int HOISTED = KVPACK_AVX512 ? 16 : 6;  // weight vectors value_group keeps in registers (of 32 or 16)

// VT: the tile's token vectors at compile time (a whole tile), 0: `vecs`. keep (AVX-512, or nullptr): [n][VECS] the
// lanes of each member's vectors whose codes count (outliers' lanes are left out: they are added exactly apart).
// Members are in channel order, so a head's members follow each other: with G and the tile's vectors known at compile
// time (and at most HOISTED), a head's weights are loaded into registers once for all its members.
template <int BITS, int GT, int VT>
inline void value_group(const float* tab, int n, const int16_t* cols, const int32_t* head_of, const GroupCodes& gc,
                        int vecs_, const float* w, int G_, float* acc, const uint16_t* keep) {
  constexpr int P = BITS <= 4 ? 16 : 1 << BITS;
  const int G = GT > 0 ? GT : G_;
  int j = 0;
  while (j < n) {
    const int h = head_of[cols[j]];
    int e = j + 1;
    while (e < n && head_of[cols[e]] == h) ++e;  // members j .. e - 1: head h
    const float* wh = w + (i64)h * G * TILE;
    if constexpr (GT > 0 && VT > 0 && GT * VT <= HOISTED) {
      vf wr[GT][VT];
      for (int g = 0; g < GT; ++g)
        for (int v = 0; v < VT; ++v) wr[g][v] = simd::loada(wh + (i64)g * TILE + v * W);
      for (; j < e; ++j)
        value_channel<BITS, GT, VT>(tab + (i64)j * P, gc, j, VT, GT, keep, [&](int g, int v) { return wr[g][v]; },
                                    acc + (i64)cols[j] * G * W);
    } else {
      for (; j < e; ++j)
        value_channel<BITS, GT, VT>(tab + (i64)j * P, gc, j, vecs_, G_, keep,
                                    [&](int g, int v) { return simd::loada(wh + (i64)g * TILE + v * W); },
                                    acc + (i64)cols[j] * G * W);
    }
  }
}

template <int GT>
void values(const float* p, i64 pb, i64 ph, i64 pg, const Mixed& m, int nblk, int B, int H, int T, int D, int Gr,
            float* out, i64 ob, i64 oh, i64 og, int threads) {
  const int G = GT > 0 ? GT : Gr;
  const int HD = H * D;
  const i64 N = (i64)nblk * T, tiles = (N + TILE - 1) / TILE, items = (i64)B * tiles;
  Plan plan;
  make_plan(m, HD, D, false, &plan);
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
    static thread_local std::vector<uint8_t> cbuf;
    static thread_local std::vector<uint16_t> kbuf;
    kbuf.resize((size_t)plan.slots * VECS);
    uint16_t* keep = nullptr;  // AVX-512 with outliers: lanes of each slot's vectors whose codes count
#if KVPACK_AVX512
    if (m.ov) keep = kbuf.data();
#endif
    wbuf.resize((size_t)H * (G + 2) * TILE + 16);
    cbuf.resize(tile_bytes(plan) + 64);
    float* w = wbuf.data() + (16 - ((uintptr_t)wbuf.data() / 4) % 16) % 16;
    float* scales = w + (i64)H * G * TILE;    // [H][TILE] the tile's per-token scales, for the outliers
    float* zeros = scales + (i64)H * TILE;    // [H][TILE]
    TileCodes tc = tile_buffer(plan, cbuf.data());
    i64 begin, end;
    share(items, omp_get_num_threads(), tid, &begin, &end);
    for (i64 it = begin; it < end; ++it) {
      const i64 b = it / tiles, n0 = (it % tiles) * TILE;
      const int count = (int)std::min<i64>(TILE, N - n0), vecs = (count + W - 1) / W;
      if (n0 + TILE < N) prefetch_tile(m, b, n0 + TILE, N, T);
      tile_codes(m, plan, b, n0, vecs, N, B, T, tc);
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
            simd::storea(scales + (i64)h * TILE + v * W, sv);
            simd::storea(zeros + (i64)h * TILE + v * W, zv);
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
            scales[(i64)h * TILE + j] = sc;
            zeros[(i64)h * TILE + j] = z;
            for (int g = 0; g < G; ++g) {
              const float pv = j < count ? pp[g * pg + j] : 0.0f;
              w[((i64)h * G + g) * TILE + j] = pv * sc;
              fx[((i64)h * G + g) * (D + 1) + D] += pv * z;
            }
          }
        }
        for (int g = 0; g < G; ++g) fx[((i64)h * G + g) * (D + 1) + D] += simd::hsum(zacc[g]);
      }
      if (keep) {  // an outlier's lane is left out of its code's sum and adds p * (value - zero) here
        std::fill(keep, keep + (size_t)plan.slots * VECS, (uint16_t)0xffff);
        range_outliers(m, b, n0, count, B, H, T, D, [&](int j, int ch, float x) {
          const int h = plan.head_of[ch], c = ch - h * D;
          keep[(i64)plan.chan[ch].slot * VECS + j / W] &= (uint16_t)~(1u << (j % W));
          const float delta = x - zeros[(i64)h * TILE + j];
          const float* ph_ = p + b * pb + h * ph + n0 + j;
          for (int g = 0; g < G; ++g) fx[((i64)h * G + g) * (D + 1) + c] += ph_[g * pg] * delta;
        });
      }
      float* acc = acc_all + b * HD * G * W;
      for (int i = 0; i < m.ng; ++i) {
        const Group& g = m.g[i];
        const GroupCodes gc = group_codes(tc, i);
        const uint16_t* gk = keep ? keep + (i64)plan.base[i] * VECS : nullptr;
#define CALL(BB)                                                                                                  \
  if (vecs == VECS) value_group<BB, GT, VECS>(plan.tab0 + plan.toff[i], g.n, g.cols, plan.head_of.data(), gc, vecs, w, G, acc, gk); \
  else value_group<BB, GT, 0>(plan.tab0 + plan.toff[i], g.n, g.cols, plan.head_of.data(), gc, vecs, w, G, acc, gk)
        MIXED_BITS_SWITCH(g.bits, CALL)
#undef CALL
      }
      if (m.ov && !keep)
        range_outliers(m, b, n0, count, B, H, T, D, [&](int j, int ch, float x) {
          const i64 n = n0 + j;
          const int h = plan.head_of[ch], c = ch - h * D;
          const Chan& ci = plan.chan[ch];
          const float deq = plan.tab0[ci.tab + code_at(tc, ci, j / W, j % W)] * scales[(i64)h * TILE + j] + zeros[(i64)h * TILE + j];
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
