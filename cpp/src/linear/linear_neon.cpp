// linear: the NEON level (aarch64; Advanced SIMD is part of the base ISA, so no flag and no check).
//
// Per output element it performs exactly the AVX2 level's sequence (linear_avx2.cpp): an 8-lane
// fp32 accumulator -- here a pair of 4-lane registers, lanes 0-3 and 4-7 -- starting at +0, K
// walked from 0 in chunks of 8 with one fused multiply-add per lane (x arrives widened to fp32;
// a bf16/fp16 weight is widened exactly in registers), a zero-filled last chunk, then the halving
// tree over the 8 lanes (i + 4, then i + 2, then i + 1), + bias, one rounding. Fused multiply-add
// rounds once on every ISA, so an aarch64 machine and an AVX2 machine give the same bits.
#include <arm_neon.h>

#include <array>
#include <cstring>
#include <utility>

#include "linear_impl.h"

namespace margingate::linear_impl {

namespace {

constexpr int kChunk = 8;
constexpr int kMaxMr = 2;
constexpr int kMaxNr = 6;

struct V8 {
  float32x4_t lo, hi;
};

inline float reduce8(V8 a) {
  const float32x4_t s4 = vaddq_f32(a.lo, a.hi);
  const float32x2_t s2 = vadd_f32(vget_low_f32(s4), vget_high_f32(s4));
  return vget_lane_f32(s2, 0) + vget_lane_f32(s2, 1);
}

inline V8 load_w8(const float* p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }
inline V8 load_w8(const fp16_t* p) {
  const float16x8_t h = vld1q_f16(reinterpret_cast<const float16_t*>(p));
  return {vcvt_f32_f16(vget_low_f16(h)), vcvt_high_f32_f16(h)};
}
inline V8 load_w8(const bf16_t* p) {  // bf16 -> fp32 is a 16-bit shift: exact
  const uint16x8_t h = vld1q_u16(reinterpret_cast<const uint16_t*>(p));
  return {vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)),
          vreinterpretq_f32_u32(vshll_high_n_u16(h, 16))};
}

inline V8 fma8(V8 acc, V8 x, V8 w) { return {vfmaq_f32(acc.lo, x.lo, w.lo), vfmaq_f32(acc.hi, x.hi, w.hi)}; }

template <typename WT, int MR, int NR>
void tile(const float* x, int64_t xs, const WT* w, int64_t ws, int64_t K, float* sums) {
  V8 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
  const int64_t full = K / kChunk * kChunk;
  for (int64_t k = 0; k < full; k += kChunk) {
    V8 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = load_w8(x + i * xs + k);
    for (int j = 0; j < NR; ++j) {
      const V8 wv = load_w8(w + j * ws + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = fma8(acc[i][j], xv[i], wv);
    }
  }
  if (full < K) {  // the last chunk, zero-filled, as at the AVX2 level
    const int64_t rest = K - full;
    V8 xv[MR];
    for (int i = 0; i < MR; ++i) {
      float buf[kChunk] = {};
      std::memcpy(buf, x + i * xs + full, static_cast<size_t>(rest) * sizeof(float));
      xv[i] = load_w8(buf);
    }
    for (int j = 0; j < NR; ++j) {
      WT buf[kChunk];
      std::memset(static_cast<void*>(buf), 0, sizeof(buf));
      std::memcpy(static_cast<void*>(buf), w + j * ws + full, static_cast<size_t>(rest) * sizeof(WT));
      const V8 wv = load_w8(buf);
      for (int i = 0; i < MR; ++i) acc[i][j] = fma8(acc[i][j], xv[i], wv);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) sums[i * NR + j] = reduce8(acc[i][j]);
}

using TileFn = void (*)(const float* x, int64_t xs, const void* w, int64_t ws, int64_t K, float* sums);

template <typename WT, int MR, int NR>
void tile_entry(const float* x, int64_t xs, const void* w, int64_t ws, int64_t K, float* sums) {
  tile<WT, MR, NR>(x, xs, static_cast<const WT*>(w), ws, K, sums);
}

template <typename WT, int MR, int... NRs>
constexpr std::array<TileFn, kMaxNr> row(std::integer_sequence<int, NRs...>) {
  return {&tile_entry<WT, MR, NRs + 1>...};
}

template <typename WT>
struct Tables {
  static constexpr std::array<TileFn, kMaxNr> rows[kMaxMr] = {row<WT, 1>(std::make_integer_sequence<int, kMaxNr>{}),
                                                              row<WT, 2>(std::make_integer_sequence<int, kMaxNr>{})};
};

template <typename WT>
void run(const Problem& p, const Parallel& parallel) {
  const auto& table = Tables<WT>::rows;
  const float* x = static_cast<const float*>(p.x);
  const WT* w = static_cast<const WT*>(p.w);
  // 2 x 6 tiles: 24 accumulator registers + 4 for x + 2 for w, of aarch64's 32.
  const int64_t mr = p.M >= kMaxMr ? kMaxMr : p.M;
  const int64_t m_block = std::max<int64_t>(mr, (256 << 10) / std::max<int64_t>(1, p.K * 4));
  run_tiles(p, parallel, mr, kMaxNr, m_block, [&](int64_t m0, int64_t rows, int64_t n0, int64_t cols) {
    float sums[kMaxMr * kMaxNr];
    table[rows - 1][cols - 1](x + m0 * p.x_row_stride, p.x_row_stride, w + n0 * p.w_row_stride, p.w_row_stride,
                              p.K, sums);
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) store_output(p, m0 + i, n0 + j, sums[i * cols + j]);
    }
  });
}

}  // namespace

void linear_neon(const Problem& p, const Parallel& parallel) {
  // x always arrives as fp32 here: fp32 input as is, bf16/fp16 widened by the dispatcher.
  switch (p.dtype) {
    case DType::kFloat32: run<float>(p, parallel); break;
    case DType::kFloat16: run<fp16_t>(p, parallel); break;
    case DType::kBFloat16: run<bf16_t>(p, parallel); break;
  }
}

}  // namespace margingate::linear_impl
