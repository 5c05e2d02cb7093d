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
// M >= 4 uses 4 x 6 tiles (the weight panel reused by every row tile), M = 1 uses 1 x 12, M = 2, 3
// use M x 6. Either way the weight streams from memory once per block of x rows.
#include <immintrin.h>

// GCC 12's avx512fintrin.h builds _mm512_setzero_ps & co. from a self-initialised variable and
// then warns about it (-Wuninitialized) once per template instance; the warning is about the
// header, not this file.
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <array>
#include <atomic>
#include <cstring>
#include <utility>
#include <vector>

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

// ---- the chunk step of each dtype: identical for every accumulator, whatever the tile ----

struct Bf16Op {  // x and w bf16; one vdpbf16ps per 32 elements
  using XT = uint16_t;
  using WT = uint16_t;
  using V = __m512bh;
  using Mask = __mmask32;
  static constexpr int kChunk = 32;
  static Mask tail(int64_t n) { return _cvtu32_mask32(static_cast<uint32_t>((uint64_t{1} << n) - 1)); }
  static V load_x(const XT* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static V load_x(const XT* p, Mask m) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }
  static V load_w(const WT* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static V load_w(const WT* p, Mask m) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }
  static __m512 step(__m512 acc, V x, V w) { return _mm512_dpbf16_ps(acc, x, w); }
};

struct F32Op {  // x and w fp32; one vfmadd per 16 elements
  using XT = float;
  using WT = float;
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int kChunk = 16;
  static Mask tail(int64_t n) { return _cvtu32_mask16(static_cast<uint32_t>((1u << n) - 1)); }
  static V load_x(const XT* p) { return _mm512_loadu_ps(p); }
  static V load_x(const XT* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static V load_w(const WT* p) { return _mm512_loadu_ps(p); }
  static V load_w(const WT* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static __m512 step(__m512 acc, V x, V w) { return _mm512_fmadd_ps(x, w, acc); }
};

struct F16Op : F32Op {  // x widened to fp32 by the dispatcher, w fp16 widened exactly here
  using WT = uint16_t;
  static V load_w(const WT* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static V load_w(const WT* p, Mask m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
};

// One MR x NR tile over all of K: accumulators start at +0, take the chunks in order, the last
// one zero-filled, and go through reduce16 into sums[i*NR + j]. Chunk c of x row i starts at
// x + i*xs + c*xc: xs = row stride and xc = chunk for rows read in place, or xs = chunk and
// xc = rows*chunk for an x block packed chunk-interleaved (same values, so same arithmetic).
template <class Op, int MR, int NR>
void tile(const void* xv, int64_t xs, int64_t xc, const void* wv, int64_t ws, int64_t K, float* sums) {
  const auto* x = static_cast<const typename Op::XT*>(xv);
  const auto* w = static_cast<const typename Op::WT*>(wv);
  __m512 acc[MR * NR];
#pragma GCC unroll 48
  for (int a = 0; a < MR * NR; ++a) acc[a] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + Op::kChunk <= K; k += Op::kChunk, x += xc) {
    typename Op::V xr[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) xr[i] = Op::load_x(x + i * xs);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      const typename Op::V wr = Op::load_w(w + j * ws + k);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) acc[i * NR + j] = Op::step(acc[i * NR + j], xr[i], wr);
    }
  }
  if (k < K) {  // the zero-filled last chunk of K
    const typename Op::Mask m = Op::tail(K - k);
    typename Op::V xr[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) xr[i] = Op::load_x(x + i * xs, m);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      const typename Op::V wr = Op::load_w(w + j * ws + k, m);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) acc[i * NR + j] = Op::step(acc[i * NR + j], xr[i], wr);
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < MR * NR; g += 16) {
    __m512 group[16];
#pragma GCC unroll 16
    for (int a = 0; a < 16; ++a) group[a] = g + a < MR * NR ? acc[g + a] : _mm512_setzero_ps();
    float s[16];
    reduce16(group, s);
    for (int a = 0; a < 16 && g + a < MR * NR; ++a) sums[g + a] = s[a];
  }
}

using TileFn = void (*)(const void* x, int64_t xs, int64_t xc, const void* w, int64_t ws, int64_t K, float* sums);
using Row = std::array<TileFn, kMaxNr>;

// Only the shapes run() can ask for are compiled: 1 x (1..12) and (2..4) x (1..6).
template <class Op, int MR, int NR>
constexpr TileFn entry() {
  if constexpr (MR == 1 || NR <= 6) {
    return &tile<Op, MR, NR>;
  } else {
    return nullptr;
  }
}
template <class Op, int MR, int... NRs>
constexpr Row make_row(std::integer_sequence<int, NRs...>) {
  return {entry<Op, MR, NRs + 1>()...};
}

// Every (rows, cols) up to (kMaxMr, kMaxNr): edge tiles run the same chunk sequence per element.
template <class Op>
struct Tables {
  static constexpr Row rows[kMaxMr] = {
      make_row<Op, 1>(std::make_integer_sequence<int, kMaxNr>{}), make_row<Op, 2>(std::make_integer_sequence<int, kMaxNr>{}),
      make_row<Op, 3>(std::make_integer_sequence<int, kMaxNr>{}), make_row<Op, 4>(std::make_integer_sequence<int, kMaxNr>{})};
};

// fp32 -> bf16 exactly as float_to_bf16 (common.h): round to nearest even, NaN quietened.
inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet));
}

// fp32 -> fp16 exactly as float_to_fp16: the hardware rounds to nearest even (subnormals and
// overflow to inf included); NaN becomes sign | 0x7e00 like the scalar helper.
inline __m256i to_fp16(__m512 v) {
  const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m256i sign = _mm256_and_si256(h, _mm256_set1_epi16(static_cast<short>(0x8000)));
  return _mm256_mask_blend_epi16(nan, h, _mm256_or_si256(sign, _mm256_set1_epi16(0x7e00)));
}

// Writes a finished tile: y = sum + bias[n] (one fp32 add), one rounding. Vectorised along a
// row when y's columns are contiguous, with the same results as store_output element by element.
void store_tile(const Problem& p, int64_t m0, int64_t rows, int64_t n0, int64_t cols, const float* sums) {
  if (p.y_col_stride != 1) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) store_output(p, m0 + i, n0 + j, sums[i * cols + j]);
    return;
  }
  const __mmask16 mask = _cvtu32_mask16(static_cast<uint32_t>((1u << cols) - 1));
  const __m512 bias = p.bias != nullptr ? _mm512_maskz_loadu_ps(mask, p.bias + n0) : _mm512_setzero_ps();
  for (int64_t i = 0; i < rows; ++i) {
    __m512 v = _mm512_maskz_loadu_ps(mask, sums + i * cols);
    if (p.bias != nullptr) v = _mm512_add_ps(v, bias);
    const int64_t offset = (m0 + i) * p.y_row_stride + n0;
    switch (p.dtype) {
      case DType::kFloat32: _mm512_mask_storeu_ps(static_cast<float*>(p.y) + offset, mask, v); break;
      case DType::kBFloat16: _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.y) + offset, mask, to_bf16(v)); break;
      case DType::kFloat16: _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.y) + offset, mask, to_fp16(v)); break;
    }
  }
}

// Copies rows [0, rows) of x (row stride rs, contiguous along K) chunk-interleaved: chunk c of
// row i at dst[(c*rows + i)*C], the last chunk zero-padded. Only bits move.
template <typename T, int C>
void pack_x(const T* src, int64_t rs, int64_t rows, int64_t K, T* dst) {
  const int64_t full = K / C;
  for (int64_t c = 0; c < full; ++c) {
    for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + (c * rows + i) * C, src + i * rs + c * C, C * sizeof(T));
  }
  if (full * C < K) {
    const int64_t rest = K - full * C;
    for (int64_t i = 0; i < rows; ++i) {
      T* d = dst + (full * rows + i) * C;
      std::memcpy(d, src + i * rs + full * C, static_cast<size_t>(rest) * sizeof(T));
      std::memset(static_cast<void*>(d + rest), 0, static_cast<size_t>(C - rest) * sizeof(T));
    }
  }
}

std::atomic<uint64_t> g_call{0};  // numbers linear calls (see `call` below)

template <class Op>
void run(const Problem& p, const Parallel& parallel) {
  using XT = typename Op::XT;
  constexpr int C = Op::kChunk;
  const auto& table = Tables<Op>::rows;
  const int64_t w_esize = sizeof(typename Op::WT);
  // Tile shape from M (free: see the header comment). M >= 4: 4 x 6 (24 accumulators, 10 loads
  // per 24 dot instructions). M = 1: 1 x 12 (12 weight streams in flight); M = 2, 3: M x 6
  // (3 x 12 would spill registers; measured 25-40 % slower).
  const int64_t mr = p.M >= kMaxMr ? kMaxMr : p.M;
  const int64_t nr = p.M == 1 ? kMaxNr : 6;
  // Rows per cache block: the x block (~512 KiB, at least 64 rows) stays in L2 while each weight
  // panel (nr rows) is read from memory once per block and reused from L1/L2 by every row tile.
  // Measured on Zen 5: blocking K as well (keeping the panel in L1) was slower than full-K tiles.
  const int64_t m_block = std::max<int64_t>(64, (512 << 10) / std::max<int64_t>(1, p.K * int64_t{sizeof(XT)}));
  const int64_t chunks = (p.K + C - 1) / C;
  // Long x rows are packed chunk-interleaved, one copy per x block reused by every weight panel:
  // the tile then reads x sequentially instead of 4 rows a power-of-two-ish stride apart, which
  // alias in L1 with each other and with the weight rows (measured on Zen 5, one core: bf16
  // M=512 K=4096 265 -> 335 GFLOP/s, K=2048 +7 %, fp32 K=1536 +12 %; rows < 4 KiB gain nothing).
  // Decode's single row tile reads x in place.
  const bool pack = p.M > kMaxMr && p.K * int64_t{sizeof(XT)} >= 4096;
  // Identifies this call, so a thread's packed block is never mistaken for another call's.
  const uint64_t call = g_call.fetch_add(1, std::memory_order_relaxed);
  const auto* x = static_cast<const XT*>(p.x);
  const char* w = static_cast<const char*>(p.w);
  run_blocks(p, parallel, mr, nr, m_block, [&](int64_t m_lo, int64_t m_hi, int64_t n0, int64_t cols) {
    float sums[kMaxMr * kMaxNr];
    const char* wp = w + n0 * p.w_row_stride * w_esize;
    if (!pack) {
      for (int64_t m0 = m_lo; m0 < m_hi; m0 += mr) {
        const int64_t rows = std::min(mr, m_hi - m0);
        table[rows - 1][cols - 1](x + m0 * p.x_row_stride, p.x_row_stride, C, wp, p.w_row_stride, p.K, sums);
        store_tile(p, m0, rows, n0, cols, sums);
      }
      return;
    }
    thread_local std::vector<XT> x_pack;
    thread_local uint64_t packed_call = ~uint64_t{0};
    thread_local int64_t packed_lo = -1;
    if (packed_call != call || packed_lo != m_lo) {
      x_pack.resize(static_cast<size_t>((m_hi - m_lo + mr) * chunks * C));
      for (int64_t m0 = m_lo; m0 < m_hi; m0 += mr) {
        pack_x<XT, C>(x + m0 * p.x_row_stride, p.x_row_stride, std::min(mr, m_hi - m0), p.K,
                      x_pack.data() + (m0 - m_lo) * chunks * C);
      }
      packed_call = call;
      packed_lo = m_lo;
    }
    for (int64_t m0 = m_lo; m0 < m_hi; m0 += mr) {
      const int64_t rows = std::min(mr, m_hi - m0);
      table[rows - 1][cols - 1](x_pack.data() + (m0 - m_lo) * chunks * C, C, rows * C, wp, p.w_row_stride, p.K, sums);
      store_tile(p, m0, rows, n0, cols, sums);
    }
  });
}

}  // namespace

void linear_avx512(const Problem& p, const Parallel& parallel) {
  switch (p.dtype) {
    case DType::kBFloat16: run<Bf16Op>(p, parallel); break;
    case DType::kFloat32: run<F32Op>(p, parallel); break;
    case DType::kFloat16: run<F16Op>(p, parallel); break;
  }
}

}  // namespace margingate::linear_impl
