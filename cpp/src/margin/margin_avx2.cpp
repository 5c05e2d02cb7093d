// margin: AVX2 segment scan. Compiled with -mavx2 -mfma -mf16c; called only when the CPU has them.
//
// The AVX-512 scan (margin_avx512.cpp) on 8-lane vectors: a cheap max pass over 2K-element blocks
// decides which blocks can change the running top-2, and only those are rescanned with 2 x 8
// index-tracking lanes, merged with the exact (value desc, index asc) rule. The answer is the
// scalar path's answer, bit for bit.
#include <immintrin.h>

#include <algorithm>

#include "margin_impl.h"

namespace margingate::margin_impl {

namespace {

struct Lanes {
  __m256 v1 = _mm256_set1_ps(-INFINITY), v2 = _mm256_set1_ps(-INFINITY);
  __m256 i1 = _mm256_castsi256_ps(_mm256_set1_epi32(-1)), i2 = i1;  // int32 indices in float registers

  // Strict > keeps the earlier index on ties: a lane sees its indices in increasing order.
  inline void step(__m256 x, __m256i idx) {
    const __m256 index = _mm256_castsi256_ps(idx);
    const __m256 gt1 = _mm256_cmp_ps(x, v1, _CMP_GT_OQ);
    const __m256 gt2 = _mm256_cmp_ps(x, v2, _CMP_GT_OQ);
    v2 = _mm256_blendv_ps(v2, x, gt2);
    i2 = _mm256_blendv_ps(i2, index, gt2);
    v2 = _mm256_blendv_ps(v2, v1, gt1);  // a new best demotes the old best
    i2 = _mm256_blendv_ps(i2, i1, gt1);
    v1 = _mm256_blendv_ps(v1, x, gt1);
    i1 = _mm256_blendv_ps(i1, index, gt1);
  }

  void offer_to(Top2& t) const {
    alignas(32) float a[8], b[8];
    alignas(32) int32_t ia[8], ib[8];
    _mm256_store_ps(a, v1);
    _mm256_store_ps(b, v2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ia), _mm256_castps_si256(i1));
    _mm256_store_si256(reinterpret_cast<__m256i*>(ib), _mm256_castps_si256(i2));
    for (int l = 0; l < 8; ++l) {
      offer(t, a[l], ia[l]);
      offer(t, b[l], ib[l]);
    }
  }
};

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const fp16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

inline bool any_nan(__m256 unordered) { return _mm256_movemask_ps(unordered) != 0; }

// The tail, the lane merge and the -inf fix-up shared by the scans.
template <typename T>
Top2 finish(const Lanes& a, const Lanes& b, bool nan, const T* row, int64_t c, int64_t begin, int64_t end) {
  Top2 t;
  a.offer_to(t);
  b.offer_to(t);
  t.has_nan = nan;
  for (; c < end; ++c) {
    const float x = to_float(row[c]);
    if (x != x) {
      t.has_nan = true;
      continue;
    }
    offer(t, x, c);
  }
  // Lanes never take -inf (x > -inf is false): when the runner-up is -inf (or missing) an earlier
  // -inf may have been skipped, so redo the segment with the exact scalar rule (rows that are
  // nearly all -inf). When v2 > -inf, every value >= v2 went through the lanes.
  if (!t.has_nan && (t.i1 < 0 || t.i2 < 0 || t.v2 == -INFINITY)) {
    Top2 exact;
    for (int64_t k = begin; k < end; ++k) offer(exact, to_float(row[k]), k);
    return exact;
  }
  return t;
}

template <typename T>
Top2 scan(const T* row, int64_t begin, int64_t end) {
  Lanes a, b;
  __m256 nan = _mm256_setzero_ps();
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t c = begin;
  for (; c + 16 <= end; c += 16) {
    const __m256 xa = load8(row + c), xb = load8(row + c + 8);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(xa, xb, _CMP_UNORD_Q));
    a.step(xa, _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(c)), iota));
    b.step(xb, _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(c + 8)), iota));
  }
  return finish(a, b, any_nan(nan), row, c, begin, end);
}

// bf16 widens to fp32 by placing its 16 bits on top of 16 zero bits: unpacklo/hi with zeros
// inside each 128-bit lane do that for 16 values with two cheap in-lane ops. The values land in a
// permuted lane order (lo: 0-3, 8-11; hi: 4-7, 12-15), so each lane carries its own index offset;
// within a lane the indices still grow from one step to the next, all the first-index rule needs.
template <>
Top2 scan<bf16_t>(const bf16_t* row, int64_t begin, int64_t end) {
  Lanes a, b;
  __m256 nan = _mm256_setzero_ps();
  const __m256i zero = _mm256_setzero_si256();
  const __m256i lo_offsets = _mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11);
  const __m256i hi_offsets = _mm256_add_epi32(lo_offsets, _mm256_set1_epi32(4));
  int64_t c = begin;
  for (; c + 16 <= end; c += 16) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c));
    const __m256 xa = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
    const __m256 xb = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(xa, xb, _CMP_UNORD_Q));
    const __m256i base = _mm256_set1_epi32(static_cast<int32_t>(c));
    a.step(xa, _mm256_add_epi32(base, lo_offsets));
    b.step(xb, _mm256_add_epi32(base, hi_offsets));
  }
  return finish(a, b, any_nan(nan), row, c, begin, end);
}

// ---- blocked scan: a cheap max pass decides which blocks need the index-tracking scan ----
//
// A block can change the running (best, second) only if it holds a value > second (its indices
// all come after the ones already seen, so an equal value never displaces anything). Most blocks
// do not; for them one vmaxps per vector (plus a NaN check per pair) is all the work.
constexpr int64_t kBlock = 2048;
constexpr int64_t kStep = 32;  // elements per max-pass iteration

inline float reduce_max(__m256 m) {
  __m128 v = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  v = _mm_max_ps(v, _mm_movehl_ps(v, v));
  v = _mm_max_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}

// Four independent max chains hide vmaxps latency; the max of the block's values is exact, so
// how the chains split the values does not matter.
inline __m256 max_pass(const float* p, int64_t n, __m256& nan) {
  __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  for (int64_t i = 0; i + kStep <= n; i += kStep) {
    const __m256 a = _mm256_loadu_ps(p + i), b = _mm256_loadu_ps(p + i + 8);
    const __m256 c = _mm256_loadu_ps(p + i + 16), d = _mm256_loadu_ps(p + i + 24);
    nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q), _mm256_cmp_ps(c, d, _CMP_UNORD_Q)));
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
    m2 = _mm256_max_ps(m2, c);
    m3 = _mm256_max_ps(m3, d);
  }
  return _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
}

inline __m256 max_pass(const bf16_t* p, int64_t n, __m256& nan) {
  const __m256i zero = _mm256_setzero_si256();
  __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  for (int64_t i = 0; i + kStep <= n; i += kStep) {
    const __m256i r0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
    const __m256i r1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 16));
    const __m256 a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, r0));
    const __m256 b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, r0));
    const __m256 c = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, r1));
    const __m256 d = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, r1));
    nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q), _mm256_cmp_ps(c, d, _CMP_UNORD_Q)));
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
    m2 = _mm256_max_ps(m2, c);
    m3 = _mm256_max_ps(m3, d);
  }
  return _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
}

inline __m256 max_pass(const fp16_t* p, int64_t n, __m256& nan) {
  __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  for (int64_t i = 0; i + kStep <= n; i += kStep) {
    const __m256 a = load8(p + i), b = load8(p + i + 8), c = load8(p + i + 16), d = load8(p + i + 24);
    nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q), _mm256_cmp_ps(c, d, _CMP_UNORD_Q)));
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
    m2 = _mm256_max_ps(m2, c);
    m3 = _mm256_max_ps(m3, d);
  }
  return _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
}

template <typename T>
Top2 scan_blocked(const T* row, int64_t begin, int64_t end) {
  Top2 best;
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t e = std::min(end, b + kBlock);
    const int64_t full = (e - b) / kStep * kStep;  // the max pass covers whole steps
    __m256 nan_lanes = _mm256_setzero_ps();
    float block_max = reduce_max(max_pass(row + b, full, nan_lanes));
    bool nan = any_nan(nan_lanes);
    for (int64_t c = b + full; c < e; ++c) {
      const float x = to_float(row[c]);
      if (x != x) nan = true;
      block_max = x > block_max ? x : block_max;
    }
    if (nan) {  // the row is redone exactly by the NaN rule; nothing else matters
      best.has_nan = true;
      return best;
    }
    if (best.i2 < 0 || block_max > best.v2) best = merge(best, scan(row, b, e));
  }
  return best;
}

}  // namespace

Top2 segment_avx2(DType dtype, const void* row, int64_t begin, int64_t end) {
  switch (dtype) {
    case DType::kFloat32: return scan_blocked(static_cast<const float*>(row), begin, end);
    case DType::kFloat16: return scan_blocked(static_cast<const fp16_t*>(row), begin, end);
    case DType::kBFloat16: return scan_blocked(static_cast<const bf16_t*>(row), begin, end);
  }
  return {};
}

}  // namespace margingate::margin_impl
