// linear: the AVX2 level. Compiled with -mavx2 -mfma -mf16c; used when the CPU lacks AVX-512 BF16
// or when MARGINGATE_SIMD=avx2.
//
// Per output element (see the argument at the top of linear.cpp): one 8-lane fp32 accumulator,
// K walked from 0 in chunks of 8 with one vfmadd each (x arrives widened to fp32; a bf16/fp16
// weight is widened exactly in registers), a zero-filled last chunk, then the halving tree over
// the 8 lanes (4, 2, 1), + bias, one rounding. Tiles of up to 3 rows x 4 weight rows; every
// accumulator sees the same sequence whatever the tile.
#include <immintrin.h>

#include <array>
#include <cstring>
#include <utility>

#include "linear_impl.h"

namespace margingate::linear_impl {

namespace {

constexpr int kLanes = 8;
constexpr int kMaxMr = 3;
constexpr int kMaxNr = 4;
// How far ahead of its reads a weight-streaming tile prefetches, along each weight row. Rows of
// consecutive panels lie one after the other, so this reaches a few tiles ahead. The hardware
// prefetcher alone keeps too few lines in flight for 4 interleaved row streams. Measured on the
// 2-core EPYC (AVX2 level, bf16 M=1 K=640 N=262144 = 335 MB, one thread, CPU time): no prefetch
// 7.4 GB/s; into L1 (T0) 8 KB ahead 9.7 GB/s; into L2 (T1) 4 KB 9 GB/s, 16 KB 17-21 GB/s,
// 32 KB 17-18 GB/s (torch's oneDNN: 13 GB/s).
constexpr int64_t kPrefetchAhead = 16384;

// Halving tree: s4[i] = a[i] + a[i+4], s2[i] = s4[i] + s4[i+2], s = s2[0] + s2[1].
inline float reduce8(__m256 a) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
  return _mm_cvtss_f32(s1);
}

inline __m256 load_w8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_w8(const fp16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load_w8(const bf16_t* p) {  // bf16 -> fp32 is a 16-bit shift: exact
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

// `prefetch`: this tile streams its weight rows from memory (see run()), so ask for the lines
// `ahead` bytes further along each row, one line per row per 64 bytes consumed, into L2: at least
// kPrefetchAhead, and at least one tile (NR rows) ahead, so that with long rows (K = 4096) the
// lines asked for are the next panel's, not this tile's other rows.
template <typename WT, int MR, int NR>
void tile(const float* x, int64_t xs, const WT* w, int64_t ws, int64_t K, float* sums, bool prefetch) {
  __m256 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t full = K / kLanes * kLanes;
  constexpr int64_t kLine = 64 / sizeof(WT);  // elements per cache line
  const int64_t ahead = std::max<int64_t>(kPrefetchAhead, NR * ws * int64_t{sizeof(WT)});
  for (int64_t k = 0; k < full; k += kLanes) {
    if (prefetch && k % kLine == 0) {
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + j * ws + k) + ahead, _MM_HINT_T1);
    }
    __m256 xv[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x + i * xs + k);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const __m256 wv = load_w8(w + j * ws + k);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  if (full < K) {  // the last chunk, zero-filled through small copies (AVX2 has no masked 16-bit load)
    const int64_t rest = K - full;
    __m256 xv[MR];
    for (int i = 0; i < MR; ++i) {
      alignas(32) float buf[kLanes] = {};
      std::memcpy(buf, x + i * xs + full, static_cast<size_t>(rest) * sizeof(float));
      xv[i] = _mm256_load_ps(buf);
    }
    for (int j = 0; j < NR; ++j) {
      WT buf[kLanes];
      std::memset(static_cast<void*>(buf), 0, sizeof(buf));
      std::memcpy(static_cast<void*>(buf), w + j * ws + full, static_cast<size_t>(rest) * sizeof(WT));
      const __m256 wv = load_w8(buf);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) sums[i * NR + j] = reduce8(acc[i][j]);
}

using TileFn = void (*)(const float* x, int64_t xs, const void* w, int64_t ws, int64_t K, float* sums,
                        bool prefetch);

template <typename WT, int MR, int NR>
void tile_entry(const float* x, int64_t xs, const void* w, int64_t ws, int64_t K, float* sums, bool prefetch) {
  tile<WT, MR, NR>(x, xs, static_cast<const WT*>(w), ws, K, sums, prefetch);
}

template <typename WT, int MR, int... NRs>
constexpr std::array<TileFn, kMaxNr> row(std::integer_sequence<int, NRs...>) {
  return {&tile_entry<WT, MR, NRs + 1>...};
}

template <typename WT>
struct Tables {
  static constexpr std::array<TileFn, kMaxNr> rows[kMaxMr] = {
      row<WT, 1>(std::make_integer_sequence<int, kMaxNr>{}), row<WT, 2>(std::make_integer_sequence<int, kMaxNr>{}),
      row<WT, 3>(std::make_integer_sequence<int, kMaxNr>{})};
};

template <typename WT>
void run(const Problem& p, const Parallel& parallel) {
  const auto& table = Tables<WT>::rows;
  const float* x = static_cast<const float*>(p.x);
  const WT* w = static_cast<const WT*>(p.w);
  const int64_t mr = p.M >= kMaxMr ? kMaxMr : p.M;
  const int64_t m_block = std::max<int64_t>(mr, (256 << 10) / std::max<int64_t>(1, p.K * 4));
  run_blocks(p, parallel, mr, kMaxNr, m_block, [&](int64_t m_lo, int64_t m_hi, int64_t n0, int64_t cols) {
    float sums[kMaxMr * kMaxNr];
    const WT* wp = w + n0 * p.w_row_stride;
    for (int64_t m0 = m_lo; m0 < m_hi; m0 += mr) {
      const int64_t rows = std::min(mr, m_hi - m0);
      // The first row tile of a block brings the weight panel in from memory; the others find
      // it in cache (prefetching there would only add instructions).
      table[rows - 1][cols - 1](x + m0 * p.x_row_stride, p.x_row_stride, wp, p.w_row_stride, p.K, sums, m0 == m_lo);
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) store_output(p, m0 + i, n0 + j, sums[i * cols + j]);
      }
    }
  });
}

}  // namespace

void linear_avx2(const Problem& p, const Parallel& parallel) {
  // x always arrives as fp32 here: fp32 input as is, bf16/fp16 widened by the dispatcher.
  switch (p.dtype) {
    case DType::kFloat32: run<float>(p, parallel); break;
    case DType::kFloat16: run<fp16_t>(p, parallel); break;
    case DType::kBFloat16: run<bf16_t>(p, parallel); break;
  }
}

}  // namespace margingate::linear_impl
