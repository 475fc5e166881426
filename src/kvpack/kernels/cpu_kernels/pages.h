// kvpack CPU kernels: attention straight from kvpack's vLLM pages (kvpack.integrations.vllm: slots.py, pages.py,
// outlier_pool.py), what read.attend_torch computes, without decoding the whole cache to float32.
//
// A layer's pages: slot rows [blocks * block_size, slot_bytes] (key part | value part), sink records
// [blocks, sink_tokens, 2 (K, V), Hkv * D] in the model's dtype (post-RoPE keys), key-outlier pools
// [blocks, pool_bytes] (uint16 count, then entries: fp16 value, uint8 token offset in the page, uint8 channel).
// A part is "raw" (the model's dtype) or "nuq": one little-endian bitstream of codes over the H * D channels at
// their widths (<= 8 bits: channel c spans bytes byte[c], byte[c] + 1), then fp16 (zero[P], scale[P]) per token
// (per-token ranges), then `outliers` slots (fp16 values, then uint8 / int16 channel indices; H * D: unused).
// Per-channel parts come with a level table that already holds level * scale + zero: one gather per 8 channels.
//
// Work item = (request, KV head, block of up to QB query tokens); its rows are the block's tokens x the G query
// heads sharing the KV head (row = token * G + g), pre-multiplied by the softmax scale. Keys and values are read
// in tiles of TK positions through the block table (flash-attention style, one pass, online softmax): decode the
// tile's keys (pre-RoPE), write the page pool's outliers over them, rotate them to their positions (rotate_half
// RoPE), put the exact sink tokens back, transpose; scores of all rows against the tile (rows x W keys in
// registers), causal mask (bottom-right aligned), online softmax, o += p . v. Items are shared by OpenMP (a
// request's heads on one thread where items abound: head_chunk). On AVX-512,
// items of at most LANE_ROWS rows (decode steps) take the lane path (item_lanes): two passes, pre-RoPE keys
// rotated in registers as their scores accumulate (rope_scores), values summed per channel in token lanes straight
// from their codes, VT positions per pass over the channels.
#pragma once
#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "common.h"
#include "simd.h"
#include "softmax.h"

namespace {  // one translation unit (cpu_kernels.cpp) includes this
namespace pages {

using simd::W;
using simd::vf;
constexpr int TK = 32;        // key positions per tile (a multiple of W and 8)
constexpr int MAXROWS = 128;  // query rows per work item
constexpr int MAXD = 256;
constexpr int LANE_ROWS = 8;  // work items of at most this many query rows take the lane path (AVX-512)
constexpr int VT = 64;        // lane path: value positions per call of values_lanes (a multiple of TK)

struct Part {
  int kind;      // 0: raw (the model's dtype), 1: nuq
  int raw_type;  // raw: 0 float32, 1 float16, 2 bfloat16
  i64 offset;    // first byte of the part in the slot
  int code_bytes;
  const int32_t* byte;   // [H * D] first byte of channel c's code
  const int32_t* shift;  // [H * D] its bit offset in that byte
  const int32_t* mask;   // [H * D] 2**width - 1
  const int32_t* base;   // [H * D] its level row in `levels`
  const float* levels;   // per-channel ranges: level * scale + zero; per-token ranges: the levels
  int pairs, pair_div;   // per-token fp16 (zero, scale) pairs; channel c uses pair c / pair_div
  int outliers, index_bytes;
};

inline uint16_t u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline float elem(const uint8_t* p, int type, i64 i) {  // element i of a row in the model's dtype
  if (type == 0) {
    float f;
    std::memcpy(&f, p + 4 * i, 4);
    return f;
  }
  const uint16_t h = u16(p + 2 * i);
  if (type == 1) return h2f(h);
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Channels [h * D, h * D + D) of one token's part -> dst[D] (keys: pre-RoPE, pool outliers not yet applied).
inline void decode(const Part& P, const uint8_t* slot, int h, int D, float* dst) {
  const uint8_t* s = slot + P.offset;
  const int c0 = h * D;
  if (P.kind == 0) {
    if (P.raw_type == 0) {
      std::memcpy(dst, s + 4 * (i64)c0, 4 * (size_t)D);
    } else {
      for (int i = 0; i < D; ++i) dst[i] = elem(s, P.raw_type, c0 + i);
    }
    return;
  }
  for (int i = 0; i < D; i += 8) {
    const int c = c0 + i;
    // 4 bytes from byte[c]: the caller guarantees >= 3 bytes of the slot after the codes
    const __m256i word = _mm256_i32gather_epi32((const int*)s, _mm256_loadu_si256((const __m256i*)(P.byte + c)), 1);
    const __m256i code = _mm256_and_si256(_mm256_srlv_epi32(word, _mm256_loadu_si256((const __m256i*)(P.shift + c))),
                                          _mm256_loadu_si256((const __m256i*)(P.mask + c)));
    const __m256i row = _mm256_add_epi32(code, _mm256_loadu_si256((const __m256i*)(P.base + c)));
    _mm256_storeu_ps(dst + i, _mm256_i32gather_ps(P.levels, row, 4));
  }
  const uint8_t* at = s + P.code_bytes;
  if (P.pairs) {
    const int p = c0 / P.pair_div;
    const __m256 zero = _mm256_set1_ps(h2f(u16(at + 2 * p))), scale = _mm256_set1_ps(h2f(u16(at + 2 * (P.pairs + p))));
    for (int i = 0; i < D; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(dst + i), scale), zero));
    at += 4 * P.pairs;
  }
  const uint8_t* index = at + 2 * P.outliers;
  for (int k = 0; k < P.outliers; ++k) {
    const int c = P.index_bytes == 2 ? (int)(int16_t)u16(index + 2 * k) : (int)index[k];
    if (c >= c0 && c < c0 + D) dst[c - c0] = h2f(u16(at + 2 * k));
  }
}

// Where one channel's code sits in its head's 32-bit windows (Slots16), and its level row.
struct ChanCode {
  int32_t win;    // its window: bits from the head's first code byte / 32
  int32_t shift;  // bits into that window (the code may run on into the next)
  int32_t mask;   // 2**width - 1
  int32_t bits;   // width
  int32_t tab;    // first float of its level row (Part::base)
};

// Where each channel's code sits relative to its head's first code byte: what the channel-major path reads.
struct CodeMap {
  bool ok = false;
  std::vector<int> first, span;  // [H] first code byte of the head, bytes read (through the byte after the last)
  std::vector<ChanCode> code;    // [H * D]
  int tail = 0;                  // bytes after the codes: per-token ranges and outlier slots
};

// The part's CodeMap, or one with ok = false where the channel-major path does not apply (raw parts, codes
// spanning more than 2 bytes, a head's codes over more than 128 bytes).
inline CodeMap code_map(const Part& P, int H, int D) {
  CodeMap m;
  if (P.kind != 1) return m;
  m.first.resize(H);
  m.span.resize(H);
  m.code.resize((size_t)H * D);
  for (int h = 0; h < H; ++h) {
    int lo = P.byte[h * D], hi = lo;
    for (int i = 0; i < D; ++i) {
      lo = std::min(lo, P.byte[h * D + i]);
      hi = std::max(hi, P.byte[h * D + i]);
    }
    m.first[h] = lo;
    m.span[h] = hi - lo + 2;
    if (m.span[h] > 128) return m;
    for (int i = 0; i < D; ++i) {
      const int c = h * D + i, bits = __builtin_popcount((unsigned)P.mask[c]);
      if (P.shift[c] + bits > 16 || P.mask[c] != (1 << bits) - 1) return m;
      const int bit = (P.byte[c] - lo) * 8 + P.shift[c];
      m.code[c] = ChanCode{bit >> 5, bit & 31, P.mask[c], bits, P.base[c]};
    }
  }
  m.tail = 4 * P.pairs + P.outliers * (2 + P.index_bytes);
  if (m.tail > 128 || (P.outliers && P.index_bytes != 1 && P.index_bytes != 2)) return m;
  m.ok = true;
  return m;
}

#if KVPACK_AVX512
// Channel-major decoding (AVX-512): 16 tokens across the lanes. The head's code bytes of the 16 slots are
// transposed once into 32-bit windows (window k: bytes 4k .. 4k + 3 of each token, 16 tokens a vector), and then
// each channel is a funnel shift of its window and the next, a mask and a lookup in its own table (one permute for
// <= 4 bits). The bytes after the codes (per-token ranges, outlier slots) are transposed byte-major.
inline const uint8_t* byte_line(const uint8_t* lines, int b) { return lines + (b >> 2) * 64 + (b & 3) * 16; }

// lines <- bytes [0, nb) of the 16 rows, byte-major (nb <= 128).
inline void bytes16(const uint8_t* const* rows, int nb, uint8_t* lines) {
  alignas(64) static const struct Consts {
    uint8_t bt[64];
    Consts() {
      for (int c = 0; c < 4; ++c)
        for (int t = 0; t < 16; ++t) bt[c * 16 + t] = (uint8_t)(4 * t + c);
    }
  } K;
  const __m512i bt = _mm512_load_si512(K.bt);
  for (int c0 = 0; c0 < nb; c0 += 64) {
    const int w = std::min(64, nb - c0);
    const __mmask64 cm = w == 64 ? ~0ULL : ((1ULL << w) - 1);
    __m512i r[16];
    for (int t = 0; t < 16; ++t) r[t] = _mm512_maskz_loadu_epi8(cm, rows[t] + c0);
    simd::transpose(r);
    for (int k = 0; k < (w + 3) / 4; ++k) _mm512_store_si512(lines + (c0 / 4 + k) * 64, _mm512_permutexvar_epi8(bt, r[k]));
  }
}

// win[k] <- bytes 4k .. 4k + 3 of the 16 rows (lane t: row t), k < ceil(nb / 4), then one zero window (nb <= 128).
// Up to 32 bytes at a time: rows t and t + 8 share a vector and one 8 x 8 transpose per 256-bit half serves both;
// longer spans take 64 bytes per 16 x 16 transpose.
inline void windows16(const uint8_t* const* rows, int nb, __m512i* win) {
  for (int c0 = 0; c0 < nb; c0 += 64) {
    const int w = std::min(64, nb - c0), nw = (w + 3) / 4;
    __m512i r[16];
    if (w <= 32) {
      const __mmask32 cm = w == 32 ? ~0u : ((1u << w) - 1);
      for (int t = 0; t < 8; ++t)
        r[t] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_maskz_loadu_epi8(cm, rows[t] + c0)),
                                  _mm256_maskz_loadu_epi8(cm, rows[t + 8] + c0), 1);
      simd::transpose4(r, 8);
      // r[j] (j < 4) holds dword j (128-bit lanes 0, 2: rows 0-3 | 8-11) and dword j + 4 (lanes 1, 3) of rows 0-3,
      // 8-11; r[4 + j] the same of rows 4-7, 12-15
      const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), second = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
      for (int j = 0; j < 4; ++j) {
        if (j < nw) win[c0 / 4 + j] = _mm512_permutex2var_epi64(r[j], first, r[4 + j]);
        if (j + 4 < nw) win[c0 / 4 + j + 4] = _mm512_permutex2var_epi64(r[j], second, r[4 + j]);
      }
    } else {
      const __mmask64 cm = w == 64 ? ~0ULL : ((1ULL << w) - 1);
      for (int t = 0; t < 16; ++t) r[t] = _mm512_maskz_loadu_epi8(cm, rows[t] + c0);
      simd::transpose(r);
      for (int k = 0; k < nw; ++k) win[c0 / 4 + k] = r[k];
    }
  }
  win[(nb + 3) / 4] = _mm512_setzero_si512();
}

// One head's part of NV x 16 slots (rows: the slots; vector v: rows 16v .. 16v + 15): the code bytes as 32-bit
// windows (windows16) and the bytes after the codes (per-token ranges, outlier slots) byte-major.
template <int NV>
struct Slots16 {
  alignas(64) uint8_t tail[NV][128 / 4 * 64];
  alignas(64) __m512i win[NV][128 / 4 + 1];

  void load(const Part& P, const CodeMap& M, const uint8_t* const* rows, int h) {
    const uint8_t* at[16];
    for (int v = 0; v < NV; ++v) {
      for (int t = 0; t < 16; ++t) at[t] = rows[16 * v + t] + P.offset + M.first[h];
      windows16(at, M.span[h], win[v]);
      if (M.tail) {
        for (int t = 0; t < 16; ++t) at[t] = rows[16 * v + t] + P.offset + P.code_bytes;
        bytes16(at, M.tail, tail[v]);
      }
    }
  }
  // vector v's 16 tokens' little-endian 16-bit words at tail bytes b, b + 1; as fp16 values
  __m512i half16(int v, int b) const {
    const __m512i lo = _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i*)byte_line(tail[v], b)));
    const __m512i hi = _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i*)byte_line(tail[v], b + 1)));
    return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 8));
  }
  __m512 fp16(int v, int b) const { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(half16(v, b))); }
  // outlier slot k of vector v: the lanes (tokens) whose channel lies in [c0, c0 + D), *off = channel - c0
  __mmask16 outliers_in(const Part& P, int v, int k, int c0, int D, __m512i* off) const {
    const int ib = 4 * P.pairs + 2 * P.outliers;
    const __m512i ch = P.index_bytes == 2
        ? _mm512_srai_epi32(_mm512_slli_epi32(half16(v, ib + 2 * k), 16), 16)
        : _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i*)byte_line(tail[v], ib + k)));
    *off = _mm512_sub_epi32(ch, _mm512_set1_epi32(c0));
    return _mm512_cmpge_epi32_mask(*off, _mm512_setzero_si512()) & _mm512_cmplt_epi32_mask(*off, _mm512_set1_epi32(D));
  }
  // per-token range of vector v for channel c0 (zero, scale: level * scale + zero; none: 0, 1)
  __m512 zero(const Part& P, int v, int c0) const { return P.pairs ? fp16(v, 2 * (c0 / P.pair_div)) : _mm512_setzero_ps(); }
  __m512 scale(const Part& P, int v, int c0) const {
    return P.pairs ? fp16(v, 2 * (P.pairs + c0 / P.pair_div)) : _mm512_set1_ps(1.0f);
  }
  // channel c (of the part; i = c - h * D) of the NV vectors looked up in its level row, lanes outside keep[v] zero
  void levels(const Part& P, const CodeMap& M, int c, const __mmask16* keep, __m512* x) const {
    const ChanCode& cc = M.code[c];
    const __m512i mk = _mm512_set1_epi32(cc.mask);
    const float* tab = P.levels + cc.tab;  // rows padded to >= 16 floats
    auto code = [&](int v) { return _mm512_and_si512(simd::join(win[v][cc.win], win[v][cc.win + 1], &cc.shift), mk); };
    if (cc.bits <= 4) {
      const __m512 t0 = _mm512_loadu_ps(tab);
      for (int v = 0; v < NV; ++v) x[v] = _mm512_maskz_permutexvar_ps(keep[v], code(v), t0);
    } else if (cc.bits == 5) {
      const __m512 t0 = _mm512_loadu_ps(tab), t1 = _mm512_loadu_ps(tab + 16);
      for (int v = 0; v < NV; ++v) x[v] = _mm512_maskz_permutex2var_ps(keep[v], t0, code(v), t1);
    } else {
      for (int v = 0; v < NV; ++v) x[v] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), keep[v], code(v), tab, 4);
    }
  }
};

// Channels [h * D, h * D + D) of NV x 16 slots' part (rows: the slots; vector v: rows 16v .. 16v + 15) ->
// dst[i * stride + 16v + t] (keys: pre-RoPE, pool outliers not yet applied), as `decode` computes them token by
// token. A channel's shift, mask and table are read once for the NV vectors.
template <int NV>
inline void decode16(const Part& P, const CodeMap& M, const uint8_t* const* rows, int h, int D,
                     float* __restrict dst, i64 stride) {
  Slots16<NV> L;
  L.load(P, M, rows, h);
  const int c0 = h * D;
  __m512 zero[NV], scale[NV];
  __mmask16 all[NV];
  for (int v = 0; v < NV; ++v) {
    zero[v] = L.zero(P, v, c0);
    scale[v] = L.scale(P, v, c0);
    all[v] = (__mmask16)0xFFFF;
  }
  for (int i = 0; i < D; ++i) {
    __m512 x[NV];
    L.levels(P, M, c0 + i, all, x);
    for (int v = 0; v < NV; ++v) {
      if (P.pairs) x[v] = _mm512_add_ps(_mm512_mul_ps(x[v], scale[v]), zero[v]);
      _mm512_storeu_ps(dst + i * stride + 16 * v, x[v]);
    }
  }
  // exact outlier slots over their channels, slot after slot (a later slot wins), 16 tokens per masked scatter
  const int vb = 4 * P.pairs;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int v = 0; v < NV; ++v)
    for (int k = 0; k < P.outliers; ++k) {
      __m512i off;
      const __mmask16 in = L.outliers_in(P, v, k, c0, D, &off);
      if (!in) continue;
      const __m512i where = _mm512_add_epi32(_mm512_mullo_epi32(off, _mm512_set1_epi32((int)stride)), lane);
      _mm512_mask_i32scatter_ps(dst + 16 * v, in, where, L.fp16(v, vb + 2 * k), 4);
    }
}
#endif

struct Args {
  const float* query;  // [T, Hq, D] float32
  float* out;          // [T, Hq, D] float32
  int R, H, G, D, threads;
  float scale;
  const i64* qsl;        // [R + 1]
  const i64* seq_lens;   // [R]
  const int32_t* table;  // block table, row stride `ts`
  i64 ts;
  int bs;  // block size
  const uint8_t* slots;
  i64 slot_bytes;
  const uint8_t* sinks;  // [blocks, sink_tokens, 2, H * D] in sink_type
  int sink_tokens, sink_type;
  const uint8_t* pool;  // [blocks, 2 + 4 * pool_entries]
  int pool_entries;
  const float* cos;  // [positions, rot] (nullptr: keys stored post-RoPE)
  const float* sin;
  i64 rope_stride;
  int rot;
  // channel-major path (nullptr: none): cos/sin of 16 consecutive positions 16m + j by angle addition,
  // cos = hc lc - hs ls, sin = hs lc + hc ls, from rope_hi [m][hc (rot / 2) | hs (rot / 2)] (the table's rows at
  // multiples of 16) and rope_lo [lc (rot / 2 lines of 16 lanes) | ls (likewise)] (positions 0..15 over the
  // table's scaling): a few KB instead of 256 bytes per position streamed for every head
  const float* rope_hi;
  const float* rope_lo;
  int rope_round;  // the type the composed cos/sin are rounded to, as the table's rows are (raw_type's codes; 0: none)
  // channel-major path, short contexts (nullptr: compose as above): the table's cos/sin themselves laid out
  // [position / 16][cos (rot / 2 lines of 16 lanes) | sin (likewise)], 256 bytes per position for rot 64, read
  // instead of composed where the whole table stays in the caches (kernel._rope decides)
  const float* rope_cm;
  Part key, value;
  i64 max_query;       // attention(): requests with more query tokens are skipped (0: none are)
  CodeMap kmap, vmap;  // filled by attention() / dense()
};


// One page's pool entries of one head, bucketed by key tile (stable: a later entry still overrides an earlier one).
struct PageOutliers {
  i64 page = -1;
  int head = -1;
  i64 first_tile = 0;
  std::vector<int> start;  // [tiles + 1] entries of tile first_tile + i: [start[i], start[i + 1])
  std::vector<i64> pos;
  std::vector<int> channel;
  std::vector<float> value;
};

struct Scratch {
  std::vector<float> q, o, s, m, l, k, kt, v, vt;
  std::vector<float> p, acc, corr;  // lane path: softmax weights [rows][span], lane sums [D][rows][16], [rows][D]
  PageOutliers cached[2];  // tiles run in order, so at most two pages are live
  std::vector<int> tile_of;
  i64 head_page = -1;              // channel-major path: the page whose entries of this item's head are in head_list
  int head_count = 0;
  std::vector<uint32_t> head_list;
  explicit Scratch(int D)
      : q(MAXROWS * D), o(MAXROWS * D), s(MAXROWS * TK), m(MAXROWS), l(MAXROWS), k(TK * D), kt(D * TK), v(TK * D), vt(D * TK),
        acc((size_t)D * LANE_ROWS * 16), corr((size_t)LANE_ROWS * D) {}

  const PageOutliers& outliers(const struct Args& A, const int32_t* table, i64 page, int h);
};

const PageOutliers& Scratch::outliers(const Args& A, const int32_t* table, i64 page, int h) {
  PageOutliers& po = cached[page & 1];
  if (po.page == page && po.head == h && po.start.size()) return po;  // (valid within one work item)
  po.page = page;
  po.head = h;
  const i64 begin = page * A.bs, end = begin + A.bs;
  po.first_tile = begin / TK;
  const int tiles = (int)((end - 1) / TK - po.first_tile + 1);
  po.start.assign(tiles + 2, 0);
  const uint8_t* pool = A.pool + (i64)table[page] * (2 + 4 * (i64)A.pool_entries);
  const int count = std::max(0, std::min<int>((int16_t)u16(pool), A.pool_entries));
  tile_of.assign(count, -1);
  for (int e = 0; e < count; ++e) {
    const uint8_t* entry = pool + 2 + 4 * e;
    const int c = (int)entry[3] - h * A.D;
    if (c < 0 || c >= A.D) continue;
    tile_of[e] = (int)((begin + entry[2]) / TK - po.first_tile);
    if (tile_of[e] < tiles) ++po.start[tile_of[e] + 1];
  }
  for (int t = 0; t < tiles; ++t) po.start[t + 1] += po.start[t];
  po.start[tiles + 1] = po.start[tiles];
  const int total = po.start[tiles];
  po.pos.resize(total);
  po.channel.resize(total);
  po.value.resize(total);
  std::vector<int> at(po.start.begin(), po.start.begin() + tiles);
  for (int e = 0; e < count; ++e) {
    if (tile_of[e] < 0 || tile_of[e] >= tiles) continue;
    const uint8_t* entry = pool + 2 + 4 * e;
    const int i = at[tile_of[e]]++;
    po.pos[i] = begin + entry[2];
    po.channel[i] = (int)entry[3] - h * A.D;
    po.value[i] = h2f(u16(entry));
  }
  return po;
}

#if KVPACK_AVX512
// The entries of head h (channels [h * D, h * D + D)) among a page pool's `count` entries, in pool order, as
// 32-bit words (fp16 value | token offset << 16 | channel << 24): 16 entries per compare and compress.
inline int head_entries(const uint8_t* entries, int count, int h, int D, uint32_t* dst) {
  const __m512i lo = _mm512_set1_epi32(h * D), hi = _mm512_set1_epi32(h * D + D);
  int m = 0;
  for (int e = 0; e < count; e += 16) {
    const __mmask16 valid = e + 16 <= count ? (__mmask16)0xFFFF : (__mmask16)((1u << (count - e)) - 1);
    const __m512i w = _mm512_maskz_loadu_epi32(valid, entries + 4 * (i64)e);
    const __m512i c = _mm512_srli_epi32(w, 24);
    const __mmask16 k = valid & _mm512_cmpge_epi32_mask(c, lo) & _mm512_cmplt_epi32_mask(c, hi);
    _mm512_mask_compressstoreu_epi32(dst + m, k, w);
    m += __builtin_popcount((unsigned)k);
  }
  return m;
}

// Slot rows of positions k0 .. k0 + n - 1 of request r (then the last one repeated to TK), one division per tile.
inline void tile_rows(const Args& A, int r, i64 k0, int n, const uint8_t** rows) {
  const int32_t* table = A.table + r * A.ts;
  i64 page = k0 / A.bs;
  int off = (int)(k0 % A.bs);
  const uint8_t* row = A.slots + ((i64)table[page] * A.bs + off) * A.slot_bytes;
  for (int j = 0; j < TK; ++j) {
    rows[j] = row;
    if (j + 1 >= n) continue;
    if (++off == A.bs) {
      off = 0;
      row = A.slots + (i64)table[++page] * A.bs * A.slot_bytes;
    } else {
      row += A.slot_bytes;
    }
  }
}

// x rounded to nearest even in fp16 (type 1) or bf16 (type 2; Part::raw_type's codes), as torch's .to(dtype) rounds
// the table's rows (finite x); type 0 (float32): x.
inline __m512 round_as(__m512 x, int type) {
  if (type == 2) {
    const __m512i i = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
    const __m512i up = _mm512_add_epi32(i, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    return _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32((int)0xffff0000u)));
  }
  if (type == 1) return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return x;
}

// cos/sin of the 16 positions from p0 (a multiple of 16) for RoPE pair i: read from the channel-major table, or
// composed from the split tables and rounded as the table's rows are.
inline void rope16(const Args& A, i64 p0, int i, __m512* c, __m512* sn) {
  const int half = A.rot / 2;
  if (A.rope_cm) {
    const float* block = A.rope_cm + p0 / 16 * A.rot * 16;
    *c = _mm512_loadu_ps(block + i * 16);
    *sn = _mm512_loadu_ps(block + (half + i) * 16);
  } else {
    const float* hrow = A.rope_hi + p0 / 16 * A.rot;
    const __m512 hc = _mm512_set1_ps(hrow[i]), hs = _mm512_set1_ps(hrow[half + i]);
    const __m512 fc = _mm512_loadu_ps(A.rope_lo + i * 16), fs = _mm512_loadu_ps(A.rope_lo + (half + i) * 16);
    *c = round_as(_mm512_fmsub_ps(hc, fc, _mm512_mul_ps(hs, fs)), A.rope_round);
    *sn = round_as(_mm512_fmadd_ps(hs, fc, _mm512_mul_ps(hc, fs)), A.rope_round);
  }
}

// The tile's keys straight into kt[D][TK] (16 positions per vector): decoded, the page pools' outliers written over
// them, rotated with RoPE composed from the split tables, the exact sinks put back. Lanes past n hold copies of
// position k0 + n - 1 (first vector) or stale values (second vector); the caller masks them.
void keys16(const Args& A, int r, int h, i64 k0, int n, Scratch& S, const uint8_t* const* rows, bool rotate = true) {
  const int D = A.D, C = A.H * A.D;
  const int32_t* table = A.table + r * A.ts;
  float* kt = S.kt.data();
  static_assert(TK == 32, "a tile is one or two vectors of 16 positions");
  if (n > 16) decode16<2>(A.key, A.kmap, rows, h, D, kt, TK);
  else decode16<1>(A.key, A.kmap, rows, h, D, kt, TK);
  if (A.pool_entries) {  // outlier_pool.apply_pool: the page pools' entries of this head at the tile's positions
    for (i64 page = k0 / A.bs; page <= (k0 + n - 1) / A.bs; ++page) {
      if (S.head_page != page) {
        S.head_page = page;
        const uint8_t* pool = A.pool + (i64)table[page] * (2 + 4 * (i64)A.pool_entries);
        const int count = std::max(0, std::min<int>((int16_t)u16(pool), A.pool_entries));
        S.head_count = head_entries(pool + 2, count, h, D, S.head_list.data());
      }
      // the entries at the tile's positions, 16 at a time: one masked scatter each, in pool order (a scatter writes
      // its lanes in order, so a later entry still overrides an earlier one)
      const i64 begin = page * A.bs;
      const __m512i lo = _mm512_set1_epi32((int)std::max<i64>(0, k0 - begin));
      const __m512i hi = _mm512_set1_epi32((int)std::min<i64>(A.bs, k0 + n - begin));
      const __m512i shift = _mm512_set1_epi32((int)(begin - k0) - h * D * TK), byte = _mm512_set1_epi32(0xff);
      for (int e = 0; e < S.head_count; e += 16) {
        const __mmask16 valid = S.head_count - e >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (S.head_count - e)) - 1);
        const __m512i w = _mm512_maskz_loadu_epi32(valid, S.head_list.data() + e);
        const __m512i off = _mm512_and_si512(_mm512_srli_epi32(w, 16), byte);
        const __mmask16 in = valid & _mm512_cmpge_epi32_mask(off, lo) & _mm512_cmplt_epi32_mask(off, hi);
        if (!in) continue;
        // kt[(channel - h * D) * TK + begin + off - k0]
        const __m512i at = _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(_mm512_srli_epi32(w, 24), 5), off), shift);
        const __m512 value = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_and_si512(w, _mm512_set1_epi32(0xffff))));
        _mm512_mask_i32scatter_ps(kt, in, at, value, 4);
      }
    }
  }
  if (A.cos && rotate) {  // cos/sin of 16 positions: read from the channel-major table, or composed from the split tables
    const int half = A.rot / 2;
    for (int v = 0; v < n; v += 16) {
      for (int i = 0; i < half; ++i) {
        __m512 c, sn;
        rope16(A, k0 + v, i, &c, &sn);
        float* a = kt + i * TK + v;
        float* b = kt + (i + half) * TK + v;
        const __m512 lo = _mm512_loadu_ps(a), hi = _mm512_loadu_ps(b);
        _mm512_storeu_ps(a, _mm512_fmsub_ps(lo, c, _mm512_mul_ps(hi, sn)));
        _mm512_storeu_ps(b, _mm512_fmadd_ps(hi, c, _mm512_mul_ps(lo, sn)));
      }
    }
  }
  if (A.sink_tokens && k0 < A.sink_tokens) {  // sinks sit in the request's first page
    const int es = A.sink_type == 0 ? 4 : 2;
    const i64 sink_bytes = (i64)A.sink_tokens * 2 * C * es;
    for (int j = 0; j < n && k0 + j < A.sink_tokens; ++j) {
      const uint8_t* rec = A.sinks + (i64)table[0] * sink_bytes + (k0 + j) * 2 * C * es;
      for (int d = 0; d < D; ++d) kt[d * TK + j] = elem(rec, A.sink_type, h * D + d);
    }
  }
}

// Whether the channel-major path (tile16, the lane path) reads this call: both parts' codes map (CodeMap::ok) and, for
// pre-RoPE keys, cos/sin of 16 positions at a time (the channel-major table or the split tables).
inline bool channel_major_path(const Args& A) { return A.kmap.ok && A.vmap.ok && (!A.cos || A.rope_hi || A.rope_cm); }

// tile() on the channel-major path: keys16 into kt[D][TK], and the values decoded channel-major and transposed to
// v[TK][D] (lanes past n: the caller masks them).
void tile16(const Args& A, int r, int h, i64 k0, int n, Scratch& S) {
  const int D = A.D, C = A.H * A.D;
  const int32_t* table = A.table + r * A.ts;
  const uint8_t* rows[TK];
  tile_rows(A, r, k0, n, rows);
  keys16(A, r, h, k0, n, S, rows);
  float* vt = S.vt.data();
  if (n > 16) decode16<2>(A.value, A.vmap, rows, h, D, vt, TK);
  else decode16<1>(A.value, A.vmap, rows, h, D, vt, TK);
  float* V = S.v.data();
  for (int v = 0; v < n; v += 16)
    for (int d0 = 0; d0 < D; d0 += 16) {
      __m512 x[16];
      for (int i = 0; i < 16; ++i) x[i] = _mm512_loadu_ps(vt + (d0 + i) * TK + v);
      simd::transpose(x);
      for (int t = 0; t < 16; ++t) _mm512_storeu_ps(V + (v + t) * D + d0, x[t]);
    }
  if (A.sink_tokens && k0 < A.sink_tokens) {
    const int es = A.sink_type == 0 ? 4 : 2;
    const i64 sink_bytes = (i64)A.sink_tokens * 2 * C * es;
    for (int j = 0; j < n && k0 + j < A.sink_tokens; ++j) {
      const uint8_t* rec = A.sinks + (i64)table[0] * sink_bytes + (k0 + j) * 2 * C * es;
      for (int d = 0; d < D; ++d) V[j * D + d] = elem(rec + (i64)C * es, A.sink_type, h * D + d);
    }
  }
}
#endif

// Keys (post-RoPE, transposed to kt[D][TK]) and values v[n][D] of positions k0 .. k0 + n - 1; lanes of kt past n
// are not scores of any key (the caller masks them).
void tile(const Args& A, int r, int h, i64 k0, int n, Scratch& S) {
#if KVPACK_AVX512
  if (channel_major_path(A)) return tile16(A, r, h, k0, n, S);
#endif
  const int D = A.D, C = A.H * A.D;
  const int32_t* table = A.table + r * A.ts;
  float* K = S.k.data();
  float* V = S.v.data();
  for (int j = 0; j < n; ++j) {
    const i64 p = k0 + j;
    const uint8_t* slot = A.slots + ((i64)table[p / A.bs] * A.bs + p % A.bs) * A.slot_bytes;
    decode(A.key, slot, h, D, K + j * D);
    decode(A.value, slot, h, D, V + j * D);
  }
  if (A.pool_entries) {  // outlier_pool.apply_pool: the page pools' entries of this head at the tile's positions
    for (i64 page = k0 / A.bs; page <= (k0 + n - 1) / A.bs; ++page) {
      const PageOutliers& po = S.outliers(A, table, page, h);
      const i64 tile = k0 / TK - po.first_tile;
      for (int e = po.start[tile]; e < po.start[tile + 1]; ++e) {
        const i64 p = po.pos[e];
        if (p >= k0 && p < k0 + n) K[(p - k0) * D + po.channel[e]] = po.value[e];
      }
    }
  }
  if (A.cos) {
    const int half = A.rot / 2;
    for (int j = 0; j < n; ++j) {
      const float* cs = A.cos + (k0 + j) * A.rope_stride;
      const float* sn = A.sin + (k0 + j) * A.rope_stride;
      float* x = K + j * D;
      for (int i = 0; i < half; ++i) {
        const float lo = x[i], hi = x[i + half];
        x[i] = lo * cs[i] - hi * sn[i];
        x[i + half] = hi * cs[i + half] + lo * sn[i + half];
      }
    }
  }
  if (A.sink_tokens && k0 < A.sink_tokens) {  // sinks sit in the request's first page
    const int es = A.sink_type == 0 ? 4 : 2;
    const i64 sink_bytes = (i64)A.sink_tokens * 2 * C * es;
    for (int j = 0; j < n && k0 + j < A.sink_tokens; ++j) {
      const uint8_t* rec = A.sinks + (i64)table[0] * sink_bytes + (k0 + j) * 2 * C * es;
      for (int d = 0; d < D; ++d) {
        K[j * D + d] = elem(rec, A.sink_type, h * D + d);
        V[j * D + d] = elem(rec + (i64)C * es, A.sink_type, h * D + d);
      }
    }
  }
  float* kt = S.kt.data();
  for (int d = 0; d < D; ++d) {
    for (int j = 0; j < n; ++j) kt[d * TK + j] = K[j * D + d];
    for (int j = n; j < TK; ++j) kt[d * TK + j] = 0.0f;
  }
}

// s[row * ss + j] = q[row] . k_j for RB rows from `row`, j < TK.
template <int RB>
inline void scores(const float* q, const float* kt, int D, float* s, i64 ss = TK) {
  constexpr int NV = TK / W;
  vf acc[RB][NV];
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = simd::zero();
  for (int d = 0; d < D; ++d) {
    vf k[NV];
    for (int v = 0; v < NV; ++v) k[v] = simd::load(kt + d * TK + v * W);
    for (int i = 0; i < RB; ++i) {
      const vf x = simd::set1(q[i * D + d]);
      for (int v = 0; v < NV; ++v) acc[i][v] = simd::fmadd(x, k[v], acc[i][v]);
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < NV; ++v) simd::store_n(s + i * ss + v * W, acc[i][v], W);
}

// o[D] <- alpha * o + sum_j p[j] v[j] (j < n): all D / W accumulators of the row at once (independent FMA chains).
template <int NV>
inline void pv_fixed(float* o, const float* p, const float* v, int n, float alpha) {
  constexpr int D = NV * W;
  vf acc[NV];
  const vf a = simd::set1(alpha);
  for (int i = 0; i < NV; ++i) acc[i] = simd::mul(simd::load(o + i * W), a);
  for (int j = 0; j < n; ++j) {
    const vf w = simd::set1(p[j]);
    for (int i = 0; i < NV; ++i) acc[i] = simd::fmadd(w, simd::load(v + j * D + i * W), acc[i]);
  }
  for (int i = 0; i < NV; ++i) simd::store_n(o + i * W, acc[i], W);
}

inline void pv(float* o, const float* p, const float* v, int n, int D, float alpha) {
  switch (D / W) {
    case 4: pv_fixed<4>(o, p, v, n, alpha); return;
    case 8: pv_fixed<8>(o, p, v, n, alpha); return;
    case 16: pv_fixed<16>(o, p, v, n, alpha); return;
    default: break;
  }
  const vf a = simd::set1(alpha);
  for (int d = 0; d < D; d += W) {
    vf acc = simd::mul(simd::load(o + d), a);
    for (int j = 0; j < n; ++j) acc = simd::fmadd(simd::set1(p[j]), simd::load(v + j * D + d), acc);
    simd::store_n(o + d, acc, W);
  }
}

void item(const Args& A, int r, int h, i64 q0, int nq, Scratch& S) {
  const int D = A.D, G = A.G, Hq = A.H * A.G, rows = nq * G;
  const i64 qs = A.qsl[r], ql = A.qsl[r + 1] - qs, L = A.seq_lens[r];
  const i64 first = L - ql + q0;  // position of the block's first query token
  const float ninf = -std::numeric_limits<float>::infinity();
  S.cached[0].page = S.cached[1].page = S.head_page = -1;  // another request's pages (block ids are reused)
  float* q = S.q.data();
  float* o = S.o.data();
  for (int t = 0; t < nq; ++t)
    for (int g = 0; g < G; ++g) {
      const float* src = A.query + ((qs + q0 + t) * Hq + h * G + g) * D;
      float* dst = q + (t * G + g) * D;
      for (int d = 0; d < D; ++d) dst[d] = src[d] * A.scale;
    }
  std::fill(o, o + rows * D, 0.0f);
  std::fill(S.m.begin(), S.m.begin() + rows, ninf);
  std::fill(S.l.begin(), S.l.begin() + rows, 0.0f);
  const i64 end = first + nq;  // keys the block's last query sees
  for (i64 k0 = 0; k0 < end; k0 += TK) {
    const int n = (int)std::min<i64>(TK, end - k0);
    tile(A, r, h, k0, n, S);
    const int row0 = (int)std::max<i64>(0, (k0 - first) * G);  // rows whose queries see none of the tile: skipped
    int row = row0 - row0 % G;
    for (; row + 4 <= rows; row += 4) scores<4>(q + row * D, S.kt.data(), D, S.s.data() + row * TK);
    switch (rows - row) {  // the last 1-3 rows share the key loads too (a decode step's G rows)
      case 3: scores<3>(q + row * D, S.kt.data(), D, S.s.data() + row * TK); break;
      case 2: scores<2>(q + row * D, S.kt.data(), D, S.s.data() + row * TK); break;
      case 1: scores<1>(q + row * D, S.kt.data(), D, S.s.data() + row * TK); break;
      default: break;
    }
    for (row = row0 - row0 % G; row < rows; ++row) {
      const i64 limit = first + row / G;  // the query's position: keys <= it
      const int valid = (int)std::min<i64>(n, limit - k0 + 1);
      if (valid <= 0) continue;
      float* s = S.s.data() + row * TK;
      for (int j = valid; j < TK; ++j) s[j] = ninf;
      __m256 mx = _mm256_set1_ps(S.m[row]);
      for (int j = 0; j < TK; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + j));
      mx = _mm256_max_ps(mx, _mm256_permute2f128_ps(mx, mx, 1));
      mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, _MM_SHUFFLE(1, 0, 3, 2)));
      mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, _MM_SHUFFLE(2, 3, 0, 1)));
      const float top = _mm256_cvtss_f32(mx);
      const float alpha = S.m[row] == ninf ? 0.0f : std::exp(S.m[row] - top);
      S.m[row] = top;
      const __m256 tv = _mm256_set1_ps(top);
      __m256 sum = _mm256_setzero_ps();
      for (int j = 0; j < TK; j += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), tv));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
      }
      S.l[row] = S.l[row] * alpha + hsum8(sum);
      pv(o + row * D, s, S.v.data(), valid, D, alpha);
    }
  }
  for (int t = 0; t < nq; ++t)
    for (int g = 0; g < G; ++g) {
      const int row = t * G + g;
      const float inv = 1.0f / S.l[row];
      float* dst = A.out + ((qs + q0 + t) * Hq + h * G + g) * D;
      for (int d = 0; d < D; ++d) dst[d] = o[row * D + d] * inv;
    }
}

#if KVPACK_AVX512
// The lane path (work items of R <= LANE_ROWS query rows, e.g. a decode step's G heads): keys first, every score of
// the item kept ([R][span]), one softmax, then values without decoding them to memory: per channel the W = 16
// lanes of sum_t w_t * level(code_t) accumulate (w = p * the token's scale; the tokens' zeros go to one sum
// p * zero per row); an exact value outlier's lane is left out of its channel's sum and p * (value - zero) added
// apart, and sinks likewise (their lanes out of every sum, p * value added). Lanes
// are summed once per item. (An outlier channel held by two slots of one token, which the writer never stores,
// would be corrected twice here, where `decode` lets the later slot win.)
template <int R, int NV>
void values_lanes(const Part& P, const CodeMap& M, const uint8_t* const* rows, int h, int D, const float* pz,
                  float* __restrict acc, float* __restrict zs, float* __restrict corr) {
  Slots16<NV> L;
  L.load(P, M, rows, h);
  const int c0 = h * D;
  __m512 zero[NV], w[R][NV];
  for (int v = 0; v < NV; ++v) {
    zero[v] = L.zero(P, v, c0);
    const __m512 scale = L.scale(P, v, c0);
    for (int g = 0; g < R; ++g) {
      const __m512 pv = _mm512_loadu_ps(pz + g * VT + 16 * v);
      w[g][v] = _mm512_mul_ps(pv, scale);
      if (P.pairs) _mm512_store_ps(zs + g * 16, _mm512_fmadd_ps(pv, zero[v], _mm512_load_ps(zs + g * 16)));
    }
  }
  // outlier slots: the exact value replaces level * scale + zero: its lane is left out of the channel's sum (keep)
  // and p * (value - zero) added apart
  alignas(64) uint16_t keep[MAXD][NV];
  std::fill(&keep[0][0], &keep[0][0] + MAXD * NV, (uint16_t)0xFFFF);
  const int vb = 4 * P.pairs;
  alignas(64) float exact[16];
  alignas(64) int32_t where[16];
  for (int v = 0; v < NV; ++v)
    for (int k = 0; k < P.outliers; ++k) {
      __m512i off;
      const __mmask16 in = L.outliers_in(P, v, k, c0, D, &off);
      if (!in) continue;
      _mm512_store_si512(where, off);
      _mm512_store_ps(exact, _mm512_sub_ps(L.fp16(v, vb + 2 * k), zero[v]));
      for (unsigned m = in; m; m &= m - 1) {  // one pass over the lanes (a loop of unknown length mispredicts once)
        const int l = __builtin_ctz(m), c = where[l];
        keep[c][v] &= (uint16_t)~(1u << l);
        for (int g = 0; g < R; ++g) corr[g * D + c] += pz[g * VT + 16 * v + l] * exact[l];
      }
    }
  for (int i = 0; i < D; ++i) {
    __m512 x[NV];
    __mmask16 k[NV];
    for (int v = 0; v < NV; ++v) k[v] = keep[i][v];
    L.levels(P, M, c0 + i, k, x);
    float* a = acc + (i64)i * R * 16;
    for (int g = 0; g < R; ++g) {
      __m512 sum = _mm512_loadu_ps(a + g * 16);
      for (int v = 0; v < NV; ++v) sum = _mm512_fmadd_ps(w[g][v], x[v], sum);
      _mm512_storeu_ps(a + g * 16, sum);
    }
  }
}

// scores<R> of pre-RoPE keys kt[D][TK] (decoded, outliers written over them) with the rotation done in registers:
// per RoPE pair (i, i + rot / 2) both channels rotated by cos/sin of the 16 positions of each vector and q . k
// accumulated for every row; channels past rot as they are. P[row * span + j] for j < TK (lanes past n: the caller
// masks them). The rotated keys are never stored (keys16 + scores store them, then read them back).
template <int R>
void rope_scores(const Args& A, i64 k0, int n, const float* kt, const float* q, float* P, i64 span) {
  constexpr int NV = TK / 16;
  const int D = A.D, half = A.rot / 2, nv = n > 16 ? 2 : 1;
  __m512 acc[R][NV];
  for (int g = 0; g < R; ++g)
    for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_setzero_ps();
  for (int i = 0; i < half; ++i) {
    __m512 qa[R], qb[R];
    for (int g = 0; g < R; ++g) {
      qa[g] = _mm512_set1_ps(q[g * D + i]);
      qb[g] = _mm512_set1_ps(q[g * D + i + half]);
    }
    for (int v = 0; v < NV; ++v) {
      if (v >= nv) break;
      __m512 c, sn;
      rope16(A, k0 + 16 * v, i, &c, &sn);
      const __m512 lo = _mm512_loadu_ps(kt + i * TK + 16 * v), hi = _mm512_loadu_ps(kt + (i + half) * TK + 16 * v);
      const __m512 klo = _mm512_fmsub_ps(lo, c, _mm512_mul_ps(hi, sn));
      const __m512 khi = _mm512_fmadd_ps(hi, c, _mm512_mul_ps(lo, sn));
      for (int g = 0; g < R; ++g) acc[g][v] = _mm512_fmadd_ps(qb[g], khi, _mm512_fmadd_ps(qa[g], klo, acc[g][v]));
    }
  }
  for (int d = 2 * half; d < D; ++d)
    for (int v = 0; v < nv; ++v) {
      const __m512 k = _mm512_loadu_ps(kt + d * TK + 16 * v);
      for (int g = 0; g < R; ++g) acc[g][v] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * D + d]), k, acc[g][v]);
    }
  for (int g = 0; g < R; ++g)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(P + g * span + 16 * v, acc[g][v]);
}

template <int R>
void item_lanes(const Args& A, int r, int h, i64 q0, int nq, Scratch& S) {
  const int D = A.D, G = A.G, Hq = A.H * A.G, C = A.H * A.D;
  const i64 qs = A.qsl[r], ql = A.qsl[r + 1] - qs, L = A.seq_lens[r];
  const i64 first = L - ql + q0, end = first + nq;  // the first query's position; keys the last one sees
  const float ninf = -std::numeric_limits<float>::infinity();
  S.head_page = -1;  // another request's pages (block ids are reused)
  float* q = S.q.data();
  for (int t = 0; t < nq; ++t)
    for (int g = 0; g < G; ++g) {
      const float* src = A.query + ((qs + q0 + t) * Hq + h * G + g) * D;
      float* dst = q + (t * G + g) * D;
      for (int d = 0; d < D; ++d) dst[d] = src[d] * A.scale;
    }
  const i64 span = (end + VT - 1) / VT * VT;
  if ((i64)S.p.size() < R * span) S.p.resize((size_t)(R * span));
  float* P = S.p.data();
  const uint8_t* rows[VT];
  for (i64 k0 = 0; k0 < end; k0 += TK) {  // keys: every score of the item
    const int n = (int)std::min<i64>(TK, end - k0);
    tile_rows(A, r, k0, n, rows);
    const bool sink = A.sink_tokens && k0 < A.sink_tokens;  // exact post-RoPE sinks go in after the rotation
    keys16(A, r, h, k0, n, S, rows, sink || !A.cos);
    if (A.cos && !sink) rope_scores<R>(A, k0, n, S.kt.data(), q, P + k0, span);
    else scores<R>(q, S.kt.data(), D, P + k0, span);
    for (int row = 0; row < R; ++row) {  // causal (bottom-right aligned), and the lanes past n
      const int valid = (int)std::max<i64>(0, std::min<i64>(n, first + row / G - k0 + 1));
      for (int j = valid; j < TK; ++j) P[row * span + k0 + j] = ninf;
    }
  }
  const i64 scored = (end + TK - 1) / TK * TK;
  for (int row = 0; row < R; ++row) std::fill(P + row * span + scored, P + (row + 1) * span, ninf);
  float total[R];
  for (int row = 0; row < R; ++row) {  // softmax weights, unnormalized; 1 / total at the end
    float* x = P + row * span;
    __m512 mx = _mm512_set1_ps(ninf);
    for (i64 j = 0; j < span; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(x + j));
    float top = _mm512_reduce_max_ps(mx);
    if (top == ninf) top = 0.0f;
    const __m256 tv = _mm256_set1_ps(top);
    __m256 sum = _mm256_setzero_ps();
    for (i64 j = 0; j < span; j += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), tv));
      _mm256_storeu_ps(x + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    total[row] = hsum8(sum);
  }
  float* acc = S.acc.data();
  float* corr = S.corr.data();
  std::fill(acc, acc + (i64)D * R * 16, 0.0f);
  std::fill(corr, corr + (i64)R * D, 0.0f);
  alignas(64) float zs[R * 16] = {};
  alignas(64) float pz[R * VT];
  for (i64 k0 = 0; k0 < end; k0 += VT) {  // values, VT positions a call (one pass over each channel's sums)
    const int n = (int)std::min<i64>(VT, end - k0);
    for (int t0 = 0; t0 < n; t0 += TK) tile_rows(A, r, k0 + t0, std::min(TK, n - t0), rows + t0);
    for (int row = 0; row < R; ++row) std::memcpy(pz + row * VT, P + row * span + k0, sizeof(float) * VT);
    if (A.sink_tokens && k0 < A.sink_tokens) {  // exact sink values, their lanes out of the sums
      const int es = A.sink_type == 0 ? 4 : 2;
      const uint8_t* first_rec = A.sinks + (i64)A.table[r * A.ts] * ((i64)A.sink_tokens * 2 * C * es);
      for (int j = 0; j < n && k0 + j < A.sink_tokens; ++j) {
        const uint8_t* rec = first_rec + (k0 + j) * 2 * C * es + (i64)C * es;
        for (int row = 0; row < R; ++row) {
          const float pj = pz[row * VT + j];
          pz[row * VT + j] = 0.0f;
          for (int d = 0; d < D; ++d) corr[row * D + d] += pj * elem(rec, A.sink_type, h * D + d);
        }
      }
    }
    switch ((n + 15) / 16) {
      case 4: values_lanes<R, 4>(A.value, A.vmap, rows, h, D, pz, acc, zs, corr); break;
      case 3: values_lanes<R, 3>(A.value, A.vmap, rows, h, D, pz, acc, zs, corr); break;
      case 2: values_lanes<R, 2>(A.value, A.vmap, rows, h, D, pz, acc, zs, corr); break;
      default: values_lanes<R, 1>(A.value, A.vmap, rows, h, D, pz, acc, zs, corr); break;
    }
  }
  for (int row = 0; row < R; ++row) {
    const float z = _mm512_reduce_add_ps(_mm512_load_ps(zs + row * 16)), inv = 1.0f / total[row];
    const int t = row / G, g = row % G;
    float* dst = A.out + ((qs + q0 + t) * Hq + h * G + g) * D;
    for (int d = 0; d < D; ++d)
      dst[d] = (_mm512_reduce_add_ps(_mm512_loadu_ps(acc + ((i64)d * R + row) * 16)) + z + corr[row * D + d]) * inv;
  }
}

// A work item on the lane path; false where it does not apply (more rows, no channel-major decoding).
inline bool lanes(const Args& A, int r, int h, i64 q0, int nq, Scratch& S) {
  if (!channel_major_path(A)) return false;
  switch (nq * A.G) {
    case 1: item_lanes<1>(A, r, h, q0, nq, S); return true;
    case 2: item_lanes<2>(A, r, h, q0, nq, S); return true;
    case 3: item_lanes<3>(A, r, h, q0, nq, S); return true;
    case 4: item_lanes<4>(A, r, h, q0, nq, S); return true;
    case 5: item_lanes<5>(A, r, h, q0, nq, S); return true;
    case 6: item_lanes<6>(A, r, h, q0, nq, S); return true;
    case 7: item_lanes<7>(A, r, h, q0, nq, S); return true;
    case 8: item_lanes<8>(A, r, h, q0, nq, S); return true;
    default: return false;
  }
}
#else
inline bool lanes(const Args&, int, int, i64, int, Scratch&) { return false; }
#endif

// Work items are listed head-minor: (request, block of queries or tokens, head). Where there are items enough for
// every thread (4 chunks each), a thread takes the H heads of one request and block in a row, so the slot rows its
// first head reads into the core's caches serve the other heads (a row holds every head's codes); otherwise one
// item at a time, for balance.
inline int head_chunk(i64 count, int H, int threads) { return count >= 4LL * H * threads ? H : 1; }

int attention(Args& A) {
  if (A.D % 16 || A.D > MAXD || A.G < 1 || A.G > MAXROWS || A.bs < 1) return -1;
  A.kmap = code_map(A.key, A.H, A.D);
  A.vmap = code_map(A.value, A.H, A.D);
  const int per_item = std::max(1, MAXROWS / A.G);  // query tokens per work item
  std::vector<i64> items;                           // (request, head, first query) packed
  for (int r = 0; r < A.R; ++r) {
    const i64 ql = A.qsl[r + 1] - A.qsl[r];
    if (ql > A.seq_lens[r]) return -2;
    if (A.max_query > 0 && ql > A.max_query) continue;
    for (i64 q0 = 0; q0 < ql; q0 += per_item)
      for (int h = 0; h < A.H; ++h) {
        items.push_back(r);
        items.push_back(h);
        items.push_back(q0);
      }
  }
  const i64 count = (i64)items.size() / 3;
  const int chunk = head_chunk(count, A.H, A.threads);
#pragma omp parallel num_threads(A.threads)
  {
    Scratch S(A.D);
    S.head_list.resize(A.pool_entries);
#pragma omp for schedule(dynamic, chunk)
    for (i64 i = 0; i < count; ++i) {
      const int r = (int)items[3 * i], h = (int)items[3 * i + 1];
      const i64 q0 = items[3 * i + 2], ql = A.qsl[r + 1] - A.qsl[r];
      const int nq = (int)std::min<i64>(per_item, ql - q0);
      if (!lanes(A, r, h, q0, nq, S)) item(A, r, h, q0, nq, S);
    }
  }
  return 0;
}

// dst[j * stride + d] <- kt[d * TK + j] for j < n, d < D (keys of a tile back to token-major).
inline void untranspose(const float* kt, int n, int D, float* dst, i64 stride) {
#if KVPACK_AVX512
  for (int v = 0; v < n; v += 16)
    for (int d0 = 0; d0 < D; d0 += 16) {
      __m512 x[16];
      for (int i = 0; i < 16; ++i) x[i] = _mm512_loadu_ps(kt + (d0 + i) * TK + v);
      simd::transpose(x);
      for (int t = 0; t < 16 && v + t < n; ++t) _mm512_storeu_ps(dst + (v + t) * stride + d0, x[t]);
    }
#else
  for (int j = 0; j < n; ++j)
    for (int d = 0; d < D; ++d) dst[j * stride + d] = kt[d * TK + j];
#endif
}

// K, V [sum_r seq_lens[r], H, D] float32, request after request: every cached token decoded as attention() reads it
// (post-RoPE keys, pool outliers, exact sinks). The caller runs a dense attention over them (long prefills).
// n rows of D floats (row j at src + j * ss) -> dst + j * ds in `type`.
inline void store_rows(const float* src, i64 ss, int n, int D, void* dst, i64 ds, int type) {
  for (int j = 0; j < n; ++j) {
    const float* x = src + j * ss;
    if (type == 0) {
      std::memcpy((float*)dst + j * ds, x, 4 * (size_t)D);
      continue;
    }
    uint16_t* y = (uint16_t*)dst + j * ds;
    for (int d = 0; d < D; ++d) {
      if (type == 1) {
        y[d] = _cvtss_sh(x[d], _MM_FROUND_TO_NEAREST_INT);
      } else {
        uint32_t bits;
        std::memcpy(&bits, x + d, 4);
        y[d] = (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);  // finite x: round to nearest even
      }
    }
  }
}

// K, V [sum_r seq_lens[r], H, D], request after request, in `type` (0 float32, 1 float16, 2 bfloat16, rounded to
// nearest even as torch's .to(dtype) rounds): every cached token decoded as attention() reads it (post-RoPE keys,
// pool outliers, exact sinks). The caller runs a dense attention over them (long prefills).
int dense(Args& A, void* K, void* V, int type) {
  if (A.D % 16 || A.D > MAXD || A.bs < 1 || type < 0 || type > 2) return -1;
  A.kmap = code_map(A.key, A.H, A.D);
  A.vmap = code_map(A.value, A.H, A.D);
  const int D = A.D, C = A.H * A.D, es = type == 0 ? 4 : 2;
  std::vector<i64> start(A.R + 1, 0);
  for (int r = 0; r < A.R; ++r) start[r + 1] = start[r] + A.seq_lens[r];
  std::vector<i64> items;  // (request, head, first position of a run of tiles)
  constexpr i64 RUN = 16 * TK;
  for (int r = 0; r < A.R; ++r)
    for (i64 k0 = 0; k0 < A.seq_lens[r]; k0 += RUN)
      for (int h = 0; h < A.H; ++h) {
        items.push_back(r);
        items.push_back(h);
        items.push_back(k0);
      }
  const i64 count = (i64)items.size() / 3;
  const int chunk = head_chunk(count, A.H, A.threads);
#pragma omp parallel num_threads(A.threads)
  {
    Scratch S(A.D);
    S.head_list.resize(A.pool_entries);
    std::vector<float> kr((size_t)TK * D);
#pragma omp for schedule(dynamic, chunk)
    for (i64 i = 0; i < count; ++i) {
      const int r = (int)items[3 * i], h = (int)items[3 * i + 1];
      const i64 first = items[3 * i + 2], L = A.seq_lens[r];
      S.cached[0].page = S.cached[1].page = S.head_page = -1;
      for (i64 k0 = first; k0 < std::min(L, first + RUN); k0 += TK) {
        const int n = (int)std::min<i64>(TK, L - k0);
        tile(A, r, h, k0, n, S);
        const i64 row = (start[r] + k0) * C + (i64)h * D;  // in elements
        if (type == 0) {
          untranspose(S.kt.data(), n, D, (float*)K + row, C);
        } else {
          untranspose(S.kt.data(), n, D, kr.data(), D);
          store_rows(kr.data(), D, n, D, (uint8_t*)K + es * row, C, type);
        }
        store_rows(S.v.data(), D, n, D, (uint8_t*)V + es * row, C, type);
      }
    }
  }
  return 0;
}

}  // namespace pages
}  // namespace

// ------------------------------------------------------------------------------------------------ write path
// SlotPart.encode + outlier_pool.write_pool in one call (integrations/vllm/write.py): per token (in parallel) the
// codes at their bit offsets, the per-token fp16 ranges and the outlier slots of each part; then, in token order,
// the keys' outliers appended to their pages' pools (a page's first token resets its pool; sinks take no entries).
// Normalization as NuqCodec.normalize: keys u = (x - zero_c) / scale_c, outliers |u| > 1; values: per token (or
// token and head) the k smallest / largest elements are outliers, the range is [k-th smallest, k-th largest]
// rounded to fp16 (a zero half-range becomes 2**-24); codes: the number of the channel's level midpoints < clamp(u).
namespace {
namespace pages {

struct EncPart {
  int axis_token;  // 0: per-channel ranges (keys), 1: per-token ranges (values)
  i64 offset;
  int code_bytes;
  const int32_t* byte;
  const int32_t* shift;
  const int32_t* mask;
  const float* mid;  // [C, M] level midpoints of each channel's codebook
  int M;
  const float* zero;   // keys: [C]
  const float* scale;  // keys: [C]
  int outliers;        // outlier_frac > 0
  int k_side;          // values: outliers per side of each range
  int pairs;           // values: ranges per token (1: all heads, H: per head)
  int slots, index_bytes;  // outlier slots in the slot
  const i64* bit_at = nullptr;  // [C + 8] each channel's first bit where pack_codes packs 8 at a time (write() sets it)
};

// Stable sort of channel ids by err, largest first (few elements: insertion sort, no allocation).
inline void by_error(std::vector<int>& order, const float* err) {
  for (size_t i = 1; i < order.size(); ++i) {
    const int c = order[i];
    size_t j = i;
    for (; j > 0 && err[order[j - 1]] < err[c]; --j) order[j] = order[j - 1];
    order[j] = c;
  }
}

inline uint16_t f2h(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
inline void put16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

// One token's part: x[C] -> slot bytes at slot + P.offset; returns outliers that found no slot (clamped).
constexpr int KSMALL = 8;  // k-th extremes of a vector by insertion into k + 1 sorted registers up to this k

#if KVPACK_AVX512
// The k-th smallest (LARGEST: largest) of v[0 .. n), 0-based, NaNs left out, n <= 4096: the extreme after k extremes
// are taken out one lane at a time (as the insertion below: +inf (-inf) when fewer than k + 1 numbers).
template <bool LARGEST>
inline float kth_extreme16(const float* v, int n, int k) {
  const float none = LARGEST ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
  const int nv = (n + 15) / 16;
  __mmask16 live[256];
  for (int j = 0; j < nv; ++j) {
    const __mmask16 valid = n - 16 * j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - 16 * j)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(valid, v + 16 * j);
    live[j] = _mm512_mask_cmp_ps_mask(valid, x, x, _CMP_ORD_Q);
  }
  for (int i = 0;; ++i) {
    __m512 best = _mm512_set1_ps(none);
    for (int j = 0; j < nv; ++j) {
      const __m512 x = _mm512_maskz_loadu_ps(live[j], v + 16 * j);
      best = LARGEST ? _mm512_mask_max_ps(best, live[j], best, x) : _mm512_mask_min_ps(best, live[j], best, x);
    }
    const float m = LARGEST ? _mm512_reduce_max_ps(best) : _mm512_reduce_min_ps(best);
    if (i == k) return m;
    const __m512 mv = _mm512_set1_ps(m);
    int j = 0;
    for (; j < nv; ++j) {  // take one lane holding m out
      const __mmask16 hit = _mm512_mask_cmp_ps_mask(live[j], _mm512_maskz_loadu_ps(live[j], v + 16 * j), mv, _CMP_EQ_OQ);
      if (hit) {
        live[j] &= (__mmask16)(hit - 1) | (__mmask16)~hit;
        break;
      }
    }
    if (j == nv) return none;  // no numbers left
  }
}
#endif

// The k-th smallest (lo) and k-th largest (hi) of v[0 .. n), 0-based, as nth_element would give them (k < KSMALL).
inline void kth_extremes(const float* v, int n, int k, float* lo, float* hi) {
#if KVPACK_AVX512
  if (n <= 4096) {
    *lo = kth_extreme16<false>(v, n, k);
    *hi = kth_extreme16<true>(v, n, k);
    return;
  }
#endif
  float small[KSMALL], large[KSMALL];
  for (int i = 0; i <= k; ++i) {
    small[i] = std::numeric_limits<float>::infinity();
    large[i] = -std::numeric_limits<float>::infinity();
  }
  for (int i = 0; i < n; ++i) {
    const float x = v[i];
    if (x < small[k]) {  // keep the k + 1 smallest, ascending
      int j = k;
      for (; j > 0 && small[j - 1] > x; --j) small[j] = small[j - 1];
      small[j] = x;
    }
    if (x > large[k]) {  // and the k + 1 largest, descending
      int j = k;
      for (; j > 0 && large[j - 1] < x; --j) large[j] = large[j - 1];
      large[j] = x;
    }
  }
  *lo = small[k];
  *hi = large[k];
}

// How many of the sorted midpoints m[0 .. count) are < u (searchsorted, left). A channel of b bits has 2**b - 1
// midpoints; the codebook's padding (PAD) puts every later midpoint above 1, beyond any clamped u.
inline int below(const float* m, int count, float u) {
  int n = 0;
#if KVPACK_AVX512
  const __m512 x = _mm512_set1_ps(u);
  for (int j = 0; j < count; j += 16) {
    const __mmask16 valid = count - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (count - j)) - 1);
    n += __builtin_popcount((unsigned)_mm512_mask_cmp_ps_mask(valid, _mm512_maskz_loadu_ps(valid, m + j), x, _CMP_LT_OQ));
  }
#else
  for (int j = 0; j < count; ++j) n += m[j] < u;
#endif
  return n;
}

// code[c] <- the count of channel c's midpoints below clamp(u[c], -1, 1), c < C (`below` for every channel).
// AVX-512, when every row holds M = 2^k - 1 midpoints: 16 channels at a time by a branch-free binary search (k
// gathers; the codebook padding past a channel's own midpoints lies above 1 and is never counted).
inline void codes_of(const EncPart& P, const float* u, int C, int32_t* code) {
#if KVPACK_AVX512
  if (((P.M + 1) & P.M) == 0) {
    constexpr int V = 4;  // vectors searched side by side: independent gather chains
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 one = _mm512_set1_ps(1.0f), minus = _mm512_set1_ps(-1.0f);
    for (int c0 = 0; c0 < C; c0 += 16 * V) {
      __mmask16 valid[V];
      __m512 x[V];
      __m512i row[V], pos[V];
      for (int v = 0; v < V; ++v) {
        const int c = c0 + 16 * v, left = C - c;
        valid[v] = left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : (__mmask16)0;
        // std::min(1, std::max(-1, u)): a NaN becomes -1, as there
        x[v] = _mm512_min_ps(_mm512_max_ps(_mm512_maskz_loadu_ps(valid[v], u + c), minus), one);
        row[v] = _mm512_mullo_epi32(_mm512_add_epi32(_mm512_set1_epi32(c), lane), _mm512_set1_epi32(P.M));
        pos[v] = _mm512_setzero_si512();
      }
      for (int step = (P.M + 1) / 2; step >= 1; step /= 2) {
        const __m512i s1 = _mm512_set1_epi32(step - 1), st = _mm512_set1_epi32(step);
        for (int v = 0; v < V; ++v) {
          const __m512i at = _mm512_add_epi32(_mm512_add_epi32(row[v], pos[v]), s1);
          const __m512 m = _mm512_mask_i32gather_ps(one, valid[v], at, P.mid, 4);
          pos[v] = _mm512_mask_add_epi32(pos[v], _mm512_cmp_ps_mask(m, x[v], _CMP_LT_OQ), pos[v], st);
        }
      }
      for (int v = 0; v < V; ++v) _mm512_mask_storeu_epi32(code + c0 + 16 * v, valid[v], pos[v]);
    }
    return;
  }
#endif
  for (int c = 0; c < C; ++c)
    code[c] = below(P.mid + (i64)c * P.M, std::min(P.M, P.mask[c]), std::min(1.0f, std::max(-1.0f, u[c])));
}

// The codes at their bit offsets in s (zeroed): one running 64-bit word when the channels' codes follow each other
// from bit 0 (`sequential`), else byte by byte at (byte, shift).
inline void pack_codes(const EncPart& P, const int32_t* code, int C, bool sequential, uint8_t* s) {
#if KVPACK_AVX512
  if (P.bit_at) {  // (sequential parts only) 8 codes of <= 8 bits make one 64-bit word, ORed in at its first bit
    alignas(64) uint64_t out[4096 / 8 + 2];  // code_bytes <= 4096 (narrow_bits)
    const int words = P.code_bytes / 8 + 2;
    std::memset(out, 0, 8 * (size_t)words);
    for (int c0 = 0; c0 < C; c0 += 8) {
      const __mmask8 valid = (__mmask8)((1u << std::min(8, C - c0)) - 1);
      const i64 base = P.bit_at[c0];
      const __m512i codes = _mm512_cvtepu32_epi64(_mm256_maskz_loadu_epi32(valid, code + c0));
      const __m512i rel = _mm512_sub_epi64(_mm512_maskz_loadu_epi64(valid, P.bit_at + c0), _mm512_set1_epi64(base));
      const uint64_t word = (uint64_t)_mm512_reduce_or_epi64(_mm512_maskz_sllv_epi64(valid, codes, rel));
      const int w = (int)(base >> 6), sh = (int)(base & 63);
      out[w] |= word << sh;
      if (sh) out[w + 1] |= word >> (64 - sh);
    }
    std::memcpy(s, out, P.code_bytes);
    return;
  }
#endif
  if (sequential) {
    uint64_t word = 0;
    int bits = 0;
    uint8_t* out = s;
    for (int c = 0; c < C; ++c) {
      word |= (uint64_t)(uint32_t)code[c] << bits;
      bits += __builtin_popcount((unsigned)P.mask[c]);
      if (bits >= 32) {
        const uint32_t low = (uint32_t)word;
        std::memcpy(out, &low, 4);
        out += 4;
        word >>= 32;
        bits -= 32;
      }
    }
    for (; bits > 0; bits -= 8, word >>= 8) *out++ = (uint8_t)word;
    return;
  }
  for (int c = 0; c < C; ++c) {
    const uint32_t shifted = (uint32_t)code[c] << P.shift[c];
    s[P.byte[c]] |= (uint8_t)(shifted & 0xFF);
    if (shifted >> 8) s[P.byte[c] + 1] |= (uint8_t)(shifted >> 8);
  }
}

// bits[c] <- channel c's first bit (c < C; then C - 1's, 8 times) where every code of the part is at most 8 bits
// wide and the codes take at most 4096 bytes (what pack_codes' 8-at-a-time path holds); nullptr otherwise.
inline const i64* narrow_bits(const EncPart& P, int C, std::vector<i64>* bits) {
  if (P.code_bytes > 4096) return nullptr;
  bits->resize((size_t)C + 8);
  for (int c = 0; c < C; ++c) {
    if (P.mask[c] > 0xFF) return nullptr;
    (*bits)[c] = 8 * (i64)P.byte[c] + P.shift[c];
  }
  std::fill(bits->begin() + C, bits->end(), C ? (*bits)[C - 1] : 0);
  return bits->data();
}

// The part's codes follow each other from bit 0 in channel order (byte * 8 + shift = the widths before).
inline bool sequential_codes(const EncPart& P, int C) {
  int at = 0;
  for (int c = 0; c < C; ++c) {
    if (P.byte[c] * 8 + P.shift[c] != at || P.mask[c] != (1 << __builtin_popcount((unsigned)P.mask[c])) - 1) return false;
    at += __builtin_popcount((unsigned)P.mask[c]);
  }
  return (at + 7) / 8 <= P.code_bytes;
}

#if KVPACK_AVX512
inline __mmask16 beyond16(const float* err) {  // lanes of err[0 .. 16) that are >= 0
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(err), _mm512_setzero_ps(), _CMP_GE_OQ);
}
#endif

// order <- the channels c < C with err[c] >= 0 (the ones beyond their range), ascending.
inline void flagged(const float* err, int C, std::vector<int>& order) {
  order.resize(C);
  int m = 0, c = 0;
#if KVPACK_AVX512
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; c + 16 <= C; c += 16) {
    const __mmask16 k = beyond16(err + c);
    _mm512_mask_compressstoreu_epi32(order.data() + m, k, _mm512_add_epi32(lane, _mm512_set1_epi32(c)));
    m += __builtin_popcount((unsigned)k);
  }
#endif
  for (; c < C; ++c)
    if (err[c] >= 0) order[m++] = c;
  order.resize(m);
}

// bit c of words[c / 64] set where err[c] >= 0 (|u| > 1), c < C.
inline void flag_bits(const float* err, int C, uint64_t* words) {
  int c = 0;
#if KVPACK_AVX512
  for (; c + 16 <= C; c += 16) words[c / 64] |= (uint64_t)beyond16(err + c) << (c % 64);
#endif
  for (; c < C; ++c)
    if (err[c] >= 0) words[c / 64] |= 1ULL << (c % 64);
}

inline int encode_token(const EncPart& P, const float* x, int C, int D, uint8_t* slot, float* u, float* err,
                        int32_t* code, bool sequential, std::vector<float>& sorted, std::vector<int>& order) {
  uint8_t* s = slot + P.offset;
  std::memset(s, 0, P.code_bytes);
  float zeros[MAXD], scales[MAXD];  // per pair (values)
  if (!P.axis_token) {
#pragma omp simd
    for (int c = 0; c < C; ++c) u[c] = (x[c] - P.zero[c]) / P.scale[c];
#pragma omp simd
    for (int c = 0; c < C; ++c) err[c] = P.outliers && std::fabs(u[c]) > 1.0f ? (std::fabs(u[c]) - 1.0f) * std::fabs(P.scale[c]) : -1.0f;
  } else {
    const int n = C / P.pairs;
    for (int p = 0; p < P.pairs; ++p) {
      const float* v = x + p * n;
      float lo, hi;
      if (P.outliers && P.k_side < KSMALL) {
        kth_extremes(v, n, P.k_side, &lo, &hi);
      } else if (P.outliers) {
        sorted.assign(v, v + n);
        std::nth_element(sorted.begin(), sorted.begin() + P.k_side, sorted.end());
        lo = sorted[P.k_side];
        std::nth_element(sorted.begin(), sorted.begin() + (n - 1 - P.k_side), sorted.end());
        hi = sorted[n - 1 - P.k_side];
      } else {
        lo = *std::min_element(v, v + n);
        hi = *std::max_element(v, v + n);
      }
      const float zero = h2f(f2h((hi + lo) / 2)), half = h2f(f2h((hi - lo) / 2));
      const float scale = half > 0 ? half : 5.9604644775390625e-08f;  // 2**-24
      zeros[p] = zero;
      scales[p] = scale;
      float* up = u + p * n;
      float* ep = err + p * n;
      const bool outliers = P.outliers;
#pragma omp simd
      for (int i = 0; i < n; ++i) {
        const float ui = (v[i] - zero) / scale;
        up[i] = ui;
        ep[i] = outliers && (v[i] < lo || v[i] > hi) ? std::max(std::fabs(ui) - 1.0f, 0.0f) * std::fabs(scale) : -1.0f;
      }
    }
    uint8_t* at = s + P.code_bytes;
    for (int p = 0; p < P.pairs; ++p) {
      put16(at + 2 * p, f2h(zeros[p]));
      put16(at + 2 * (P.pairs + p), f2h(scales[p]));
    }
  }
  codes_of(P, u, C, code);
  pack_codes(P, code, C, sequential, s);
  if (!P.slots) return 0;
  // outlier slots: the largest clamping errors first (ties: lower channel first)
  flagged(err, C, order);
  by_error(order, err);
  const int used = std::min<int>((int)order.size(), P.slots);
  uint8_t* vals = s + P.code_bytes + 4 * (P.axis_token ? P.pairs : 0);
  uint8_t* index = vals + 2 * P.slots;
  for (int k = 0; k < P.slots; ++k) {
    const int c = k < used ? order[k] : C;
    put16(vals + 2 * k, k < used ? f2h(x[c]) : 0);
    if (P.index_bytes == 2) put16(index + 2 * k, (uint16_t)c);
    else index[k] = (uint8_t)c;
  }
  (void)D;
  return (int)order.size() - used;
}

struct WriteArgs {
  const float* kx;  // [T, C] pre-RoPE keys (float32); post-RoPE when cos is set (write() rotates them back)
  const float* vx;  // [T, C] values
  int x_type;       // what kx, vx point to: 0 float32, 1 float16, 2 bfloat16 (write() widens the others, exactly)
  float* peaks;     // [2] out: max |x| of the keys, of the values (NaN where one is NaN or inf); nullptr: not checked
  int T, H, D, threads;
  const i64* slots;  // [T] slot ids (no padding)
  const i64* pos;    // [T] positions
  uint8_t* rows;     // slot rows of the layer
  i64 slot_bytes;
  int bs;
  uint8_t* pool;  // key-outlier pools (nullptr: none)
  int pool_entries, sink_tokens;
  const float* cos;  // [positions, rot] rotate_half RoPE of post-RoPE keys (nullptr: kx is pre-RoPE)
  const float* sin;
  i64 rope_stride;
  int rot;
  EncPart key, value;
};

// out [T, C] <- the pre-RoPE keys of post-RoPE x [T, C] at positions pos, as kvpack.hf.rope.invert_rope computes
// them in float32: (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin), every product, sum and quotient
// rounded on its own (no fused multiply-add), so the encoder sees the torch reference's bits.
__attribute__((noinline, optimize("fp-contract=off"))) void unrotate(const WriteArgs& A, float* out) {
  const int C = A.H * A.D, half = A.rot / 2;
#pragma omp parallel for num_threads(A.threads) schedule(static)
  for (int t = 0; t < A.T; ++t) {
    const float* cs = A.cos + A.pos[t] * A.rope_stride;
    const float* sn = A.sin + A.pos[t] * A.rope_stride;
    const float* x = A.kx + (i64)t * C;
    float* y = out + (i64)t * C;
    for (int h = 0; h < A.H; ++h) {
      const float* xh = x + h * A.D;
      float* yh = y + h * A.D;
      int i = 0;
#if KVPACK_AVX512
      for (; i < half; i += 16) {  // the same operations, 16 pairs at a time
        const __mmask16 m = half - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (half - i)) - 1);
        const __m512 lo = _mm512_maskz_loadu_ps(m, xh + i), hi = _mm512_maskz_loadu_ps(m, xh + i + half);
        const __m512 c0 = _mm512_maskz_loadu_ps(m, cs + i), s0 = _mm512_maskz_loadu_ps(m, sn + i);
        const __m512 c1 = _mm512_maskz_loadu_ps(m, cs + i + half), s1 = _mm512_maskz_loadu_ps(m, sn + i + half);
        const __m512 n0 = _mm512_add_ps(_mm512_mul_ps(c0, c0), _mm512_mul_ps(s0, s0));
        const __m512 n1 = _mm512_add_ps(_mm512_mul_ps(c1, c1), _mm512_mul_ps(s1, s1));
        const __m512 neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(hi), _mm512_set1_epi32(INT32_MIN)));  // -hi
        _mm512_mask_storeu_ps(yh + i, m, _mm512_div_ps(_mm512_sub_ps(_mm512_mul_ps(lo, c0), _mm512_mul_ps(neg, s0)), n0));
        _mm512_mask_storeu_ps(yh + i + half, m,
                              _mm512_div_ps(_mm512_sub_ps(_mm512_mul_ps(hi, c1), _mm512_mul_ps(lo, s1)), n1));
      }
#endif
      for (; i < half; ++i) {
        const float lo = xh[i], hi = xh[i + half];
        const float n0 = cs[i] * cs[i] + sn[i] * sn[i];
        const float n1 = cs[i + half] * cs[i + half] + sn[i + half] * sn[i + half];
        yh[i] = (lo * cs[i] - (-hi) * sn[i]) / n0;
        yh[i + half] = (hi * cs[i + half] - lo * sn[i + half]) / n1;
      }
      for (int i = A.rot; i < A.D; ++i) yh[i] = xh[i];
    }
  }
}

template <int TYPE>
inline float widen_one(const void* x, i64 i) {
  if constexpr (TYPE == 2) {
    const uint32_t bits = (uint32_t)((const uint16_t*)x)[i] << 16;
    float v;
    std::memcpy(&v, &bits, 4);
    return v;
  } else if constexpr (TYPE == 1) {
    return h2f(((const uint16_t*)x)[i]);
  } else {
    return ((const float*)x)[i];
  }
}

// Elements i0 .. i1 - 1 of x (TYPE 0 float32, 1 float16, 2 bfloat16) -> dst float32 (exact; dst nullptr: not
// copied), their max |x| folded into *peak and any NaN or inf into *bad (x - x is NaN exactly there).
template <int TYPE>
inline void widen_range(const void* x, i64 i0, i64 i1, float* dst, float* peak, int* bad) {
  i64 i = i0;
  simd::vf m = simd::zero(), nonfinite = simd::zero();
  for (; i + simd::W <= i1; i += simd::W) {
    const uint16_t* h = (const uint16_t*)x + i;
    const simd::vf v = TYPE == 2 ? simd::load_bf16(h) : TYPE == 1 ? simd::load_half(h) : simd::load((const float*)x + i);
    if (dst) simd::store(dst + i, v);
    m = simd::max(m, simd::abs(v));
    nonfinite = simd::add(nonfinite, simd::sub(v, v));
  }
  const float mv = simd::hmax(m), nf = simd::hsum(nonfinite);
  *peak = mv > *peak ? mv : *peak;
  *bad |= nf != nf;
  for (; i < i1; ++i) {
    const float v = widen_one<TYPE>(x, i);
    if (dst) dst[i] = v;
    const float a = std::fabs(v);
    *peak = a > *peak ? a : *peak;
    *bad |= v - v != v - v;
  }
}

// x [n] (type 0 float32, 1 float16, 2 bfloat16) -> dst float32 (exact; dst nullptr: type 0, not copied); returns
// max |x|, NaN where x holds a NaN or an inf.
inline float widen_peak(const void* x, int type, i64 n, float* dst, int threads) {
  float peak = 0.0f;
  int bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(max : peak) reduction(| : bad)
  for (i64 i0 = 0; i0 < n; i0 += 16384) {
    const i64 i1 = std::min(n, i0 + 16384);
    if (type == 2) widen_range<2>(x, i0, i1, dst, &peak, &bad);
    else if (type == 1) widen_range<1>(x, i0, i1, dst, &peak, &bad);
    else widen_range<0>(x, i0, i1, dst, &peak, &bad);
  }
  return bad ? std::numeric_limits<float>::quiet_NaN() : peak;
}

i64 write(WriteArgs& A) {
  const int C = A.H * A.D;
  if (C > 4096 || A.D > MAXD || (A.cos && (A.rot > A.D || A.rot % 2)) || A.x_type < 0 || A.x_type > 2) return -1;
  std::unique_ptr<float[]> wide[2];  // the inputs widened to float32 (other dtypes)
  const float** xs[2] = {&A.kx, &A.vx};
  for (int i = 0; i < 2; ++i) {
    if (A.x_type == 0 && !A.peaks) continue;
    const i64 n = (i64)A.T * C;
    if (A.x_type != 0) wide[i].reset(new float[n]);
    const float peak = widen_peak(*xs[i], A.x_type, n, wide[i].get(), A.threads);
    if (A.peaks) A.peaks[i] = peak;
    if (wide[i]) *xs[i] = wide[i].get();
    if (A.peaks && !(peak <= 65504.0f)) return -3;  // NaN, inf or beyond fp16: the caller raises, nothing written
  }
  std::unique_ptr<float[]> pre;
  if (A.cos) {
    pre.reset(new float[(size_t)A.T * C]);
    unrotate(A, pre.get());
    A.kx = pre.get();
  }
  const bool key_seq = sequential_codes(A.key, C), value_seq = sequential_codes(A.value, C);
  std::vector<i64> key_bits, value_bits;  // pack_codes' 8-at-a-time path
  A.key.bit_at = key_seq ? narrow_bits(A.key, C, &key_bits) : nullptr;
  A.value.bit_at = value_seq ? narrow_bits(A.value, C, &value_bits) : nullptr;
  const bool pooled = A.pool && A.pool_entries && A.key.outliers;
  const int words = (C + 63) / 64;
  std::vector<uint64_t> flags(pooled ? (size_t)A.T * words : 0, 0);
  i64 overflow = 0;
#pragma omp parallel num_threads(A.threads) reduction(+ : overflow)
  {
    std::vector<float> u(C), err(C), sorted;
    std::vector<int32_t> code(C);
    std::vector<int> order;
#pragma omp for schedule(static)
    for (int t = 0; t < A.T; ++t) {
      uint8_t* slot = A.rows + A.slots[t] * A.slot_bytes;
      overflow += encode_token(A.key, A.kx + (i64)t * C, C, A.D, slot, u.data(), err.data(), code.data(), key_seq,
                               sorted, order);
      if (pooled) flag_bits(err.data(), C, flags.data() + (i64)t * words);  // the channels the pool pass looks at
      encode_token(A.value, A.vx + (i64)t * C, C, A.D, slot, u.data(), err.data(), code.data(), value_seq, sorted,
                   order);  // values: 2k slots
    }
  }
  if (!pooled) return overflow;
  const i64 pool_bytes = 2 + 4 * (i64)A.pool_entries;
  for (int t = 0; t < A.T; ++t)  // a page's first token: a fresh pool
    if (A.slots[t] % A.bs == 0) put16(A.pool + (A.slots[t] / A.bs) * pool_bytes, 0);
  std::vector<float> u(C), err(C);
  std::vector<int> order;
  for (int t = 0; t < A.T; ++t) {
    if (A.pos[t] < A.sink_tokens) continue;
    const float* x = A.kx + (i64)t * C;
    order.clear();
    for (int w = 0; w < words; ++w)  // the channels flagged above, in channel order
      for (uint64_t bits = flags[(i64)t * words + w]; bits; bits &= bits - 1) {
        const int c = 64 * w + __builtin_ctzll(bits);
        u[c] = (x[c] - A.key.zero[c]) / A.key.scale[c];
        err[c] = (std::fabs(u[c]) - 1.0f) * std::fabs(A.key.scale[c]);
        order.push_back(c);
      }
    if (order.empty()) continue;
    by_error(order, err.data());
    uint8_t* pool = A.pool + (A.slots[t] / A.bs) * pool_bytes;
    int count = (int16_t)u16(pool);
    for (int c : order) {
      if (count >= A.pool_entries) {
        ++overflow;
        continue;
      }
      uint8_t* entry = pool + 2 + 4 * (i64)count;
      put16(entry, f2h(x[c]));
      entry[2] = (uint8_t)(A.slots[t] % A.bs);
      entry[3] = (uint8_t)c;
      ++count;
    }
    put16(pool, (uint16_t)count);
  }
  return overflow;
}

}  // namespace pages
}  // namespace
