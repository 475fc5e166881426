// kvpack CPU kernels: softcap, mask and softmax over a layer's scores.
#pragma once
#include "common.h"

namespace {

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

// In place over scores [B, H, G, K] (row g = query head g / Q, query token g % Q): softcap, mask, exp(x - max);
// each row's 1 / sum goes to inv[row], the caller scaling what the row weighs (one pass over the scores less).
void softmax_rows(float* s, int B, int H, int G, int Q, i64 K, float softcap, Mask m, int threads, float* inv) {
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
    float top = ninf, total = 0.0f;
    i64 k = 0;
    __m256 mx = _mm256_set1_ps(ninf);
    for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(x + k));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mx);
    for (int j = 0; j < 8; ++j) top = std::max(top, lanes[j]);
    for (; k < K; ++k) top = std::max(top, x[k]);
    if (top == ninf) top = 0.0f;  // a fully masked row: all zeros, divided by 0 (NaN, like SDPA's math path)
    k = 0;
    const __m256 tv = _mm256_set1_ps(top);
    __m256 sum = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + k), tv));
      _mm256_storeu_ps(x + k, e);
      sum = _mm256_add_ps(sum, e);
    }
    total = hsum8(sum);
    for (; k < K; ++k) {
      const float d = x[k] - top;
      x[k] = d < -87.3f ? 0.0f : std::exp(d);
      total += x[k];
    }
    inv[r] = 1.0f / total;
  }
}

}  // namespace
