// kvpack CPU kernels: fp16 head / tail tokens of a layer.
#pragma once
#include "common.h"

namespace {

// ------------------------------------------------------------------------------------------------ fp16 parts
// fp16 keys x[b, h, t, :] (head / tail of a layer): scores with RoPE; values: out += p * v.
void fp16_keys(const float* q, i64 qb, i64 qh, i64 qg, const uint16_t* x, i64 xb, i64 xh, i64 xt, int B, int H,
               int n, int D, int G, Rope rope, float* out, i64 ob, i64 oh, i64 og) {
  alignas(32) float k[1024], rb[1024];
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int t = 0; t < n; ++t) {
        const uint16_t* row = x + b * xb + h * xh + t * xt;
        for (int i = 0; i < D; i += 8) _mm256_store_ps(k + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(row + i))));
        if (rope.pos) rope.row(b, t, rb);
        dot_rope(k, q + b * qb + h * qh, qg, G, D, rope, rb, rb + rope.rot / 2, out + b * ob + h * oh + t, og);
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

}  // namespace
