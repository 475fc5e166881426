// kvpack CPU kernels: what every family shares (types, fp16, code unpacking, level lookup, RoPE dot,
// work sharing, strided views of codes and per-token scalars, sparse row pointers).
#pragma once
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

typedef int64_t i64;

namespace {

constexpr int MAXG = 64;  // query rows per KV head handled in registers/stack

// The channels c < HD of width `bits` (widths[c] == bits), ascending, into out (at most cap of them); their count.
// What NuqCodec.width_columns lists for the group of that width: the codecs hold only the widths.
inline int width_columns(const uint8_t* widths, int HD, int bits, int16_t* out, int cap) {
  int n = 0;
  for (int c = 0; c < HD; ++c)
    if (widths[c] == bits) {
      if (n < cap) out[n] = (int16_t)c;
      ++n;
    }
  return n;
}

// RoPE at each key's logged position, from two small tables (angle addition: position p = (r << shift) + j):
// cos/sin(p) = hi[r] (x) lo[j], so tables grow with the square root of the context, not with it.
struct Rope {
  const int32_t* pos;  // nullptr: keys are not rotated (post-RoPE storage); else positions [B, slots] at this segment
  i64 pb;              // batch stride of pos
  const float* hi;     // [rows][rot]: cos (first rot/2), sin (last rot/2) at position r << shift (times the scaling)
  const float* lo;     // [1 << shift][rot]: cos, sin at position j, over the rotary scaling
  int shift;
  int rot;  // rotated channels (even), channel c < rot/2 paired with c + rot/2

  // cos (buf[0, rot/2)) and sin (buf[rot/2, rot)) at the position of slot n of batch row b.
  inline void row(i64 b, i64 n, float* buf) const {
    const int half = rot / 2;
    const i64 p = pos[b * pb + n];
    const float* h = hi + (p >> shift) * rot;
    const float* l = lo + (p & ((1 << shift) - 1)) * rot;
    for (int i = 0; i < half; i += 8) {
      const __m256 hc = _mm256_loadu_ps(h + i), hs = _mm256_loadu_ps(h + half + i);
      const __m256 lc = _mm256_loadu_ps(l + i), ls = _mm256_loadu_ps(l + half + i);
      _mm256_storeu_ps(buf + i, _mm256_fmsub_ps(hc, lc, _mm256_mul_ps(hs, ls)));
      _mm256_storeu_ps(buf + half + i, _mm256_fmadd_ps(hs, lc, _mm256_mul_ps(hc, ls)));
    }
  }
};

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

inline float hsum8(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  return _mm_cvtss_f32(_mm_add_ss(s, sh));
}

// 8 consecutive BITS-bit codes starting at a byte boundary -> 8 int32 lanes.
template <int BITS>
inline __m256i codes8(const uint8_t* p) {
  uint64_t w;  // the BITS bytes, read with power-of-two loads (a memcpy of 3 or 5..7 bytes stalls store forwarding)
  if constexpr (BITS == 1) {
    w = p[0];
  } else if constexpr (BITS == 2) {
    uint16_t v; std::memcpy(&v, p, 2); w = v;
  } else if constexpr (BITS == 3) {
    uint16_t v; std::memcpy(&v, p, 2); w = v | ((uint64_t)p[2] << 16);
  } else if constexpr (BITS == 4) {
    uint32_t v; std::memcpy(&v, p, 4); w = v;
  } else if constexpr (BITS == 8) {
    std::memcpy(&w, p, 8);
  } else {
    uint32_t v; std::memcpy(&v, p, 4); w = v;
    for (int i = 4; i < BITS; ++i) w |= (uint64_t)p[i] << (8 * i);
  }
  const uint32_t lo = (uint32_t)w, hi = (uint32_t)(w >> (4 * BITS));
  const __m256i v = _mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi);
  const __m256i sh = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 0, BITS, 2 * BITS, 3 * BITS);
  return _mm256_and_si256(_mm256_srlv_epi32(v, sh), _mm256_set1_epi32((1 << BITS) - 1));
}

inline int code_at(const uint8_t* row, i64 i, int bits) {  // code i of a little-endian bitstream row
  const i64 pos = i * bits;
  const uint8_t* p = row + (pos >> 3);
  const int sh = (int)(pos & 7);
  uint32_t w = p[0];
  if (sh + bits > 8) w |= (uint32_t)p[1] << 8;
  if (sh + bits > 16) w |= (uint32_t)p[2] << 16;
  return (int)((w >> sh) & ((1u << bits) - 1));
}

// Level lookup for 8 codes: register permutes for up to 16 levels, a gather beyond.
template <int BITS>
struct Lut {
  __m256 a, b;
  const float* tab;
  explicit Lut(const float* levels) : tab(levels) {
    alignas(32) float t[16] = {0};
    const int n = 1 << BITS;
    for (int i = 0; i < std::min(n, 16); ++i) t[i] = levels[i];
    a = _mm256_load_ps(t);
    b = _mm256_load_ps(t + 8);
  }
  inline __m256 get(__m256i idx) const {
    if constexpr (BITS <= 3) {
      return _mm256_permutevar8x32_ps(a, idx);
    } else if constexpr (BITS == 4) {
      const __m256 lo = _mm256_permutevar8x32_ps(a, idx), hi = _mm256_permutevar8x32_ps(b, idx);
      return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    } else {
      return _mm256_i32gather_ps(tab, idx, 4);
    }
  }
};

// Score of one key (pre-RoPE values in k[D], fp32) against G query rows: out[g * os] = q_g . R(pos) k.
inline void dot_rope(const float* k, const float* q, i64 qg, int G, int D, const Rope& rope, const float* cs,
                     const float* sn, float* out, i64 os) {
  __m256 acc[MAXG];
  for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
  int start = 0;
  if (rope.pos != nullptr) {
    const int half = rope.rot / 2;
    for (int i = 0; i < half; i += 8) {
      const __m256 lo = _mm256_loadu_ps(k + i), hi = _mm256_loadu_ps(k + i + half);
      const __m256 c = _mm256_loadu_ps(cs + i), s = _mm256_loadu_ps(sn + i);
      const __m256 rlo = _mm256_fmsub_ps(lo, c, _mm256_mul_ps(hi, s));
      const __m256 rhi = _mm256_fmadd_ps(hi, c, _mm256_mul_ps(lo, s));
      for (int g = 0; g < G; ++g) {
        const float* qq = q + g * qg;
        acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qq + i), rlo, acc[g]);
        acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qq + i + half), rhi, acc[g]);
      }
    }
    start = rope.rot;
  }
  for (int i = start; i < D; i += 8) {
    const __m256 kk = _mm256_loadu_ps(k + i);
    for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * qg + i), kk, acc[g]);
  }
  for (int g = 0; g < G; ++g) out[g * os] = hsum8(acc[g]);
}

template <typename T>
inline i64 load_count(const void* p, i64 i) { return (i64)((const T*)p)[i]; }

inline i64 count_at(const void* p, int size, i64 i) {
  switch (size) {
    case 1: return load_count<uint8_t>(p, i);
    case 2: return load_count<int16_t>(p, i);
    case 4: return load_count<int32_t>(p, i);
    default: return load_count<int64_t>(p, i);
  }
}

// Split `items` work items over threads: [begin, end) of thread `tid`.
inline void share(i64 items, int threads, int tid, i64* begin, i64* end) {
  const i64 per = items / threads, extra = items % threads;
  *begin = tid * per + std::min<i64>(tid, extra);
  *end = *begin + per + (tid < extra ? 1 : 0);
}

struct Codes {  // codes of token (blk, b, h, t) start at base + blk*sblk + b*sb + h*sh + t*st
  const uint8_t* base;
  i64 sblk, sb, sh, st;
  inline const uint8_t* row(i64 blk, i64 b, i64 h, i64 t) const { return base + blk * sblk + b * sb + h * sh + t * st; }
};

struct Half4 {  // fp16 per-token scalars indexed (blk, b, h, t)
  const uint16_t* base;
  i64 sblk, sb, sh, st;
  inline float at(i64 blk, i64 b, i64 h, i64 t) const { return h2f(base[blk * sblk + b * sb + h * sh + t * st]); }
};


// The count every one of `rows` rows holds, or -1 when they differ (then row_pointers are needed).
template <typename C>
inline i64 same_count_as(const C* c, i64 rows) {
  if (rows == 0) return 0;
  C differ = 0;
  for (i64 r = 1; r < rows; ++r) differ |= (C)(c[r] ^ c[0]);
  return differ ? -1 : (i64)c[0];
}

inline i64 same_count(const void* counts, int size, i64 rows) {
  if (!counts) return 0;
  switch (size) {
    case 1: return same_count_as((const uint8_t*)counts, rows);
    case 2: return same_count_as((const int16_t*)counts, rows);
    case 4: return same_count_as((const int32_t*)counts, rows);
    default: return same_count_as((const int64_t*)counts, rows);
  }
}

std::vector<i64> row_pointers(const void* counts, int size, i64 rows) {
  std::vector<i64> ptr((size_t)rows + 1, 0);
  if (counts)
    for (i64 r = 0; r < rows; ++r) ptr[r + 1] = ptr[r] + count_at(counts, size, r);
  return ptr;
}

}  // namespace
