// sample_margin: AVX-512 pass 2 (the noised top 2 over the candidates of a contiguous row).
// Compiled with -mavx512*; called only when the CPU has AVX-512.
//
// The vector part only decides which indices can be skipped: candidate test, x / T (vdivps is
// IEEE division, the scalar path's bits), the hash of 16 indices (vpmullq) and the bound of their
// noise (a gather from the 4096-entry table). The few indices that may enter the top 2 go through
// the scalar code in increasing index order, so the result is the scalar pass's, bit for bit.
#include <immintrin.h>

#include "sampling_impl.h"

namespace margingate::sampling_impl {

namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 load16(const fp16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

inline __m512i mix64(__m512i z) {
  z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), _mm512_set1_epi64(0xBF58476D1CE4E5B9ll));
  z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), _mm512_set1_epi64(0x94D049BB133111EBll));
  return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}

// Bucket (top 12 bits of the hash) of indices c .. c + 7 as 8 int32.
inline __m256i buckets8(__m512i key, int64_t c) {
  const __m512i idx = _mm512_add_epi64(_mm512_set1_epi64(c + 1), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  const __m512i state = _mm512_add_epi64(key, _mm512_mullo_epi64(idx, _mm512_set1_epi64(static_cast<long long>(noise::kGolden))));
  return _mm512_cvtepi64_epi32(_mm512_srli_epi64(mix64(state), 64 - kBoundBits));
}

template <typename T>
void scan(const T* row, int64_t vocab, const RowPlan& plan, NoisedTop2& top) {
  const float* bound = gumbel_bound_table();
  const float t = plan.temperature;
  const __m512 vt = _mm512_set1_ps(t);
  const __m512 vbound_max = _mm512_set1_ps(gumbel_bound_max());
  const __m512i vkey = _mm512_set1_epi64(static_cast<long long>(plan.key));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 next_value = _mm512_set1_ps(plan.next_value);
  const __m512i next_index = _mm512_set1_epi32(static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(plan.next_key)));
  const __m512 max_value = _mm512_set1_ps(plan.max_value);
  const __m512 log_bound = _mm512_set1_ps(plan.log_bound);
  alignas(64) float xs_lanes[16];
  int64_t c = 0;
  for (; c + 16 <= vocab; c += 16) {
    const __m512 x = load16(row + c);
    __mmask16 m = 0xFFFF;
    if (plan.top_k) {  // order_key(x, i) > next_key
      const __m512i i = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(c)), iota);
      m = _mm512_cmp_ps_mask(x, next_value, _CMP_GT_OQ) |
          (_mm512_cmp_ps_mask(x, next_value, _CMP_EQ_OQ) & _mm512_cmplt_epi32_mask(i, next_index));
    }
    if (plan.min_p) {  // diff_from_max(x) >= L
      const __mmask16 at_max = _mm512_cmp_ps_mask(x, max_value, _CMP_EQ_OQ);
      const __m512 diff = _mm512_mask_blend_ps(at_max, _mm512_sub_ps(x, max_value), _mm512_setzero_ps());
      m &= _mm512_cmp_ps_mask(diff, log_bound, _CMP_GE_OQ);
    }
    if (m == 0) continue;
    const __m512 xs = _mm512_div_ps(x, vt);
    if (top.i2 >= 0) {
      const __m512 s2 = _mm512_set1_ps(top.s2);
      m &= _mm512_cmp_ps_mask(_mm512_add_ps(xs, vbound_max), s2, _CMP_GT_OQ);
      if (m == 0) continue;
      const __m512i b = _mm512_inserti64x4(_mm512_castsi256_si512(buckets8(vkey, c)), buckets8(vkey, c + 8), 1);
      const __m512 g_bound = _mm512_i32gather_ps(b, bound, 4);
      m &= _mm512_cmp_ps_mask(_mm512_add_ps(xs, g_bound), s2, _CMP_GT_OQ);
      if (m == 0) continue;
    }
    _mm512_store_ps(xs_lanes, xs);
    for (uint32_t bits = m; bits != 0; bits &= bits - 1) {
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

void noised_top2_avx512(DType dtype, const void* row, int64_t vocab, const RowPlan& plan, NoisedTop2& top) {
  switch (dtype) {
    case DType::kFloat32: scan(static_cast<const float*>(row), vocab, plan, top); break;
    case DType::kFloat16: scan(static_cast<const fp16_t*>(row), vocab, plan, top); break;
    case DType::kBFloat16: scan(static_cast<const bf16_t*>(row), vocab, plan, top); break;
  }
}

}  // namespace margingate::sampling_impl
