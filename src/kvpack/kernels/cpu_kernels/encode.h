// kvpack CPU kernels: NuqCodec.encode for cache appends (one width and per-channel widths).
#pragma once
#include "common.h"

namespace {

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

// The n - 1 midpoints of n sorted fp16 levels in fp32, (a + b) * 0.5 as the codec's torch encode makes them: made per
// call, so a codec holds only its fp16 levels.
inline void fp16_midpoints(const uint16_t* levels, int n, float* out) {
  for (int j = 0; j + 1 < n; ++j) out[j] = (h2f(levels[j]) + h2f(levels[j + 1])) * 0.5f;
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

// levels: the codec's fp16 [1 | H][2**bits] (levels_per_head); keys' zero and scale: its fp16 [H * D].
int nuq_encode(const float* x, int B, int H, int T, int D, int bits, int axis_token, const uint16_t* levels,
               int levels_per_head, const uint16_t* kzero, const uint16_t* kscale, int span_heads, int k_side,
               uint8_t* codes, uint16_t* vzero, uint16_t* vscale, uint8_t* mask) {
  const int L1 = (1 << bits) - 1;
  std::vector<float> mid((size_t)(levels_per_head ? H : 1) * L1);
  for (size_t g = 0; g < mid.size() / L1; ++g) fp16_midpoints(levels + g * (L1 + 1), L1 + 1, mid.data() + g * L1);
  const i64 row_bytes = (i64)D * bits / 8;
  std::vector<uint8_t> code(D);
  if (!axis_token) {
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h) {
        const float* m = mid.data() + (levels_per_head ? h * L1 : 0);
        for (int t = 0; t < T; ++t) {
          const i64 base = (((i64)b * H + h) * T + t) * D;
          for (int c = 0; c < D; ++c) {
            float u = (x[base + c] - h2f(kzero[h * D + c])) / h2f(kscale[h * D + c]);
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
          const float* m = mid.data() + (levels_per_head ? h * L1 : 0);
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
// Per-channel widths: channel c's 2**widths[c] fp16 levels follow the previous channel's in `levels` (the codec's
// level_data); keys' zero and scale are the codec's fp16 [H * D]. Midpoints as nuq_encode's (fp16_midpoints).
int mixed_encode(const float* x, int B, int H, int T, int D, int axis_token, const uint16_t* levels,
                 const uint8_t* widths, const uint16_t* kzero, const uint16_t* kscale, int span_heads, int k_side, int ng,
                 const i64* groups, uint16_t* vzero, uint16_t* vscale, uint8_t* mask) {
  const int HD = H * D;
  std::vector<int> first(ng + 1, 0);  // each group's members, from the widths (the codec holds no column lists)
  for (int g = 0; g < ng; ++g) first[g + 1] = first[g] + (int)groups[3 * g + 1];
  std::vector<int16_t> columns((size_t)first[ng]);
  for (int g = 0; g < ng; ++g)
    if (width_columns(widths, HD, (int)groups[3 * g], columns.data() + first[g], (int)groups[3 * g + 1]) !=
        (int)groups[3 * g + 1])
      return -1;
  std::vector<i64> moff(HD + 1, 0);  // first midpoint of each channel
  for (int c = 0; c < HD; ++c) moff[c + 1] = moff[c] + (1 << widths[c]) - 1;
  std::vector<float> mids(moff[HD]);
  for (int c = 0, l = 0; c < HD; l += 1 << widths[c], ++c) fp16_midpoints(levels + l, 1 << widths[c], mids.data() + moff[c]);
  std::vector<uint8_t> code(HD), buf(HD);
  std::vector<float> u(HD), vec(span_heads * D), work(span_heads * D);
  const int spans = H / span_heads, n = span_heads * D;
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) {
      if (!axis_token) {
        for (int h = 0; h < H; ++h)
          for (int c = 0; c < D; ++c) {
            const i64 e = (((i64)b * H + h) * T + t) * D + c;
            u[h * D + c] = (x[e] - h2f(kzero[h * D + c])) / h2f(kscale[h * D + c]);
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
      for (int c = 0; c < HD; ++c)
        code[c] = nearest(std::min(std::max(u[c], -1.0f), 1.0f), mids.data() + moff[c], (int)(moff[c + 1] - moff[c]));
      for (int g = 0; g < ng; ++g) {
        const int bits = (int)groups[3 * g], m = (int)groups[3 * g + 1];
        const int16_t* cols = columns.data() + first[g];
        uint8_t* out = (uint8_t*)groups[3 * g + 2];
        for (int j = 0; j < m; ++j) buf[j] = code[cols[j]];
        pack_row(buf.data(), m, bits, out + ((i64)b * T + t) * m * bits / 8);
      }
    }
  return 0;
}

}  // namespace
