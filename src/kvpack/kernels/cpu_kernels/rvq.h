// kvpack CPU kernels: residual VQ: keys decoded per token, values by code histograms.
#pragma once
#include "common.h"

namespace {

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


void rvq_keys(const float* q, i64 qb, i64 qh, i64 qg, Codes codes, int nblk, int B, int H, int T, int D, int G,
              Half4 scale, Rvq r, Rope rope, float* out, i64 ob, i64 oh, i64 og, int threads) {
  const i64 N = (i64)nblk * T, chunk = 64, chunks = (N + chunk - 1) / chunk, items = (i64)B * H * chunks;
  const std::vector<i64> ptr = row_pointers(r.counts, r.count_size, (i64)nblk * B * H * T);
#pragma omp parallel num_threads(threads)
  {
    alignas(32) float k[1024], kp[1024], rb[1024];
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
        if (rope.pos) rope.row(b, n, rb);
        dot_rope(k, q + b * qb + h * qh, qg, G, D, rope, rb, rb + rope.rot / 2, out + b * ob + h * oh + n, og);
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

}  // namespace
