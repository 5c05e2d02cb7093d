// linear: the AVX-512 level. Compiled with -mavx512*; called only when the CPU has AVX-512 BF16.
//
// Per output element (see the argument at the top of linear.cpp): one 16-lane fp32 accumulator,
// K walked from 0 in chunks (bf16: 32 elements, one vdpbf16ps; fp16/fp32: 16 elements, one
// vfmadd with the weight widened exactly), a zero-filled masked last chunk, then the fixed
// halving tree over the 16 lanes (reduce16), + bias, one rounding.
//
// Register blocking: a tile of MR rows x NR weight rows keeps MR*NR accumulators; each chunk
// loads MR x vectors and NR weight vectors and issues MR*NR dot instructions. Every accumulator
// sees the same chunk sequence whatever MR and NR are, so tile shape (chosen from M) is free.
// Decode (M < 4) uses 1..3 rows x 12 weight rows: the weight streams once from memory, the x
// rows stay in L1.
#include <immintrin.h>

#include <array>
#include <utility>

#include "linear_impl.h"

namespace margingate::linear_impl {

namespace {

constexpr int kLanes = 16;
constexpr int kMaxMr = 4;
constexpr int kMaxNr = 12;

// Sums each of 16 accumulators over its lanes with the halving tree
//   s8[i] = a[i] + a[i+8], s4[i] = s8[i] + s8[i+4], s2[i] = s4[i] + s4[i+2], s = s2[0] + s2[1],
// all 16 at once. Every step pairs lanes of the same accumulator only, and every accumulator
// gets the same pairs whatever slot it occupies, so the sum of an accumulator is the same as
// reducing it alone. out[j] = sum of a[j].
inline void reduce16(const __m512 a[16], float out[16]) {
  __m512 b[8], c[4], d[2];
  for (int j = 0; j < 8; ++j) {  // 256-bit halves: [a0 s8 | a1 s8]
    const __m512 lo = _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x44);  // a0 q0 q1, a1 q0 q1
    const __m512 hi = _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xEE);  // a0 q2 q3, a1 q2 q3
    b[j] = _mm512_add_ps(lo, hi);
  }
  for (int j = 0; j < 4; ++j) {  // 128-bit quarters: [a0 s4 | a1 s4 | a2 s4 | a3 s4]
    const __m512 lo = _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0x88);  // q0 q2 of each
    const __m512 hi = _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0xDD);  // q1 q3 of each
    c[j] = _mm512_add_ps(lo, hi);
  }
  for (int j = 0; j < 2; ++j) {  // per quarter: [c0 s2[0..1], c1 s2[0..1]]
    const __m512 lo = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(c[2 * j]), _mm512_castps_pd(c[2 * j + 1])));
    const __m512 hi = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(c[2 * j]), _mm512_castps_pd(c[2 * j + 1])));
    d[j] = _mm512_add_ps(lo, hi);
  }
  // Per quarter q: [c0 s, c1 s, c2 s, c3 s], and quarter q of c[j] holds accumulator 4j + q.
  const __m512 lo = _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0));
  const __m512 hi = _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1));
  alignas(64) float e[16];
  _mm512_store_ps(e, _mm512_add_ps(lo, hi));
  for (int j = 0; j < 4; ++j) {
    for (int q = 0; q < 4; ++q) out[4 * j + q] = e[4 * q + j];
  }
}

// Lane sums of `count` accumulators stored at parts[16 * i], in groups of 16 (the last group
// padded with zero vectors whose sums are discarded).
inline void reduce_parts(const float* parts, int count, float* out) {
  for (int g = 0; g < count; g += 16) {
    __m512 a[16];
    const int n = count - g < 16 ? count - g : 16;
    for (int i = 0; i < 16; ++i) a[i] = i < n ? _mm512_load_ps(parts + (g + i) * kLanes) : _mm512_setzero_ps();
    float s[16];
    reduce16(a, s);
    for (int i = 0; i < n; ++i) out[g + i] = s[i];
  }
}

// ---- the chunk step of each dtype: identical for every accumulator, whatever the tile ----

template <int MR, int NR>
void tile_bf16(const uint16_t* x, int64_t xs, const uint16_t* w, int64_t ws, int64_t K, float* parts) {
  __m512 acc[MR][NR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh xv[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) xv[i] = (__m512bh)_mm512_loadu_si512(x + i * xs + k);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + j * ws + k);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv[i], wv);
    }
  }
  if (k < K) {
    const __mmask32 mask = _cvtu32_mask32(static_cast<uint32_t>((uint64_t{1} << (K - k)) - 1));
    __m512bh xv[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) xv[i] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + i * xs + k);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + j * ws + k);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv[i], wv);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) _mm512_store_ps(parts + (i * NR + j) * kLanes, acc[i][j]);
}

inline __m512 load_w16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_w16(const uint16_t* p) {  // fp16 weight, widened exactly
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load_w16_tail(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_w16_tail(const uint16_t* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// fp32 and fp16 (x already widened to fp32; WT = float or uint16_t fp16 bits for the weight).
template <typename WT, int MR, int NR>
void tile_fma(const float* x, int64_t xs, const WT* w, int64_t ws, int64_t K, float* parts) {
  __m512 acc[MR][NR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_ps(x + i * xs + k);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      const __m512 wv = load_w16(w + j * ws + k);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  if (k < K) {
    const __mmask16 mask = _cvtu32_mask16(static_cast<uint32_t>((1u << (K - k)) - 1));
    __m512 xv[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_maskz_loadu_ps(mask, x + i * xs + k);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      const __m512 wv = load_w16_tail(w + j * ws + k, mask);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) _mm512_store_ps(parts + (i * NR + j) * kLanes, acc[i][j]);
}

// ---- tile tables: every (rows, cols) up to (kMaxMr, kMaxNr), so edge tiles use the same code ----

using TileFn = void (*)(const void* x, int64_t xs, const void* w, int64_t ws, int64_t K, float* parts);

template <int MR, int NR>
void tile_entry_bf16(const void* x, int64_t xs, const void* w, int64_t ws, int64_t K, float* parts) {
  tile_bf16<MR, NR>(static_cast<const uint16_t*>(x), xs, static_cast<const uint16_t*>(w), ws, K, parts);
}
template <int MR, int NR>
void tile_entry_f32(const void* x, int64_t xs, const void* w, int64_t ws, int64_t K, float* parts) {
  tile_fma<float, MR, NR>(static_cast<const float*>(x), xs, static_cast<const float*>(w), ws, K, parts);
}
template <int MR, int NR>
void tile_entry_f16(const void* x, int64_t xs, const void* w, int64_t ws, int64_t K, float* parts) {
  tile_fma<uint16_t, MR, NR>(static_cast<const float*>(x), xs, static_cast<const uint16_t*>(w), ws, K, parts);
}

template <int MR, int... NRs>
constexpr std::array<TileFn, sizeof...(NRs)> row_bf16(std::integer_sequence<int, NRs...>) {
  return {&tile_entry_bf16<MR, NRs + 1>...};
}
template <int MR, int... NRs>
constexpr std::array<TileFn, sizeof...(NRs)> row_f32(std::integer_sequence<int, NRs...>) {
  return {&tile_entry_f32<MR, NRs + 1>...};
}
template <int MR, int... NRs>
constexpr std::array<TileFn, sizeof...(NRs)> row_f16(std::integer_sequence<int, NRs...>) {
  return {&tile_entry_f16<MR, NRs + 1>...};
}

using Row = std::array<TileFn, kMaxNr>;
const Row kBf16[kMaxMr] = {row_bf16<1>(std::make_integer_sequence<int, kMaxNr>{}),
                           row_bf16<2>(std::make_integer_sequence<int, kMaxNr>{}),
                           row_bf16<3>(std::make_integer_sequence<int, kMaxNr>{}),
                           row_bf16<4>(std::make_integer_sequence<int, kMaxNr>{})};
const Row kF32[kMaxMr] = {row_f32<1>(std::make_integer_sequence<int, kMaxNr>{}),
                          row_f32<2>(std::make_integer_sequence<int, kMaxNr>{}),
                          row_f32<3>(std::make_integer_sequence<int, kMaxNr>{}),
                          row_f32<4>(std::make_integer_sequence<int, kMaxNr>{})};
const Row kF16[kMaxMr] = {row_f16<1>(std::make_integer_sequence<int, kMaxNr>{}),
                          row_f16<2>(std::make_integer_sequence<int, kMaxNr>{}),
                          row_f16<3>(std::make_integer_sequence<int, kMaxNr>{}),
                          row_f16<4>(std::make_integer_sequence<int, kMaxNr>{})};

}  // namespace

void linear_avx512(const Problem& p, const Parallel& parallel) {
  const Row* table = p.dtype == DType::kBFloat16 ? kBf16 : p.dtype == DType::kFloat16 ? kF16 : kF32;
  const int64_t x_esize = p.x_is_float ? 4 : dtype_size(p.dtype);
  const int64_t w_esize = dtype_size(p.dtype);
  // Tile shape from M (free: see the header comment). Prefill: 4 x 6 (24 accumulators, 10 loads
  // per 24 dot instructions). Decode: all rows x 12 weight rows, the weight streamed once.
  const int64_t mr = p.M >= kMaxMr ? kMaxMr : p.M;
  const int64_t nr = p.M >= kMaxMr ? 6 : kMaxNr;
  // Rows per cache block: keep the x block around 256 KiB (L2 holds it while panels stream).
  const int64_t m_block = std::max<int64_t>(mr, (256 << 10) / std::max<int64_t>(1, p.K * x_esize));
  const char* x = static_cast<const char*>(p.x);
  const char* w = static_cast<const char*>(p.w);
  run_tiles(p, parallel, mr, nr, m_block, [&](int64_t m0, int64_t rows, int64_t n0, int64_t cols) {
    alignas(64) float parts[kMaxMr * kMaxNr * kLanes];
    float sums[kMaxMr * kMaxNr];
    table[rows - 1][cols - 1](x + m0 * p.x_row_stride * x_esize, p.x_row_stride, w + n0 * p.w_row_stride * w_esize,
                              p.w_row_stride, p.K, parts);
    reduce_parts(parts, static_cast<int>(rows * cols), sums);
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) store_output(p, m0 + i, n0 + j, sums[i * cols + j]);
    }
  });
}

}  // namespace margingate::linear_impl
