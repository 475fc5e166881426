// kvpack CPU kernels: the vector width the build targets, chosen at compile time (the library is built per CPU with
// -march=native; KVPACK_CPU_ISA=avx2 builds with -mno-avx512f). W float lanes: 16 with AVX-512 (F, BW, VBMI), else
// 8 (AVX2 + FMA). Tokens run across the lanes in the tiled kernels (mixed.h); `code_t` is how a tile stores one
// code: a byte with AVX-512 (widened by vpmovzxbd), an int32 lane index with AVX2.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VBMI__)
#define KVPACK_AVX512 1
#else
#define KVPACK_AVX512 0
#endif

namespace simd {

#if KVPACK_AVX512
constexpr int W = 16;
constexpr int ISA_BITS = 512;
typedef __m512 vf;
typedef __m512i vi;
typedef uint8_t code_t;
inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline vf loada(const float* p) { return _mm512_load_ps(p); }
inline void storea(float* p, vf v) { _mm512_store_ps(p, v); }
inline vf zero() { return _mm512_setzero_ps(); }
inline vf set1(float x) { return _mm512_set1_ps(x); }
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf fmsub(vf a, vf b, vf c) { return _mm512_fmsub_ps(a, b, c); }
inline float hsum(vf v) { return _mm512_reduce_add_ps(v); }
inline void store_n(float* p, vf v, int m) {  // the first m lanes
  if (m == W) _mm512_storeu_ps(p, v);
  else _mm512_mask_storeu_ps(p, (__mmask16)((1u << m) - 1), v);
}
inline vf load_half(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline vf load_bf16(const uint16_t* p) {  // exact: a bf16 is the top half of its float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf max(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf abs(vf v) { return _mm512_abs_ps(v); }
inline float hmax(vf v) { return _mm512_reduce_max_ps(v); }
inline vi index(const code_t* p) { return _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i*)p)); }
typedef __mmask16 vmask;
inline vmask lanes_from(int l) { return (vmask)(0xffffu << std::min(std::max(l, 0), 16)); }  // lanes >= l
inline vf blend(vmask m, vf a, vf b) { return _mm512_mask_blend_ps(m, a, b); }                // b where m

// Level lookup, one table per channel: lane l gets tab[idx[l]]. tab: 16 floats (BITS <= 4, the 2**BITS levels repeated),
// 2**BITS beyond. Index bits above the code are ignored (the permutes read the low 4 / 5 bits, the 6-bit blend tests
// bit 5, the gather masks), so codes may come with their neighbours' bits above them.
template <int BITS>
inline vf lut(const float* tab, vi idx) {
  if constexpr (BITS <= 4) {
    return _mm512_permutexvar_ps(idx, _mm512_load_ps(tab));
  } else if constexpr (BITS == 5) {
    return _mm512_permutex2var_ps(_mm512_load_ps(tab), idx, _mm512_load_ps(tab + 16));
  } else if constexpr (BITS == 6) {
    const vf lo = _mm512_permutex2var_ps(_mm512_load_ps(tab), idx, _mm512_load_ps(tab + 16));
    const vf hi = _mm512_permutex2var_ps(_mm512_load_ps(tab + 32), idx, _mm512_load_ps(tab + 48));
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)), lo, hi);
  } else {
    return _mm512_i32gather_ps(_mm512_and_si512(idx, _mm512_set1_epi32((1 << BITS) - 1)), tab, 4);
  }
}

// lut, lanes outside `keep` zero (the masking folded into the lookup).
template <int BITS>
inline vf lut_keep(const float* tab, vi idx, __mmask16 keep) {
  if constexpr (BITS <= 4) {
    return _mm512_maskz_permutexvar_ps(keep, idx, _mm512_load_ps(tab));
  } else if constexpr (BITS == 5) {
    return _mm512_maskz_permutex2var_ps(keep, _mm512_load_ps(tab), idx, _mm512_load_ps(tab + 16));
  } else {
    return _mm512_maskz_mov_ps(keep, lut<BITS>(tab, idx));
  }
}

// Lanes of the 64-bit joins hi:lo shifted right by s (0 <= s < 32), low 32 bits; s read from memory (a broadcast
// operand, no shuffle).
inline vi join(vi lo, vi hi, const int32_t* s) {
#if defined(__AVX512VBMI2__)
  return _mm512_shrdv_epi32(lo, hi, _mm512_set1_epi32(*s));
#else
  return _mm512_or_si512(_mm512_srlv_epi32(lo, _mm512_set1_epi32(*s)), _mm512_sllv_epi32(hi, _mm512_set1_epi32(32 - *s)));
#endif
}

// The first two steps of a transpose, on n rows (a multiple of 4) in groups of 4: within every 128-bit lane, r[4g + j]
// <- dword j of rows 4g .. 4g + 3 (each lane of 4 rows transposed as a 4 x 4 block).
inline void transpose4(__m512i* r, int n) {
  __m512i t[16];
  for (int i = 0; i < n / 2; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < n / 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
}

// r[c] <- column c of the 16 x 16 32-bit matrix whose rows are r[0..15].
inline void transpose(__m512i* r) {
  transpose4(r, 16);
  __m512i t[16];
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
  }
}
inline void transpose(vf* r) { transpose(reinterpret_cast<__m512i*>(r)); }
#else
constexpr int W = 8;
constexpr int ISA_BITS = 256;
typedef __m256 vf;
typedef __m256i vi;
typedef int32_t code_t;
inline vf load(const float* p) { return _mm256_loadu_ps(p); }
inline vf loada(const float* p) { return _mm256_load_ps(p); }
inline void storea(float* p, vf v) { _mm256_store_ps(p, v); }
inline vf zero() { return _mm256_setzero_ps(); }
inline vf set1(float x) { return _mm256_set1_ps(x); }
inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf fmsub(vf a, vf b, vf c) { return _mm256_fmsub_ps(a, b, c); }
inline float hsum(vf v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  return _mm_cvtss_f32(_mm_add_ss(s, sh));
}
inline void store_n(float* p, vf v, int m) {
  if (m == W) {
    _mm256_storeu_ps(p, v);
  } else {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(m), lanes), v);
  }
}
inline vf load_half(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline vf load_bf16(const uint16_t* p) {  // exact: a bf16 is the top half of its float32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline void store(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf max(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf abs(vf v) { return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
inline float hmax(vf v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline vi index(const code_t* p) { return _mm256_load_si256((const __m256i*)p); }
typedef __m256 vmask;
inline vmask lanes_from(int l) {  // lanes >= l
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_setr_epi32(1, 2, 3, 4, 5, 6, 7, 8), _mm256_set1_epi32(l)));
}
inline vf blend(vmask m, vf a, vf b) { return _mm256_blendv_ps(a, b, m); }

template <int BITS>
inline vf lut(const float* tab, vi idx) {
  if constexpr (BITS <= 3) {
    return _mm256_permutevar8x32_ps(_mm256_load_ps(tab), idx);
  } else if constexpr (BITS == 4) {
    const vf lo = _mm256_permutevar8x32_ps(_mm256_load_ps(tab), idx);
    const vf hi = _mm256_permutevar8x32_ps(_mm256_load_ps(tab + 8), idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  } else {
    return _mm256_i32gather_ps(tab, idx, 4);
  }
}

// r[c] <- column c of the 8 x 8 matrix whose rows are r[0..7].
inline void transpose(vf* r) {
  const vf t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const vf t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const vf t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const vf t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const vf u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const vf u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const vf u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const vf u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

}  // namespace simd
