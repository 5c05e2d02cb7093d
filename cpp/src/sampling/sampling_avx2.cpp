// sample_margin: the AVX2 pass 2 (the noised top 2 over the candidates of a contiguous row).
// Compiled with -mavx2 -mfma -mf16c; called when the CPU has AVX2 (AVX-512 machines included: this
// pass is bound by the hash, and 4 x 64-bit lanes with an emulated multiply are enough to hide it
// behind the division and the loads).
//
// The vector part only decides which indices can be skipped: candidate test, x / T (vdivps is the
// IEEE division, the scalar path's bits), the hash of 8 indices and the bound of their noise (a
// gather from the 4096-entry table). The few indices that may enter the top 2 go through the
// scalar code in increasing index order, so the result is the scalar pass's, bit for bit.
#include <immintrin.h>

#include "sampling_impl.h"

namespace margingate::sampling_impl {

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline __m256 load8(const fp16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// The low 64 bits of a * b per 64-bit lane (AVX2 has no vpmullq): lo*lo + ((lo*hi + hi*lo) << 32).
inline __m256i mul64(__m256i a, __m256i b, __m256i b_hi) {
  const __m256i lo = _mm256_mul_epu32(a, b);
  const __m256i cross = _mm256_add_epi64(_mm256_mul_epu32(a, b_hi), _mm256_mul_epu32(_mm256_srli_epi64(a, 32), b));
  return _mm256_add_epi64(lo, _mm256_slli_epi64(cross, 32));
}

struct Hasher {
  __m256i key, golden, golden_hi, m1, m1_hi, m2, m2_hi;
  explicit Hasher(uint64_t row_key)
      : key(_mm256_set1_epi64x(static_cast<long long>(row_key))),
        golden(_mm256_set1_epi64x(static_cast<long long>(noise::kGolden))),
        golden_hi(_mm256_srli_epi64(golden, 32)),
        m1(_mm256_set1_epi64x(static_cast<long long>(0xBF58476D1CE4E5B9ull))),
        m1_hi(_mm256_srli_epi64(m1, 32)),
        m2(_mm256_set1_epi64x(static_cast<long long>(0x94D049BB133111EBull))),
        m2_hi(_mm256_srli_epi64(m2, 32)) {}

  // noise::bits(key, c .. c + 3) >> 52, as 64-bit lanes.
  __m256i buckets4(int64_t c) const {
    const __m256i idx = _mm256_add_epi64(_mm256_set1_epi64x(c + 1), _mm256_setr_epi64x(0, 1, 2, 3));
    __m256i z = _mm256_add_epi64(key, mul64(idx, golden, golden_hi));
    z = mul64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 30)), m1, m1_hi);
    z = mul64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 27)), m2, m2_hi);
    z = _mm256_xor_si256(z, _mm256_srli_epi64(z, 31));
    return _mm256_srli_epi64(z, 64 - kBoundBits);
  }
  // Buckets of indices c .. c + 7 as 8 int32.
  __m256i buckets8(int64_t c) const {
    const __m256i pick = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m128i a = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(buckets4(c), pick));
    const __m128i b = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(buckets4(c + 4), pick));
    return _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
  }
};

template <typename T>
void scan(const T* row, int64_t vocab, const RowPlan& plan, NoisedTop2& top) {
  const float* bound = gumbel_bound_table();
  const float t = plan.temperature;
  const Hasher hasher(plan.key);
  const __m256 vt = _mm256_set1_ps(t);
  const __m256 vbound_max = _mm256_set1_ps(gumbel_bound_max());
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 next_value = _mm256_set1_ps(plan.next_value);
  const __m256i next_index = _mm256_set1_epi32(static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(plan.next_key)));
  const __m256 max_value = _mm256_set1_ps(plan.max_value);
  const __m256 log_bound = _mm256_set1_ps(plan.log_bound);
  alignas(32) float xs_lanes[8];
  int64_t c = 0;
  for (; c + 8 <= vocab; c += 8) {
    const __m256 x = load8(row + c);
    int m = 0xFF;
    if (plan.top_k) {  // order_key(x, i) > next_key
      const __m256i i = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(c)), iota);
      const __m256 tie_before = _mm256_and_ps(_mm256_cmp_ps(x, next_value, _CMP_EQ_OQ),
                                              _mm256_castsi256_ps(_mm256_cmpgt_epi32(next_index, i)));
      m = _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(x, next_value, _CMP_GT_OQ), tie_before));
    }
    if (plan.min_p) {  // diff_from_max(x) >= L
      const __m256 at_max = _mm256_cmp_ps(x, max_value, _CMP_EQ_OQ);
      const __m256 diff = _mm256_blendv_ps(_mm256_sub_ps(x, max_value), _mm256_setzero_ps(), at_max);
      m &= _mm256_movemask_ps(_mm256_cmp_ps(diff, log_bound, _CMP_GE_OQ));
    }
    if (m == 0) continue;
    const __m256 xs = _mm256_div_ps(x, vt);
    if (top.i2 >= 0) {
      const __m256 s2 = _mm256_set1_ps(top.s2);
      m &= _mm256_movemask_ps(_mm256_cmp_ps(_mm256_add_ps(xs, vbound_max), s2, _CMP_GT_OQ));
      if (m == 0) continue;
      const __m256 g_bound = _mm256_i32gather_ps(bound, hasher.buckets8(c), 4);
      m &= _mm256_movemask_ps(_mm256_cmp_ps(_mm256_add_ps(xs, g_bound), s2, _CMP_GT_OQ));
      if (m == 0) continue;
    }
    _mm256_store_ps(xs_lanes, xs);
    for (uint32_t bits = static_cast<uint32_t>(m); bits != 0; bits &= bits - 1) {
      const int j = __builtin_ctz(bits);
      const int64_t i = c + j;
      const uint64_t h = noise::bits(plan.key, static_cast<uint64_t>(i));
      if (!top.may_enter(xs_lanes[j] + bound[h >> (64 - kBoundBits)])) continue;
      top.offer(xs_lanes[j] + noise::gumbel_from_bits(h), i);
    }
  }
  for (; c < vocab; ++c) {
    const float x = to_float(row[c]);
    if (plan.truncated() && !plan.inside(x, c)) continue;
    const float xs = x / t;
    const uint64_t h = noise::bits(plan.key, static_cast<uint64_t>(c));
    if (!top.may_enter(xs + bound[h >> (64 - kBoundBits)])) continue;
    top.offer(xs + noise::gumbel_from_bits(h), c);
  }
}

}  // namespace

void noised_top2_avx2(DType dtype, const void* row, int64_t vocab, const RowPlan& plan, NoisedTop2& top) {
  switch (dtype) {
    case DType::kFloat32: scan(static_cast<const float*>(row), vocab, plan, top); break;
    case DType::kFloat16: scan(static_cast<const fp16_t*>(row), vocab, plan, top); break;
    case DType::kBFloat16: scan(static_cast<const bf16_t*>(row), vocab, plan, top); break;
  }
}

}  // namespace margingate::sampling_impl
