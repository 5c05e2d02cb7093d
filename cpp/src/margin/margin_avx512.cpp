// margin: AVX-512 segment scan. Compiled with -mavx512*; called only when the CPU has AVX-512.
//
// Each of 2 x 16 lanes keeps its own running (best, second) over the indices it sees, in
// increasing order, with strict > so the first index wins ties; the lanes are then merged with
// the exact (value desc, index asc) rule. The answer is the scalar path's answer, bit for bit.
#include <immintrin.h>

#include <algorithm>

#include "margin_impl.h"

namespace margingate::margin_impl {

namespace {

struct Lanes {
  __m512 v1 = _mm512_set1_ps(-INFINITY), v2 = _mm512_set1_ps(-INFINITY);
  __m512i i1 = _mm512_set1_epi32(-1), i2 = _mm512_set1_epi32(-1);

  inline void step(__m512 x, __m512i idx) {
    const __mmask16 gt1 = _mm512_cmp_ps_mask(x, v1, _CMP_GT_OQ);
    const __mmask16 gt2 = _mm512_cmp_ps_mask(x, v2, _CMP_GT_OQ);
    v2 = _mm512_mask_blend_ps(gt2, v2, x);
    i2 = _mm512_mask_blend_epi32(gt2, i2, idx);
    v2 = _mm512_mask_blend_ps(gt1, v2, v1);  // a new best demotes the old best
    i2 = _mm512_mask_blend_epi32(gt1, i2, i1);
    v1 = _mm512_mask_blend_ps(gt1, v1, x);
    i1 = _mm512_mask_blend_epi32(gt1, i1, idx);
  }

  void offer_to(Top2& t) const {
    alignas(64) float a[16], b[16];
    alignas(64) int32_t ia[16], ib[16];
    _mm512_store_ps(a, v1);
    _mm512_store_ps(b, v2);
    _mm512_store_si512(ia, i1);
    _mm512_store_si512(ib, i2);
    for (int l = 0; l < 16; ++l) {
      offer(t, a[l], ia[l]);
      offer(t, b[l], ib[l]);
    }
  }
};

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16_t* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 load16(const fp16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The tail, the lane merge and the -inf fix-up shared by both scans.
template <typename T>
Top2 finish(const Lanes& a, const Lanes& b, bool nan, const T* row, int64_t c, int64_t begin, int64_t end);

template <typename T>
Top2 scan(const T* row, int64_t begin, int64_t end) {
  Lanes a, b;
  __mmask16 nan = 0;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t c = begin;
  for (; c + 32 <= end; c += 32) {
    const __m512 xa = load16(row + c), xb = load16(row + c + 16);
    nan |= _mm512_cmp_ps_mask(xa, xa, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(xb, xb, _CMP_UNORD_Q);
    a.step(xa, _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(c)), iota));
    b.step(xb, _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(c + 16)), iota));
  }
  return finish(a, b, nan != 0, row, c, begin, end);
}

// bf16 widens to fp32 by placing its 16 bits on top of 16 zero bits. Interleaving with zeros
// inside each 128-bit lane (unpacklo/hi) does that for 32 values with two cheap in-lane ops; the
// values land in a permuted lane order, so each lane carries its own index offsets. Within a lane
// the indices still grow from one iteration to the next, which is all the first-index rule needs.
template <>
Top2 scan<bf16_t>(const bf16_t* row, int64_t begin, int64_t end) {
  Lanes a, b;
  __mmask16 nan = 0;
  const __m512i zero = _mm512_setzero_si512();
  const __m512i lo_offsets = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i hi_offsets = _mm512_add_epi32(lo_offsets, _mm512_set1_epi32(4));
  int64_t c = begin;
  for (; c + 32 <= end; c += 32) {
    const __m512i raw = _mm512_loadu_si512(row + c);
    const __m512 xa = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, raw));
    const __m512 xb = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, raw));
    nan |= _mm512_cmp_ps_mask(xa, xa, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(xb, xb, _CMP_UNORD_Q);
    const __m512i base = _mm512_set1_epi32(static_cast<int32_t>(c));
    a.step(xa, _mm512_add_epi32(base, lo_offsets));
    b.step(xb, _mm512_add_epi32(base, hi_offsets));
  }
  return finish(a, b, nan != 0, row, c, begin, end);
}

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
  // -inf may have been skipped, so redo the segment with the exact scalar rule. Rare: only rows
  // that are nearly all -inf. When v2 > -inf, every value >= v2 went through the lanes.
  if (!t.has_nan && (t.i1 < 0 || t.i2 < 0 || t.v2 == -INFINITY)) {
    Top2 exact;
    for (int64_t k = begin; k < end; ++k) offer(exact, to_float(row[k]), k);
    return exact;
  }
  return t;
}

// ---- blocked scan: a cheap max pass decides which blocks need the index-tracking scan ----
//
// A block can change the running (best, second) only if it holds a value > second (its indices
// all come after the ones already seen, so an equal value never displaces anything). Most
// blocks do not, and for them one vmaxps per vector is all the work; the few that do are
// rescanned from L1 with the exact lane scan above and merged with the exact rule. So the answer
// is the lane scan's answer, bit for bit, at close to the speed of reading the row.
constexpr int64_t kBlock = 2048;

inline __m512 max_pass(const float* p, int64_t n, __mmask16& nan) {
  __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 a = _mm512_loadu_ps(p + i), b = _mm512_loadu_ps(p + i + 16);
    nan |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);
    m0 = _mm512_max_ps(m0, a);
    m1 = _mm512_max_ps(m1, b);
  }
  for (; i + 16 <= n; i += 16) {
    const __m512 a = _mm512_loadu_ps(p + i);
    nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    m0 = _mm512_max_ps(m0, a);
  }
  return _mm512_max_ps(m0, m1);
}

inline __m512 max_pass(const bf16_t* p, int64_t n, __mmask16& nan) {
  const __m512i zero = _mm512_setzero_si512();
  __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
  for (int64_t i = 0; i + 32 <= n; i += 32) {
    const __m512i raw = _mm512_loadu_si512(p + i);
    const __m512 a = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, raw));
    const __m512 b = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, raw));
    nan |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);
    m0 = _mm512_max_ps(m0, a);
    m1 = _mm512_max_ps(m1, b);
  }
  return _mm512_max_ps(m0, m1);
}

inline __m512 max_pass(const fp16_t* p, int64_t n, __mmask16& nan) {
  __m512 m0 = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i + 16 <= n; i += 16) {
    const __m512 a = load16(p + i);
    nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    m0 = _mm512_max_ps(m0, a);
  }
  return m0;
}

template <typename T>
Top2 scan_blocked(const T* row, int64_t begin, int64_t end) {
  Top2 best;
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t e = std::min(end, b + kBlock);
    const int64_t full = (e - b) & ~int64_t{31};  // the max pass covers whole 32-element steps
    __mmask16 nan = 0;
    float block_max = _mm512_reduce_max_ps(max_pass(row + b, full, nan));
    for (int64_t c = b + full; c < e; ++c) {
      const float x = to_float(row[c]);
      if (x != x) nan = 1;
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

Top2 segment_avx512(DType dtype, const void* row, int64_t begin, int64_t end) {
  switch (dtype) {
    case DType::kFloat32: return scan_blocked(static_cast<const float*>(row), begin, end);
    case DType::kFloat16: return scan_blocked(static_cast<const fp16_t*>(row), begin, end);
    case DType::kBFloat16: return scan_blocked(static_cast<const bf16_t*>(row), begin, end);
  }
  return {};
}

}  // namespace margingate::margin_impl
