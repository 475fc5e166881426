// kvpack CPU kernels: TurboQuant: keys against R q, values in the rotated frame.
#pragma once
#include "common.h"

namespace {

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

}  // namespace
