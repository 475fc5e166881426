// kvpack CPU kernels: nuq (KVQuant, one width): keys per channel with RoPE, values per token, sparse outliers.
#pragma once
#include "common.h"

namespace {

// ------------------------------------------------------------------------------------------------ codec state
// The kernels read a codec's fp16 state as the codec holds it and expand it per call (a few hundred floats).
// Levels as NuqCodec.decode_levels computes them in float32: fp16 levels [groups][L], times a, plus b of the fp16
// Q-Norm [groups][2] (nullptr: none), each operation rounded on its own as torch does.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
inline void decode_levels(const uint16_t* levels, const uint16_t* qnorm, int groups, int L, std::vector<float>* out) {
  out->resize((size_t)groups * L);
  for (int g = 0; g < groups; ++g)
    for (int e = 0; e < L; ++e) {
      float level = h2f(levels[g * L + e]);
      if (qnorm) {
        const float scaled = level * h2f(qnorm[2 * g]);
        level = scaled + h2f(qnorm[2 * g + 1]);
      }
      (*out)[(size_t)g * L + e] = level;
    }
}
#pragma GCC pop_options

// Keys' fp16 scale and zero [HD] -> float32 [scale..., zero...].
inline void key_ranges(const uint16_t* scale, const uint16_t* zero, int HD, std::vector<float>* out) {
  out->resize(2 * (size_t)HD);
  for (int i = 0; i < HD; ++i) (*out)[i] = h2f(scale[i]), (*out)[HD + i] = h2f(zero[i]);
}

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
  const int half = rope.pos ? rope.rot / 2 : 0, rot = rope.pos ? rope.rot : 0;
#pragma omp parallel num_threads(threads)
  {
    alignas(32) float part[MAXG * 8 * 8];  // [g][token of 8][lane]
    alignas(32) float rb[1024];  // cos, sin of one token
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
            if (half) rope.row(b, n, rb);
            const float* cs = rb;
            const float* sn = rb + half;
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
          if (half) rope.row(b, n, rb);
          const float* cs = half ? rb : nullptr;
          const float* sn = half ? rb + half : nullptr;
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

}  // namespace
