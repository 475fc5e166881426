// kvpack CPU kernels: decode-step attention read straight from packed KV blocks (AVX2 + FMA + F16C, OpenMP).
//
// Built on first use by kernels/cpu.py (g++ -O3 -march=native -fopenmp, a plain shared library called
// through ctypes; no torch headers, so it compiles in about a second). Every function works on one
// *run* of blocks of a layer's BlockStore: `nblk` blocks of x [B, H, T, D], token n = blk * T + t of
// the run. Query heads are grouped per KV head: q [B, H, G, D] (G = query heads per KV head x query
// tokens), already multiplied by the softmax scaling. Scores are written to out[b, h, g, n]
// (n contiguous); value kernels add p[b, h, g, n] . v into out[b, h, g, d].
//
// nuq (KVQuant): a code row of D codes of BITS bits, 8 codes in BITS bytes; decoded level = levels[code].
//   keys   (per channel): k = kscale[h, c] * level + kzero[h, c]; sparse outliers (CSC: rows (blk, b, h, c),
//          entries = token) replace elements, added here as a correction (v - dequantized) * (R^T q)_c.
//   values (per token):  v = vscale[t] * level + vzero[t]; outliers (CSR: rows (blk, b, [h,] t)) likewise.
// rvq: a code row holds n_groups * depth codes of `cbits` bits (group-major); the group vector is the sum of
//   one codeword per stage, times the per-token fp16 scale; channel c = group vector element inv_perm[c].
//   Outliers (per token row: count, channel, fp16 value) replace elements before RoPE.
// RoPE ("rotate_half", channel i paired with i + rot/2): cos/sin rows [rot/2] per run token (fp32).
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

struct Rope {
  const float* cos;  // nullptr: keys are not rotated (post-RoPE storage)
  const float* sin;
  i64 sb, st;  // strides of batch and run token, in floats
  int rot;     // rotated channels (even), channel c < rot/2 paired with c + rot/2
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
  if (rope.cos != nullptr) {
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

std::vector<i64> row_pointers(const void* counts, int size, i64 rows);

// ------------------------------------------------------------------------------------------------ nuq keys
// 8 accumulators -> one vector of their 8 horizontal sums.
inline __m256 hsum8x8(const __m256* v) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// Key outliers per token. Rows of the codec's sparse layout: mode 1 = (blk, b, t) over h * D + c, mode 2 =
// (blk, b, h, t) over c: read in place through row pointers. Mode 0 = CSC (blk, b, h, c) over the tokens of a
// block: bucketed once per call into per-(b, n, h) lists by a counting sort (nested loops, no divisions).
struct KeyOutliers {
  int mode;
  const uint16_t* values;
  const void* indices;
  int index_size;
  std::vector<i64> ptr;        // modes 1, 2: row pointers; mode 0: start of each (b, n, h) slot
  std::vector<int32_t> channel;  // mode 0
  std::vector<float> value;      // mode 0
};

void prepare_key_outliers(const uint16_t* values, const void* indices, int index_size, const void* counts,
                          int count_size, int mode, int nblk, int B, int H, int T, int D, KeyOutliers* o) {
  o->mode = mode;
  o->values = values;
  o->indices = indices;
  o->index_size = index_size;
  if (mode != 0) {
    o->ptr = row_pointers(counts, count_size, mode == 1 ? (i64)nblk * B * T : (i64)nblk * B * H * T);
    return;
  }
  const i64 N = (i64)nblk * T, slots = (i64)B * N * H;
  std::vector<i64> rowptr = row_pointers(counts, count_size, (i64)nblk * B * H * D);
  o->ptr.assign(slots + 1, 0);
  for (int pass = 0; pass < 2; ++pass) {
    i64 r = 0;
    for (i64 blk = 0; blk < nblk; ++blk)
      for (i64 b = 0; b < B; ++b)
        for (i64 h = 0; h < H; ++h)
          for (int c = 0; c < D; ++c, ++r)
            for (i64 j = rowptr[r]; j < rowptr[r + 1]; ++j) {
              const i64 slot = (b * N + blk * T + count_at(indices, index_size, j)) * H + h;
              if (pass == 0) {
                o->ptr[slot + 1] += 1;
              } else {
                const i64 at = o->ptr[slot]++;
                o->channel[at] = c;
                o->value[at] = h2f(values[j]);
              }
            }
    if (pass == 0) {
      for (i64 i = 0; i < slots; ++i) o->ptr[i + 1] += o->ptr[i];
      o->channel.resize(o->ptr[slots]);
      o->value.resize(o->ptr[slots]);
    } else {
      for (i64 i = slots; i > 0; --i) o->ptr[i] = o->ptr[i - 1];
      o->ptr[0] = 0;
    }
  }
}

// (R^T q)_c: what a unit change of pre-RoPE key channel c adds to q . R k.
inline float rotated_q(const float* q, int c, int rot, const float* cs, const float* sn) {
  if (cs == nullptr || c >= rot) return q[c];
  const int half = rot / 2;
  if (c < half) return q[c] * cs[c] + q[c + half] * sn[c];
  return q[c] * cs[c - half] - q[c - half] * sn[c - half];
}

// Add (outlier - dequantized) * (R^T q_g)_c for every outlier of token n (all heads) to its scores.
template <int BITS>
inline void key_corrections(const KeyOutliers& o, i64 b, i64 blk, i64 t, i64 n, i64 N, int B, int H, int T, int D,
                            const Codes& codes, const float* levels, int levels_per_head, const float* kscale,
                            const float* kzero, const float* qb_, i64 qh, i64 qg, int G, int rot, const float* cs,
                            const float* sn, float* dst, i64 oh, i64 og) {
  auto fix = [&](int h, int c, float v) {
    const float* lev = levels + (levels_per_head ? h << BITS : 0);
    const float deq = std::fma(lev[code_at(codes.row(blk, b, h, t), c, BITS)], kscale[h * D + c], kzero[h * D + c]);
    const float delta = v - deq;
    const float* qq = qb_ + h * qh;
    for (int g = 0; g < G; ++g) dst[h * oh + g * og] += rotated_q(qq + g * qg, c, rot, cs, sn) * delta;
  };
  if (o.mode == 0) {
    for (int h = 0; h < H; ++h) {
      const i64 slot = (b * N + n) * H + h;
      for (i64 e = o.ptr[slot]; e < o.ptr[slot + 1]; ++e) fix(h, o.channel[e], o.value[e]);
    }
  } else if (o.mode == 1) {
    const i64 r = (blk * B + b) * T + t;
    for (i64 j = o.ptr[r]; j < o.ptr[r + 1]; ++j) {
      const int col = (int)count_at(o.indices, o.index_size, j);
      fix(col / D, col % D, h2f(o.values[j]));
    }
  } else {
    for (int h = 0; h < H; ++h) {
      const i64 r = ((blk * B + b) * H + h) * T + t;
      for (i64 j = o.ptr[r]; j < o.ptr[r + 1]; ++j) fix(h, (int)count_at(o.indices, o.index_size, j), h2f(o.values[j]));
    }
  }
}

template <int BITS, int GT>  // GT > 0: the number of query rows G known at compile time (accumulators in registers)
void nuq_keys(const float* q, i64 qb, i64 qh, i64 qg, Codes codes, int nblk, int B, int H, int T, int D, int Gr,
              const float* levels, int levels_per_head, const float* kscale, const float* kzero, Rope rope,
              const KeyOutliers* outl, float* out, i64 ob, i64 oh, i64 og, int threads) {
  const int G = GT > 0 ? GT : Gr;
  const int chunk = 128;
  const i64 N = (i64)nblk * T, per_block = (T + chunk - 1) / chunk, items = (i64)B * nblk * per_block;
  const int half = rope.cos ? rope.rot / 2 : 0, rot = rope.cos ? rope.rot : 0;
#pragma omp parallel num_threads(threads)
  {
    alignas(32) float part[MAXG * 8 * 8];  // [g][token of 8][lane]
    i64 begin, end;
    share(items, omp_get_num_threads(), omp_get_thread_num(), &begin, &end);
    for (i64 it = begin; it < end; ++it) {
      const i64 b = it / (nblk * per_block), blk = (it / per_block) % nblk;
      const int t0 = (int)(it % per_block) * chunk, t1 = std::min(T, t0 + chunk);
      for (int h = 0; h < H; ++h) {
        const Lut<BITS> lut(levels + (levels_per_head ? h << BITS : 0));
        const float* sc = kscale + h * D;
        const float* zr = kzero + h * D;
        const float* qq = q + b * qb + h * qh;
        float* o = out + b * ob + h * oh;
        for (int tb = t0; tb < t1; tb += 8) {
          const int m = std::min(8, t1 - tb);
          for (int j = 0; j < m; ++j) {
            const int t = tb + j;
            const i64 n = blk * T + t;
            const uint8_t* row = codes.row(blk, b, h, t);
            const float* cs = rope.cos ? rope.cos + b * rope.sb + n * rope.st : nullptr;
            const float* sn = rope.cos ? rope.sin + b * rope.sb + n * rope.st : nullptr;
            __m256 acc[GT > 0 ? GT : MAXG];
            for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
            {  // fused: dequantize a channel chunk and its RoPE partner, rotate, dot
              // Each chunk's products are summed apart (mul + fma) and added to one of two accumulator sets
              // (even / odd chunks), so the dependency chain through the accumulators stays short.
              __m256 acc2[GT > 0 ? GT : MAXG];
              for (int g = 0; g < G; ++g) acc2[g] = _mm256_setzero_ps();
              auto pair = [&](int i, __m256* a) __attribute__((always_inline)) {
                const __m256 lo = _mm256_fmadd_ps(lut.get(codes8<BITS>(row + (i / 8) * BITS)), _mm256_loadu_ps(sc + i),
                                                  _mm256_loadu_ps(zr + i));
                const __m256 hi = _mm256_fmadd_ps(lut.get(codes8<BITS>(row + ((i + half) / 8) * BITS)),
                                                  _mm256_loadu_ps(sc + i + half), _mm256_loadu_ps(zr + i + half));
                const __m256 c = _mm256_loadu_ps(cs + i), s = _mm256_loadu_ps(sn + i);
                const __m256 rlo = _mm256_fmsub_ps(lo, c, _mm256_mul_ps(hi, s));
                const __m256 rhi = _mm256_fmadd_ps(hi, c, _mm256_mul_ps(lo, s));
                for (int g = 0; g < G; ++g) {
                  const __m256 t = _mm256_fmadd_ps(_mm256_loadu_ps(qq + g * qg + i + half), rhi,
                                                   _mm256_mul_ps(_mm256_loadu_ps(qq + g * qg + i), rlo));
                  a[g] = _mm256_add_ps(a[g], t);
                }
              };
              auto plain = [&](int i, __m256* a) __attribute__((always_inline)) {
                const __m256 kk = _mm256_fmadd_ps(lut.get(codes8<BITS>(row + (i / 8) * BITS)), _mm256_loadu_ps(sc + i),
                                                  _mm256_loadu_ps(zr + i));
                for (int g = 0; g < G; ++g) a[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qq + g * qg + i), kk, a[g]);
              };
              int i = 0;
              for (; i + 16 <= half; i += 16) {
                pair(i, acc);
                pair(i + 8, acc2);
              }
              if (i < half) pair(i, acc);
              for (i = rot; i + 16 <= D; i += 16) {
                plain(i, acc);
                plain(i + 8, acc2);
              }
              if (i < D) plain(i, acc);
              for (int g = 0; g < G; ++g) acc[g] = _mm256_add_ps(acc[g], acc2[g]);
            }
            for (int g = 0; g < G; ++g) _mm256_store_ps(part + (g * 8 + j) * 8, acc[g]);
          }
          for (int g = 0; g < G; ++g) {
            float* dst = o + g * og + blk * T + tb;
            if (m == 8) {
              __m256 v[8];
              for (int j = 0; j < 8; ++j) v[j] = _mm256_load_ps(part + (g * 8 + j) * 8);
              _mm256_storeu_ps(dst, hsum8x8(v));
            } else {
              for (int j = 0; j < m; ++j) dst[j] = hsum8(_mm256_load_ps(part + (g * 8 + j) * 8));
            }
          }

        }
      }
      if (outl) {  // outliers of the chunk's tokens: add (value - dequantized) * (R^T q_g)_c to their scores
        for (int t = t0; t < t1; ++t) {
          const i64 n = blk * T + t;
          const float* cs = rope.cos ? rope.cos + b * rope.sb + n * rope.st : nullptr;
          const float* sn = rope.cos ? rope.sin + b * rope.sb + n * rope.st : nullptr;
          key_corrections<BITS>(*outl, b, blk, t, n, N, B, H, T, D, codes, levels, levels_per_head, kscale, kzero,
                                q + b * qb, qh, qg, G, rot, cs, sn, out + b * ob + n, oh, og);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ nuq values
// Value outliers are CSR: row (blk, b, t) over H*D channels (span_all) or row (blk, b, h, t) over D channels.
struct ValueOutliers {
  const uint16_t* values;
  const void* indices;
  int index_size;
  int span_all;
  std::vector<i64> ptr;
};

template <int BITS, int GT>
void nuq_values(const float* p, i64 pb, i64 ph, i64 pg, Codes codes, int nblk, int B, int H, int T, int D, int Gr,
                const float* levels, int levels_per_head, Half4 vscale, Half4 vzero, const ValueOutliers* outl,
                float* out, i64 ob, i64 oh, i64 og, int threads) {
  const int G = GT > 0 ? GT : Gr;
  constexpr int PAIR = (GT > 0 && GT <= 4) ? 2 : 1;  // channel chunks per pass over the tokens
  const i64 N = (i64)nblk * T, chunk = 256, chunks = (N + chunk - 1) / chunk, items = (i64)B * H * chunks;
  const i64 part = (i64)B * H * G * D;
  std::vector<float> partial((size_t)threads * part, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    float* mine = partial.data() + tid * part;
    std::vector<float> w((size_t)G * chunk);
    std::vector<const uint8_t*> rows(chunk);
    float zs[MAXG];
    i64 begin, end;
    share(items, omp_get_num_threads(), tid, &begin, &end);
    for (i64 it = begin; it < end; ++it) {
      const i64 bh = it / chunks, b = bh / H, h = bh % H, n0 = (it % chunks) * chunk, n1 = std::min(N, n0 + chunk);
      const i64 m = n1 - n0;
      const float* lvh = levels + (levels_per_head ? h << BITS : 0);
      const Lut<BITS> lut(lvh);
      const float* pp = p + b * pb + h * ph;
      float* acc_out = mine + (b * H + h) * (i64)G * D;
      for (int g = 0; g < G; ++g) zs[g] = 0.0f;
      for (i64 n = n0; n < n1; ++n) {
        const i64 blk = n / T, t = n % T;
        rows[n - n0] = codes.row(blk, b, h, t);
        const float s = vscale.at(blk, b, h, t), z = vzero.at(blk, b, h, t);
        for (int g = 0; g < G; ++g) {
          const float pv = pp[g * pg + n];
          w[g * chunk + (n - n0)] = pv * s;
          zs[g] += pv * z;
        }
      }
      int i = 0;
      for (; i + 8 * PAIR <= D; i += 8 * PAIR) {  // PAIR channel chunks per pass over the tokens
        __m256 acc[(GT > 0 ? GT : MAXG) * PAIR];
        for (int g = 0; g < G * PAIR; ++g) acc[g] = _mm256_setzero_ps();
        for (i64 j = 0; j < m; ++j) {
          const uint8_t* row = rows[j] + (i / 8) * BITS;
          __m256 lv[PAIR];
          for (int e = 0; e < PAIR; ++e) lv[e] = lut.get(codes8<BITS>(row + e * BITS));
          for (int g = 0; g < G; ++g) {
            const __m256 wv = _mm256_broadcast_ss(&w[g * chunk + j]);
            for (int e = 0; e < PAIR; ++e) acc[PAIR * g + e] = _mm256_fmadd_ps(wv, lv[e], acc[PAIR * g + e]);
          }
        }
        for (int g = 0; g < G; ++g) {
          const __m256 zv = _mm256_set1_ps(zs[g]);
          for (int e = 0; e < PAIR; ++e) {
            float* dst = acc_out + g * D + i + 8 * e;
            _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), _mm256_add_ps(acc[PAIR * g + e], zv)));
          }
        }
      }
      for (; i < D; i += 8) {
        __m256 acc[GT > 0 ? GT : MAXG];
        for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
        for (i64 j = 0; j < m; ++j) {
          const __m256 lv = lut.get(codes8<BITS>(rows[j] + (i / 8) * BITS));
          for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(&w[g * chunk + j]), lv, acc[g]);
        }
        for (int g = 0; g < G; ++g) {
          float* dst = acc_out + g * D + i;
          _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), _mm256_add_ps(acc[g], _mm256_set1_ps(zs[g]))));
        }
      }
    }
  }
  if (outl) {  // replaced elements: add p * (outlier - dequantized), each token's outliers once for all heads
    const i64 citems = (i64)B * chunks;
#pragma omp parallel num_threads(threads)
    {
      float* mine = partial.data() + omp_get_thread_num() * part;
      i64 begin, end;
      share(citems, omp_get_num_threads(), omp_get_thread_num(), &begin, &end);
      for (i64 it = begin; it < end; ++it) {
        const i64 b = it / chunks, n0 = (it % chunks) * chunk, n1 = std::min(N, n0 + chunk);
        for (i64 n = n0; n < n1; ++n) {
          const i64 blk = n / T, t = n % T;
          auto fix = [&](int h, int c, float v) {
            const float s = vscale.at(blk, b, h, t), z = vzero.at(blk, b, h, t);
            const float* lvh = levels + (levels_per_head ? h << BITS : 0);
            const float delta = v - (s * lvh[code_at(codes.row(blk, b, h, t), c, BITS)] + z);
            float* acc_out = mine + (b * H + h) * (i64)G * D;
            const float* pp = p + b * pb + h * ph;
            for (int g = 0; g < G; ++g) acc_out[g * D + c] += pp[g * pg + n] * delta;
          };
          if (outl->span_all) {
            const i64 row = (blk * B + b) * T + t;
            for (i64 j = outl->ptr[row]; j < outl->ptr[row + 1]; ++j) {
              const int col = (int)count_at(outl->indices, outl->index_size, j);
              fix(col / D, col % D, h2f(outl->values[j]));
            }
          } else {
            for (int h = 0; h < H; ++h) {
              const i64 row = ((blk * B + b) * H + h) * T + t;
              for (i64 j = outl->ptr[row]; j < outl->ptr[row + 1]; ++j)
                fix(h, (int)count_at(outl->indices, outl->index_size, j), h2f(outl->values[j]));
            }
          }
        }
      }
    }
  }
  for (int tid = 0; tid < threads; ++tid) {
    const float* src = partial.data() + tid * part;
    for (i64 bh = 0; bh < (i64)B * H; ++bh)
      for (int g = 0; g < G; ++g) {
        float* dst = out + (bh / H) * ob + (bh % H) * oh + g * og;
        const float* s = src + (bh * G + g) * D;
        for (int d = 0; d < D; ++d) dst[d] += s[d];
      }
  }
}

// ------------------------------------------------------------------------------------------------ rvq
struct Rvq {
  const uint16_t* books;  // fp16 [depth, C, gs] (the codec's codebooks are fp16 values: exact, half the cache)
  int depth, C, gs, cbits;
  const int32_t* inv_perm;  // [D] or nullptr (contiguous groups)
  // outliers in the one sparse format, rows (blk, b, h, t) over channels: counts, channel indices, fp16 values;
  // nullptr if none
  const void* counts;
  int count_size;
  const void* channels;
  int channel_size;
  const uint16_t* values;
};

// Decode one token vector into k[D] (natural channel order), scaled; kp is scratch [D].
inline void add_codeword(float* dst, const uint16_t* cw, int gs, bool first) {
  int e = 0;
  for (; e + 8 <= gs; e += 8) {
    const __m256 w = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(cw + e)));
    _mm256_storeu_ps(dst + e, first ? w : _mm256_add_ps(_mm256_loadu_ps(dst + e), w));
  }
  for (; e < gs; ++e) dst[e] = first ? h2f(cw[e]) : dst[e] + h2f(cw[e]);
}

inline void rvq_decode(const uint8_t* row, const Rvq& r, int D, float scale, float* kp, float* k) {
  const int n = D / r.gs;
  for (int j = 0; j < n; ++j) {
    float* dst = kp + j * r.gs;
    for (int s = 0; s < r.depth; ++s) {
      const uint16_t* cw = r.books + ((i64)s * r.C + code_at(row, (i64)j * r.depth + s, r.cbits)) * r.gs;
      add_codeword(dst, cw, r.gs, s == 0);
    }
  }
  if (r.inv_perm) {
    for (int c = 0; c < D; ++c) k[c] = kp[r.inv_perm[c]] * scale;
  } else {
    for (int c = 0; c < D; ++c) k[c] = kp[c] * scale;
  }
}

std::vector<i64> row_pointers(const void* counts, int size, i64 rows) {
  std::vector<i64> ptr((size_t)rows + 1, 0);
  if (counts)
    for (i64 r = 0; r < rows; ++r) ptr[r + 1] = ptr[r] + count_at(counts, size, r);
  return ptr;
}

void rvq_keys(const float* q, i64 qb, i64 qh, i64 qg, Codes codes, int nblk, int B, int H, int T, int D, int G,
              Half4 scale, Rvq r, Rope rope, float* out, i64 ob, i64 oh, i64 og, int threads) {
  const i64 N = (i64)nblk * T, chunk = 64, chunks = (N + chunk - 1) / chunk, items = (i64)B * H * chunks;
  const std::vector<i64> ptr = row_pointers(r.counts, r.count_size, (i64)nblk * B * H * T);
#pragma omp parallel num_threads(threads)
  {
    alignas(32) float k[1024], kp[1024];
    i64 begin, end;
    share(items, omp_get_num_threads(), omp_get_thread_num(), &begin, &end);
    for (i64 it = begin; it < end; ++it) {
      const i64 bh = it / chunks, b = bh / H, h = bh % H, n0 = (it % chunks) * chunk, n1 = std::min(N, n0 + chunk);
      for (i64 n = n0; n < n1; ++n) {
        const i64 blk = n / T, t = n % T;
        rvq_decode(codes.row(blk, b, h, t), r, D, scale.at(blk, b, h, t), kp, k);
        if (r.counts) {
          const i64 row = ((blk * B + b) * H + h) * T + t;
          for (i64 j = ptr[row]; j < ptr[row + 1]; ++j) k[count_at(r.channels, r.channel_size, j)] = h2f(r.values[j]);
        }
        const float* cs = rope.cos ? rope.cos + b * rope.sb + n * rope.st : nullptr;
        const float* sn = rope.cos ? rope.sin + b * rope.sb + n * rope.st : nullptr;
        dot_rope(k, q + b * qb + h * qh, qg, G, D, rope, cs, sn, out + b * ob + h * oh + n, og);
      }
    }
  }
}

// p . v by code histograms: sum_n w_n * sum_s cw[s, code(n, j, s)] = sum_s sum_c (sum_{n: code = c} w_n) cw[s, c].
// Per (b, h): scatter w = p * scale into hist[g][s][j][c] (n_groups * depth adds per token and query row), then
// one pass over the nonzero bins adds w * codeword. Outliers: p * (value - decoded) per replaced element.
void rvq_values_hist(const float* p, i64 pb, i64 ph, i64 pg, Codes codes, int nblk, int B, int H, int T, int D,
                     int G, Half4 scale, Rvq r, float* out, i64 ob, i64 oh, i64 og, int threads) {
  const i64 N = (i64)nblk * T;
  const int n = D / r.gs, depth = r.depth, C = r.C, gs = r.gs;
  const std::vector<i64> ptr = row_pointers(r.counts, r.count_size, (i64)nblk * B * H * T);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> hist((size_t)G * depth * n * C);
    std::vector<int32_t> code((size_t)n * depth);
    alignas(32) float v[1024], kp[1024], acc[1024];
    i64 begin, end;
    share((i64)B * H, omp_get_num_threads(), omp_get_thread_num(), &begin, &end);
    for (i64 bh = begin; bh < end; ++bh) {
      const i64 b = bh / H, h = bh % H;
      std::fill(hist.begin(), hist.end(), 0.0f);
      std::vector<float> direct((size_t)G * D, 0.0f);
      const float* pp = p + b * pb + h * ph;
      for (i64 t_all = 0; t_all < N; ++t_all) {
        const i64 blk = t_all / T, t = t_all % T;
        const uint8_t* row = codes.row(blk, b, h, t);
        const float sc = scale.at(blk, b, h, t);
        for (int k = 0; k < n * depth; ++k) code[k] = code_at(row, k, r.cbits);
        for (int g = 0; g < G; ++g) {
          const float w = pp[g * pg + t_all] * sc;
          float* hg = hist.data() + (size_t)g * depth * n * C;
          for (int j = 0; j < n; ++j)
            for (int s = 0; s < depth; ++s) hg[((size_t)s * n + j) * C + code[j * depth + s]] += w;
        }
        if (r.counts) {
          const i64 rr = ((blk * B + b) * H + h) * T + t;
          if (ptr[rr + 1] > ptr[rr]) {
            rvq_decode(row, r, D, sc, kp, v);
            for (i64 e = ptr[rr]; e < ptr[rr + 1]; ++e) {
              const int ch = (int)count_at(r.channels, r.channel_size, e);
              const float delta = h2f(r.values[e]) - v[ch];
              for (int g = 0; g < G; ++g) direct[(size_t)g * D + ch] += pp[g * pg + t_all] * delta;
            }
          }
        }
      }
      for (int g = 0; g < G; ++g) {
        const float* hg = hist.data() + (size_t)g * depth * n * C;
        for (int i = 0; i < D; ++i) acc[i] = 0.0f;  // group order
        for (int s = 0; s < depth; ++s)
          for (int j = 0; j < n; ++j) {
            const float* bins = hg + ((size_t)s * n + j) * C;
            float* a = acc + j * gs;
            for (int c = 0; c < C; ++c) {
              const float w = bins[c];
              if (w == 0.0f) continue;
              const uint16_t* cw = r.books + ((i64)s * C + c) * gs;
              int e = 0;
              const __m256 wv = _mm256_set1_ps(w);
              for (; e + 8 <= gs; e += 8)
                _mm256_storeu_ps(a + e, _mm256_fmadd_ps(wv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(cw + e))),
                                                        _mm256_loadu_ps(a + e)));
              for (; e < gs; ++e) a[e] += w * h2f(cw[e]);
            }
          }
        float* dst = out + b * ob + h * oh + g * og;
        for (int ch = 0; ch < D; ++ch) dst[ch] += (r.inv_perm ? acc[r.inv_perm[ch]] : acc[ch]) + direct[(size_t)g * D + ch];
      }
    }
  }
}

void rvq_values(const float* p, i64 pb, i64 ph, i64 pg, Codes codes, int nblk, int B, int H, int T, int D, int G,
                Half4 scale, Rvq r, float* out, i64 ob, i64 oh, i64 og, int threads) {
  const i64 N = (i64)nblk * T, chunk = 256, chunks = (N + chunk - 1) / chunk, items = (i64)B * H * chunks;
  if (N >= 256 && (i64)B * H >= threads) {  // enough tokens to amortize the bins, enough heads to share them
    rvq_values_hist(p, pb, ph, pg, codes, nblk, B, H, T, D, G, scale, r, out, ob, oh, og, threads);
    return;
  }
  const i64 part = (i64)B * H * G * D;
  const std::vector<i64> ptr = row_pointers(r.counts, r.count_size, (i64)nblk * B * H * T);
  std::vector<float> partial((size_t)threads * part, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    float* mine = partial.data() + tid * part;
    alignas(32) float v[1024], kp[1024];
    i64 begin, end;
    share(items, omp_get_num_threads(), tid, &begin, &end);
    for (i64 it = begin; it < end; ++it) {
      const i64 bh = it / chunks, b = bh / H, h = bh % H, n0 = (it % chunks) * chunk, n1 = std::min(N, n0 + chunk);
      float* acc = mine + (b * H + h) * (i64)G * D;
      for (i64 n = n0; n < n1; ++n) {
        const i64 blk = n / T, t = n % T;
        rvq_decode(codes.row(blk, b, h, t), r, D, scale.at(blk, b, h, t), kp, v);
        if (r.counts) {
          const i64 row = ((blk * B + b) * H + h) * T + t;
          for (i64 j = ptr[row]; j < ptr[row + 1]; ++j) v[count_at(r.channels, r.channel_size, j)] = h2f(r.values[j]);
        }
        for (int g = 0; g < G; ++g) {
          const __m256 w = _mm256_set1_ps(p[b * pb + h * ph + g * pg + n]);
          float* a = acc + g * D;
          for (int i = 0; i < D; i += 8)
            _mm256_storeu_ps(a + i, _mm256_fmadd_ps(w, _mm256_load_ps(v + i), _mm256_loadu_ps(a + i)));
        }
      }
    }
  }
  for (int tid = 0; tid < threads; ++tid) {
    const float* src = partial.data() + tid * part;
    for (i64 bh = 0; bh < (i64)B * H; ++bh)
      for (int g = 0; g < G; ++g) {
        float* dst = out + (bh / H) * ob + (bh % H) * oh + g * og;
        const float* s = src + (bh * G + g) * D;
        for (int d = 0; d < D; ++d) dst[d] += s[d];
      }
  }
}


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

// ------------------------------------------------------------------------------------------------ fp16 parts
// fp16 keys x[b, h, t, :] (head / tail of a layer): scores with RoPE; values: out += p * v.
void fp16_keys(const float* q, i64 qb, i64 qh, i64 qg, const uint16_t* x, i64 xb, i64 xh, i64 xt, int B, int H,
               int n, int D, int G, Rope rope, float* out, i64 ob, i64 oh, i64 og) {
  alignas(32) float k[1024];
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int t = 0; t < n; ++t) {
        const uint16_t* row = x + b * xb + h * xh + t * xt;
        for (int i = 0; i < D; i += 8) _mm256_store_ps(k + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(row + i))));
        const float* cs = rope.cos ? rope.cos + b * rope.sb + t * rope.st : nullptr;
        const float* sn = rope.cos ? rope.sin + b * rope.sb + t * rope.st : nullptr;
        dot_rope(k, q + b * qb + h * qh, qg, G, D, rope, cs, sn, out + b * ob + h * oh + t, og);
      }
}

void fp16_values(const float* p, i64 pb, i64 ph, i64 pg, const uint16_t* x, i64 xb, i64 xh, i64 xt, int B, int H,
                 int n, int D, int G, float* out, i64 ob, i64 oh, i64 og) {
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int t = 0; t < n; ++t) {
        const uint16_t* row = x + b * xb + h * xh + t * xt;
        for (int g = 0; g < G; ++g) {
          const __m256 w = _mm256_set1_ps(p[b * pb + h * ph + g * pg + t]);
          float* o = out + b * ob + h * oh + g * og;
          for (int i = 0; i < D; i += 8) {
            const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(row + i)));
            _mm256_storeu_ps(o + i, _mm256_fmadd_ps(w, v, _mm256_loadu_ps(o + i)));
          }
        }
      }
}

// ------------------------------------------------------------------------------------------------ softmax
// exp for x <= 88 (Cephes polynomial after n*ln2 range reduction, ~1 ulp); x < -87.3 gives 0.
inline __m256 exp256(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), keep);
}

struct Mask {
  const void* ptr;  // nullptr: none
  int kind;         // 1: bool (true = attend), 2: float32 additive
  i64 sb, sq, sk;   // strides of batch, query token, key
  int causal;       // no mask and several queries: query i sees keys <= K - Q + i
};

// In place over scores [B, H, G, K] (row g = query head g / Q, query token g % Q): softcap, mask, softmax.
void softmax_rows(float* s, int B, int H, int G, int Q, i64 K, float softcap, Mask m, int threads) {
  const i64 rows = (i64)B * H * G;
  const float ninf = -std::numeric_limits<float>::infinity();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (i64 r = 0; r < rows; ++r) {
    float* x = s + r * K;
    const i64 b = r / ((i64)H * G), qi = (r % G) % Q;
    if (softcap > 0) for (i64 k = 0; k < K; ++k) x[k] = std::tanh(x[k] / softcap) * softcap;
    if (m.ptr) {
      if (m.kind == 1) {
        const uint8_t* mm = (const uint8_t*)m.ptr + b * m.sb + qi * m.sq;
        for (i64 k = 0; k < K; ++k) if (!mm[k * m.sk]) x[k] = ninf;
      } else {
        const float* mm = (const float*)m.ptr + b * m.sb + qi * m.sq;
        for (i64 k = 0; k < K; ++k) x[k] += mm[k * m.sk];
      }
    } else if (m.causal) {
      for (i64 k = K - Q + qi + 1; k < K; ++k) x[k] = ninf;
    }
    __m256 mx = _mm256_set1_ps(ninf);
    i64 k = 0;
    for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(x + k));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mx);
    float top = ninf;
    for (int j = 0; j < 8; ++j) top = std::max(top, lanes[j]);
    for (; k < K; ++k) top = std::max(top, x[k]);
    if (top == ninf) top = 0.0f;  // a fully masked row: all zeros, divided by 0 below (NaN, like SDPA's math path)
    const __m256 tv = _mm256_set1_ps(top);
    __m256 sum = _mm256_setzero_ps();
    for (k = 0; k + 8 <= K; k += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + k), tv));
      _mm256_storeu_ps(x + k, e);
      sum = _mm256_add_ps(sum, e);
    }
    float total = hsum8(sum);
    for (; k < K; ++k) {
      const float d = x[k] - top;
      x[k] = d < -87.3f ? 0.0f : std::exp(d);
      total += x[k];
    }
    const __m256 inv = _mm256_set1_ps(1.0f / total);
    for (k = 0; k + 8 <= K; k += 8) _mm256_storeu_ps(x + k, _mm256_mul_ps(_mm256_loadu_ps(x + k), inv));
    for (; k < K; ++k) x[k] /= total;
  }
}


// ------------------------------------------------------------------------------------------------ encode
// NuqCodec.encode for appends, bit for bit: x [B, H, T, D] fp32 contiguous ->
//   codes uint8 [B, H, T * D * BITS / 8] (8 codes per BITS bytes, little-endian bit stream),
//   keys (per channel, offline zero/scale [H, D]): outlier mask |u| > 1;
//   values (per token over Hs = H heads (span all) or 1): the k smallest / largest are outliers, zero/scale
//   (fp16 [B, H / Hs, T]) from the range of the rest; mask uint8 [B, H, T, D] (nullptr: no outliers).
inline float fp16_round(float v) { return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT)); }

inline void pack_row(const uint8_t* code, int D, int bits, uint8_t* out) {
  for (int g = 0; g < D / 8; ++g) {
    uint64_t w = 0;
    for (int k = 0; k < 8; ++k) w |= (uint64_t)code[g * 8 + k] << (k * bits);
    for (int j = 0; j < bits; ++j) out[g * bits + j] = (uint8_t)(w >> (8 * j));
  }
}

inline uint8_t nearest(float u, const float* mid, int n) {  // count of midpoints below u (bucketize, right=False)
  int c = 0;
  for (int j = 0; j < n; ++j) c += mid[j] < u;
  return (uint8_t)c;
}

// Range of one token vector for per-token values: (lo, hi) without its k smallest and k largest elements (the
// outliers), then the fp16 zero and scale NuqCodec stores for it (a constant vector gets the tiniest fp16 scale,
// which decodes to its zero).
inline void token_range(const std::vector<float>& vec, std::vector<float>& work, int k_side, float* lo, float* hi,
                        float* zero, float* scale) {
  const int n = (int)vec.size();
  if (k_side > 0) {
    work = vec;
    std::nth_element(work.begin(), work.begin() + k_side, work.end());
    *lo = work[k_side];
    std::nth_element(work.begin(), work.begin() + (n - 1 - k_side), work.end());
    *hi = work[n - 1 - k_side];
  } else {
    *lo = *std::min_element(vec.begin(), vec.end());
    *hi = *std::max_element(vec.begin(), vec.end());
  }
  *zero = fp16_round((*hi + *lo) / 2);
  *scale = fp16_round((*hi - *lo) / 2);
  if (!(*scale > 0)) *scale = 5.9604645e-08f;
}

int nuq_encode(const float* x, int B, int H, int T, int D, int bits, int axis_token, const float* mid,
               int mid_per_head, const float* kzero, const float* kscale, int span_heads, int k_side,
               uint8_t* codes, uint16_t* vzero, uint16_t* vscale, uint8_t* mask) {
  const int L1 = (1 << bits) - 1;
  const i64 row_bytes = (i64)D * bits / 8;
  std::vector<uint8_t> code(D);
  if (!axis_token) {
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h) {
        const float* m = mid + (mid_per_head ? h * L1 : 0);
        for (int t = 0; t < T; ++t) {
          const i64 base = (((i64)b * H + h) * T + t) * D;
          for (int c = 0; c < D; ++c) {
            float u = (x[base + c] - kzero[h * D + c]) / kscale[h * D + c];
            if (mask) mask[base + c] = std::fabs(u) > 1.0f;
            u = std::min(std::max(u, -1.0f), 1.0f);
            code[c] = nearest(u, m, L1);
          }
          pack_row(code.data(), D, bits, codes + (((i64)b * H + h) * T + t) * row_bytes);
        }
      }
    return 0;
  }
  const int groups = H / span_heads, n = span_heads * D;
  std::vector<float> vec(n), work(n);
  for (int b = 0; b < B; ++b)
    for (int grp = 0; grp < groups; ++grp)
      for (int t = 0; t < T; ++t) {
        for (int r = 0; r < span_heads; ++r)
          std::memcpy(vec.data() + r * D, x + (((i64)b * H + grp * span_heads + r) * T + t) * D, sizeof(float) * D);
        float lo, hi, zero, scale;
        token_range(vec, work, k_side, &lo, &hi, &zero, &scale);
        const i64 zs = ((i64)b * groups + grp) * T + t;
        vzero[zs] = _cvtss_sh(zero, _MM_FROUND_TO_NEAREST_INT);
        vscale[zs] = _cvtss_sh(scale, _MM_FROUND_TO_NEAREST_INT);
        for (int r = 0; r < span_heads; ++r) {
          const int h = grp * span_heads + r;
          const float* m = mid + (mid_per_head ? h * L1 : 0);
          const i64 base = (((i64)b * H + h) * T + t) * D;
          for (int c = 0; c < D; ++c) {
            const float v = vec[r * D + c];
            if (mask) mask[base + c] = k_side > 0 && (v < lo || v > hi);
            float u = (v - zero) / scale;
            u = std::min(std::max(u, -1.0f), 1.0f);
            code[c] = nearest(u, m, L1);
          }
          pack_row(code.data(), D, bits, codes + (((i64)b * H + h) * T + t) * row_bytes);
        }
      }
  return 0;
}

// NuqCodec.encode with per-channel widths: channel c's code is the count of its midpoints (mids + c * L1, padded
// past its own 2**bits levels with midpoints above 1) below u; the codes of each width group are packed per token
// (n codes of `bits` bits, n % 8 == 0) at gcodes[g] + (b * T + t) * n * bits / 8. Ranges, mask as nuq_encode.
int mixed_encode(const float* x, int B, int H, int T, int D, int axis_token, const float* mids, int L1,
                 const float* kzero, const float* kscale, int span_heads, int k_side, int ng, const i64* groups,
                 uint16_t* vzero, uint16_t* vscale, uint8_t* mask) {
  const int HD = H * D;
  std::vector<uint8_t> code(HD), buf(HD);
  std::vector<float> u(HD), vec(span_heads * D), work(span_heads * D);
  const int spans = H / span_heads, n = span_heads * D;
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) {
      if (!axis_token) {
        for (int h = 0; h < H; ++h)
          for (int c = 0; c < D; ++c) {
            const i64 e = (((i64)b * H + h) * T + t) * D + c;
            u[h * D + c] = (x[e] - kzero[h * D + c]) / kscale[h * D + c];
            if (mask) mask[e] = std::fabs(u[h * D + c]) > 1.0f;
          }
      } else {
        for (int grp = 0; grp < spans; ++grp) {
          for (int r = 0; r < span_heads; ++r)
            std::memcpy(vec.data() + r * D, x + (((i64)b * H + grp * span_heads + r) * T + t) * D, sizeof(float) * D);
          float lo, hi, zero, scale;
          token_range(vec, work, k_side, &lo, &hi, &zero, &scale);
          const i64 zs = ((i64)b * spans + grp) * T + t;
          vzero[zs] = _cvtss_sh(zero, _MM_FROUND_TO_NEAREST_INT);
          vscale[zs] = _cvtss_sh(scale, _MM_FROUND_TO_NEAREST_INT);
          for (int r = 0; r < span_heads; ++r) {
            const int h = grp * span_heads + r;
            for (int c = 0; c < D; ++c) {
              const float v = vec[r * D + c];
              if (mask) mask[(((i64)b * H + h) * T + t) * D + c] = k_side > 0 && (v < lo || v > hi);
              u[h * D + c] = (v - zero) / scale;
            }
          }
        }
      }
      for (int c = 0; c < HD; ++c) code[c] = nearest(std::min(std::max(u[c], -1.0f), 1.0f), mids + (i64)c * L1, L1);
      for (int g = 0; g < ng; ++g) {
        const int bits = (int)groups[4 * g], m = (int)groups[4 * g + 1];
        const int32_t* cols = (const int32_t*)groups[4 * g + 2];
        uint8_t* out = (uint8_t*)groups[4 * g + 3];
        for (int j = 0; j < m; ++j) buf[j] = code[cols[j]];
        pack_row(buf.data(), m, bits, out + ((i64)b * T + t) * m * bits / 8);
      }
    }
  return 0;
}

// ------------------------------------------------------------------------------------------------ turboquant
// Per token vector: the first k rotated coordinates coded at wh bits (row `hi`), the other D - k at wl bits
// (row `lo`), each row byte-aligned, and an fp16 norm: the vector in the rotated frame is norm * levels[code].
// Keys score against the rotated query R q (q . k = R q . R k); values accumulate in the rotated frame and
// are turned back once per call by R^T. `rot` [D, D]: row i holds R e_i.
struct Tq {
  Codes lo;
  int wh, wl, k;
  const float* lvh;
  const float* lvl;
  Half4 norm;
  const float* rot;
};

template <int BITS>
inline void tq_unpack_bits(const uint8_t* row, int n, const float* lv, float* y) {
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_i32gather_ps(lv, codes8<BITS>(row + (i / 8) * BITS), 4));
  for (; i < n; ++i) y[i] = lv[code_at(row, i, BITS)];
}

inline void tq_unpack(const uint8_t* row, int n, int bits, const float* lv, float* y) {
  switch (bits) {
    case 1: tq_unpack_bits<1>(row, n, lv, y); break;
    case 2: tq_unpack_bits<2>(row, n, lv, y); break;
    case 3: tq_unpack_bits<3>(row, n, lv, y); break;
    case 4: tq_unpack_bits<4>(row, n, lv, y); break;
    case 5: tq_unpack_bits<5>(row, n, lv, y); break;
    case 6: tq_unpack_bits<6>(row, n, lv, y); break;
    case 7: tq_unpack_bits<7>(row, n, lv, y); break;
    default: tq_unpack_bits<8>(row, n, lv, y); break;
  }
}

// The rotated-frame unit vector of token (blk, b, h, t) into y[D].
inline void tq_row(const Codes& hi, const Tq& z, i64 blk, i64 b, i64 h, i64 t, int D, float* y) {
  if (z.k > 0) tq_unpack(hi.row(blk, b, h, t), z.k, z.wh, z.lvh, y);
  if (z.k < D) tq_unpack(z.lo.row(blk, b, h, t), D - z.k, z.wl, z.lvl, y + z.k);
}

inline float dot(const float* a, const float* b, int D) {
  __m256 acc = _mm256_setzero_ps();
  for (int i = 0; i < D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  return hsum8(acc);
}

void tq_keys(const float* q, i64 qb, i64 qh, i64 qg, Codes hi, const Tq& z, int nblk, int B, int H, int T, int D, int G,
             float* out, i64 ob, i64 oh, i64 og, int threads) {
  std::vector<float> qr((size_t)B * H * G * D, 0.0f);  // R q per (b, h, g)
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int g = 0; g < G; ++g) {
        const float* src = q + b * qb + h * qh + g * qg;
        float* dst = qr.data() + (((i64)b * H + h) * G + g) * D;
        for (int i = 0; i < D; ++i)
          for (int c = 0; c < D; ++c) dst[c] += src[i] * z.rot[(i64)i * D + c];
      }
  const i64 N = (i64)nblk * T, chunk = 256, chunks = (N + chunk - 1) / chunk, items = (i64)B * H * chunks;
#pragma omp parallel num_threads(threads)
  {
    alignas(32) float y[1024];
    i64 begin, end;
    share(items, omp_get_num_threads(), omp_get_thread_num(), &begin, &end);
    for (i64 it = begin; it < end; ++it) {
      const i64 bh = it / chunks, b = bh / H, h = bh % H, n0 = (it % chunks) * chunk, n1 = std::min(N, n0 + chunk);
      const float* qq = qr.data() + bh * G * D;
      float* o = out + b * ob + h * oh;
      for (i64 n = n0; n < n1; ++n) {
        const i64 blk = n / T, t = n % T;
        tq_row(hi, z, blk, b, h, t, D, y);
        const float nm = z.norm.at(blk, b, h, t);
        for (int g = 0; g < G; ++g) o[g * og + n] = nm * dot(qq + (i64)g * D, y, D);
      }
    }
  }
}

void tq_values(const float* p, i64 pb, i64 ph, i64 pg, Codes hi, const Tq& z, int nblk, int B, int H, int T, int D,
               int G, float* out, i64 ob, i64 oh, i64 og, int threads) {
  const i64 N = (i64)nblk * T, chunk = 256, chunks = (N + chunk - 1) / chunk, items = (i64)B * H * chunks;
  const i64 part = (i64)B * H * G * D;
  std::vector<float> partial((size_t)threads * part, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    float* mine = partial.data() + omp_get_thread_num() * part;
    alignas(32) float y[1024];
    i64 begin, end;
    share(items, omp_get_num_threads(), omp_get_thread_num(), &begin, &end);
    for (i64 it = begin; it < end; ++it) {
      const i64 bh = it / chunks, b = bh / H, h = bh % H, n0 = (it % chunks) * chunk, n1 = std::min(N, n0 + chunk);
      const float* pp = p + b * pb + h * ph;
      float* acc = mine + bh * G * D;
      for (i64 n = n0; n < n1; ++n) {
        const i64 blk = n / T, t = n % T;
        tq_row(hi, z, blk, b, h, t, D, y);
        const float nm = z.norm.at(blk, b, h, t);
        for (int g = 0; g < G; ++g) {
          const __m256 w = _mm256_set1_ps(pp[g * pg + n] * nm);
          float* a = acc + (i64)g * D;
          for (int c = 0; c < D; c += 8) _mm256_storeu_ps(a + c, _mm256_fmadd_ps(w, _mm256_load_ps(y + c), _mm256_loadu_ps(a + c)));
        }
      }
    }
  }
  std::vector<float> rotated(part, 0.0f);
  for (int tid = 0; tid < threads; ++tid)
    for (i64 i = 0; i < part; ++i) rotated[i] += partial[tid * part + i];
  for (i64 bh = 0; bh < (i64)B * H; ++bh)  // back from the rotated frame: out_i += sum_c (R e_i)_c acc_c
    for (int g = 0; g < G; ++g) {
      const float* a = rotated.data() + (bh * G + g) * D;
      float* dst = out + (bh / H) * ob + (bh % H) * oh + g * og;
      for (int i = 0; i < D; ++i) dst[i] += dot(z.rot + (i64)i * D, a, D);
    }
}

// ------------------------------------------------------------------------------------------------ nuq, mixed widths
}  // namespace
#include "cpu_kernels/mixed.h"
namespace {

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
  if (kind == SEG_NUQ) {
    const int bits = (int)r.next();
    const float* levels = (const float*)r.ptr();
    const int per_head = (int)r.next();
    const uint16_t* ov = (const uint16_t*)r.ptr();
    const void* oi = r.ptr();
    const int ois = (int)r.next();
    const void* oc = r.ptr();
    const int ocs = (int)r.next();
    const int omode = (int)r.next();
    if (keys) {
      const float* kscale = (const float*)r.ptr();
      const float* kzero = (const float*)r.ptr();
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
    m.ng = (int)r.next();
    if (m.ng < 1 || m.ng > 9 || D % 8) return -1;
    for (int i = 0; i < m.ng; ++i) {
      mixed::Group& g = m.g[i];
      g.bits = (int)r.next(); g.n = (int)r.next();
      g.codes = (const uint8_t*)r.ptr(); g.sblk = r.next(); g.sb = r.next(); g.st = r.next();
      g.cols = (const int32_t*)r.ptr(); g.levels = (const float*)r.ptr();
      g.scale = (const float*)r.ptr(); g.zero = (const float*)r.ptr();
      if (g.bits < 1 || g.bits > 8 || g.n % 8 || (keys && !g.scale)) return -1;
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
      m.ptr = row_pointers(oc, ocs, m.omode == 1 ? (i64)nblk * B * T : (i64)nblk * B * H * T);
    }
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

int kvpack_abi_version() { return 11; }

// Attention of one layer for a decode step. Array layout:
//   query ptr (float32 [B, Hq, Q, D], any strides with a contiguous last dim), its strides b, head, token,
//   B, H (KV heads), G0 (query heads per KV head), Q (query tokens), D, K (stored tokens), threads,
//   scaling (float bits), out ptr (float32 [B, Q, Hq, D] contiguous), softcap (float bits, 0 = none),
//   mask ptr (0 = none), kind (1 bool / 2 float32), strides b, q, k, causal (no mask, Q > 1),
//   rope cos ptr (0: keys not rotated), sin ptr, strides b, token, rot,
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
  const float* cos = (const float*)r.ptr();
  const float* sin = (const float*)r.ptr();
  const i64 rsb = r.next(), rst = r.next();
  const int rot = (int)r.next();
  const int G = G0 * Q;
  if (G > MAXG || D > 1024 || D % 8 || rot % 16 || rot > D) return -1;
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
             (i64)G * K, K, Rope{cos ? cos + off * rst : nullptr, cos ? sin + off * rst : nullptr, rsb, rst, cos ? rot : 0}};
    const int code = run_segment(r, c, true);
    if (code) return code;
    off += n;
  }
  if (off != K) return -4;
  softmax_rows(scores.data(), B, H, G, Q, K, softcap, m, threads);
  static thread_local std::vector<float> out;
  out.assign((size_t)B * H * G * D, 0.0f);
  const int nv = (int)r.next();
  off = 0;
  for (int s = 0; s < nv; ++s) {
    const i64 n = r.next();
    Common c{B, H, G, D, threads, scores.data() + off, (i64)H * G * K, (i64)G * K, K, out.data(), (i64)H * G * D,
             (i64)G * D, D, Rope{nullptr, nullptr, 0, 0, 0}};
    const int code = run_segment(r, c, false);
    if (code) return code;
    off += n;
  }
  if (off != K) return -4;
  const int HQ = H * G0;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int g = 0; g < G; ++g) {
        const float* src = out.data() + (((i64)b * H + h) * G + g) * D;
        float* dst = final_out + (((i64)b * Q + g % Q) * HQ + h * G0 + g / Q) * D;
        std::memcpy(dst, src, sizeof(float) * D);
      }
  return 0;
}


// NuqCodec.encode (see nuq_encode). Array: x ptr, B, H, T, D, bits, axis_token, mid ptr, mid_per_head, kzero ptr,
// kscale ptr, span_heads, k_side, codes ptr, vzero ptr, vscale ptr, mask ptr (0: no outliers), sparse mode, outlier values,
// positions, counts, nnz ptrs (the sparse layout, see sparse_rows).
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

int kvpack_nuq_encode(const i64* a) {
  Reader r{a};
  const float* x = (const float*)r.ptr();
  const int B = (int)r.next(), H = (int)r.next(), T = (int)r.next(), D = (int)r.next(), bits = (int)r.next();
  const int axis_token = (int)r.next();
  const float* mid = (const float*)r.ptr();
  const int mid_per_head = (int)r.next();
  const float* kzero = (const float*)r.ptr();
  const float* kscale = (const float*)r.ptr();
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
  if (D % 8 || bits < 1 || bits > 8 || span_heads < 1 || H % span_heads) return -1;
  const int code = nuq_encode(x, B, H, T, D, bits, axis_token, mid, mid_per_head, kzero, kscale, span_heads, k_side,
                              codes, vzero, vscale, mask);
  if (code == 0 && mask)
    *out_nnz = sparse_rows(x, mask, B, H, T, D, mode, out_values, out_positions, out_counts);
  return code;
}

// Mixed-width encode (see mixed_encode). Array: x ptr, B, H, T, D, axis_token, mids ptr, L1, kzero ptr, kscale ptr,
// span_heads, k_side, number of groups, groups ptr (int64 [g][bits, n, cols ptr, codes ptr]), vzero ptr, vscale ptr,
// mask ptr (0: no outliers), sparse mode, outlier values, positions, counts, nnz ptrs (as kvpack_nuq_encode).
int kvpack_mixed_encode(const i64* a) {
  Reader r{a};
  const float* x = (const float*)r.ptr();
  const int B = (int)r.next(), H = (int)r.next(), T = (int)r.next(), D = (int)r.next();
  const int axis_token = (int)r.next();
  const float* mids = (const float*)r.ptr();
  const int L1 = (int)r.next();
  const float* kzero = (const float*)r.ptr();
  const float* kscale = (const float*)r.ptr();
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
  if (D % 8 || span_heads < 1 || H % span_heads || L1 < 1 || L1 > 255) return -1;
  for (int g = 0; g < ng; ++g)
    if (groups[4 * g] < 1 || groups[4 * g] > 8 || groups[4 * g + 1] % 8) return -1;
  const int code = mixed_encode(x, B, H, T, D, axis_token, mids, L1, kzero, kscale, span_heads, k_side, ng, groups,
                                vzero, vscale, mask);
  if (code == 0 && mask)
    *out_nnz = sparse_rows(x, mask, B, H, T, D, mode, out_values, out_positions, out_counts);
  return code;
}

}  // extern "C"
