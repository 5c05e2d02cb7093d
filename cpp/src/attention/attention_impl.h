// Internal to the attention kernels: the canonical arithmetic shared by every SIMD level, and the
// interface between the driver (attention.cpp: grouping, threads, conversions) and the per-level
// chunk kernels (attention.cpp scalar, attention_avx2.cpp, attention_avx512.cpp, attention_neon.cpp).
//
// The canonical arithmetic (each SIMD level performs exactly these IEEE fp32 operations, so the
// scalar, AVX2, AVX-512 and NEON paths agree bit for bit; see the invariance argument in attention.cpp):
//   score(q, t)  = (fma-chain over d = 0..D-1 of q[d] * k[t][d], starting at +0) * c2,
//                  c2 = float(scale * log2(e))           (softmax in base 2)
//   chunk c of a query: keys [lo + 64 c, min(lo + 64 c + 64, hi + 1)), lo = first visible key
//   m_c          = max of the chunk's scores
//   p_t          = exp2_nonpositive(score_t - m_c)
//   l_c          = lane tree of the 64 p's: lane i = ((p[i] + p[16+i]) + p[32+i]) + p[48+i] (missing
//                  keys are +0), then lanes (i, i+8), (i, i+4), (i, i+2), (0, 1) are added
//   a_c[d]       = fma-chain over the chunk's keys in order of p_t * v[t][d], starting at +0
//   combine      m' = max(m, m_c); alpha = exp2(m - m'); beta = exp2(m_c - m');
//                l = fma(l, alpha, l_c * beta); acc[d] = fma(acc[d], alpha, a_c[d] * beta)
//   output[d]    = acc[d] / l  (l == 0: no visible key, zeros)
// A NaN (from a NaN input, inf - inf, 0 * inf) travels through max, exp2_nonpositive, the sums and
// the combine into l and acc, and the division then puts it into the output: no step may test a
// NaN away (see margingate/attention.h for what is promised). NaN payloads are not part of this.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "margingate/attention.h"

namespace margingate::attention_impl {

// Keys per chunk: a constant of the contract. Changing it changes results in the last bits.
constexpr int64_t kChunk = 64;
constexpr int64_t kMaxHeadDim = 256;
// The queries of a group may start their chunks up to kMaxSpread keys apart (consecutive positions
// under a sliding window), so one step of a group covers at most kUnion keys.
constexpr int64_t kMaxSpread = 16;
constexpr int64_t kUnion = kChunk + kMaxSpread;
// Floats per row of the transposed key buffer: the union plus 16, so that its rows do not sit
// 4 KiB apart from the K rows being loaded (false store-to-load aliasing stalls the transposition).
constexpr int64_t kKtStride = kUnion + 16;

// log2(e): scores are kept in base 2 so each exponential is one exp2.
constexpr double kLog2e = 1.4426950408889634;

// Coefficients of 2^f = 1 + f * P(f) on [-0.5, 0.5] (Cephes exp2f, relative error ~2e-7).
constexpr float kExp2P0 = 1.535336188319500e-4f;
constexpr float kExp2P1 = 1.339887440266574e-3f;
constexpr float kExp2P2 = 9.618437357674640e-3f;
constexpr float kExp2P3 = 5.550332471162809e-2f;
constexpr float kExp2P4 = 2.402264791363012e-1f;
constexpr float kExp2P5 = 6.931472028550421e-1f;
// Below this the weight is < 2^-120 of the maximum's: flushed to exactly 0 (also keeps every
// intermediate a normal number, so denormal modes of the thread cannot matter).
constexpr float kExp2Min = -120.0f;

// The one exp of the kernels, for x <= 0. The AVX-512 version performs the same operations lane by
// lane (round to nearest even, subtract, Horner with fma, multiply by 2^n), so the two agree.
inline float exp2_nonpositive(float x) {
  if (x < kExp2Min) return 0.0f;  // also -inf
  const float n = std::nearbyint(x);
  const float f = x - n;
  float y = kExp2P0;
  y = std::fma(y, f, kExp2P1);
  y = std::fma(y, f, kExp2P2);
  y = std::fma(y, f, kExp2P3);
  y = std::fma(y, f, kExp2P4);
  y = std::fma(y, f, kExp2P5);
  y = std::fma(y, f, 1.0f);
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return y * two_n;
}

// Queries that share one kv head and one k/v row, processed together so that each loaded K/V
// tile serves all of them. Query i has fp32 vector qf[i * D ...] and sees keys [lo[i], hi[i]];
// its chunk c is keys [lo[i] + 64 c, min(lo[i] + 64 c + 64, hi[i] + 1)). The lo's of a group lie
// within kMaxSpread of each other, so chunk c of every query falls inside kUnion keys.
struct Group {
  const AttentionArgs* args = nullptr;
  int64_t kv_row = 0;  // row of k/v
  int64_t kv_head = 0;
  int nq = 0;
  const float* qf = nullptr;    // [nq][D]
  const int64_t* lo = nullptr;  // [nq] first visible key
  const int64_t* hi = nullptr;  // [nq] last visible key (inclusive)
  float c2 = 0.0f;              // scale * log2(e)

  int64_t chunk_start(int qi, int64_t c) const { return lo[qi] + c * kChunk; }
  // Does query qi have a chunk c?
  bool sees(int qi, int64_t c) const { return hi[qi] >= chunk_start(qi, c); }
};

// Per-thread scratch, sized for one group.
struct Scratch {
  float* kt = nullptr;    // [D][kKtStride] transposed, fp32 keys of the union
  float* p = nullptr;     // [nq][kUnion] scores, then weights, at their key's offset in the union
  int* active = nullptr;  // [nq] queries that have the chunk
  int* offset = nullptr;  // [nq] their chunk's first key, relative to the union's
  int* count = nullptr;   // [nq] their keys in the chunk
};

// Computes the partial (m_c, l_c, a_c[D]) of chunk c of every query of the group that has one
// (other queries' entries are left untouched).
using ChunkFn = void (*)(const Group& g, int64_t c, const Scratch& s, float* m_c, float* l_c, float* a_c);
// Folds a chunk partial into a query's running state (m, l, acc[D]).
using CombineFn = void (*)(int64_t D, float* m, float* l, float* acc, float m_c, float l_c, const float* a_c);

struct Kernels {
  ChunkFn chunk;
  CombineFn combine;
};

const Kernels& kernels_scalar();
#if MARGINGATE_ARCH_X86
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
#endif
#if MARGINGATE_ARCH_ARM64
const Kernels& kernels_neon();
#endif

// Element access with element strides, for the scalar path and the driver.
inline float load_element(DType dtype, const void* base, int64_t offset) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(base)[offset];
    case DType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(base)[offset]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[offset]);
  }
  return 0.0f;
}

}  // namespace margingate::attention_impl
