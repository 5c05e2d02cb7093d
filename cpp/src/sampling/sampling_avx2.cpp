// sample_margin: the AVX2 passes over a contiguous row (maximum and top-k heap, noised top 2, cut-off margin).
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

// The candidate mask of 8 logits (RowPlan::inside, vectorised; exact comparisons only).
struct Candidates {
  __m256 next_value, max_value, log_bound;
  __m256i next_index;
  const RowPlan& plan;
  explicit Candidates(const RowPlan& p)
      : next_value(_mm256_set1_ps(p.next_value)),
        max_value(_mm256_set1_ps(p.max_value)),
        log_bound(_mm256_set1_ps(p.log_bound)),
        next_index(_mm256_set1_epi32(static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(p.next_key)))),
        plan(p) {}
  // Lanes inside the top-k (order_key(x, i) > next_key); all when there is no top-k.
  int top_k(__m256 x, int64_t c) const {
    if (!plan.top_k) return 0xFF;
    const __m256i i = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(c)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 tie_before = _mm256_and_ps(_mm256_cmp_ps(x, next_value, _CMP_EQ_OQ),
                                            _mm256_castsi256_ps(_mm256_cmpgt_epi32(next_index, i)));
    return _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(x, next_value, _CMP_GT_OQ), tie_before));
  }
  // diff_from_max(x) of 8 logits.
  __m256 diff(__m256 x) const {
    return _mm256_blendv_ps(_mm256_sub_ps(x, max_value), _mm256_setzero_ps(), _mm256_cmp_ps(x, max_value, _CMP_EQ_OQ));
  }
  // Lanes inside the min-p set (diff >= L); all when there is no min-p.
  int min_p(__m256 diff_x) const {
    if (!plan.min_p) return 0xFF;
    return _mm256_movemask_ps(_mm256_cmp_ps(diff_x, log_bound, _CMP_GE_OQ));
  }
};

// gap(p, q) of 8 pairs with p >= q: 0 when equal, p - q otherwise.
inline __m256 gap8(__m256 p, __m256 q) {
  return _mm256_blendv_ps(_mm256_sub_ps(p, q), _mm256_setzero_ps(), _mm256_cmp_ps(p, q, _CMP_EQ_OQ));
}
inline __m256 lanes(int m) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(m), bit), bit));
}

template <typename T>
bool max_top_k(const T* row, int64_t vocab, float& max_value, TopKHeap* heap) {
  float best = -INFINITY;
  int64_t c = 0;
  if (heap != nullptr) {  // fill the heap first: until then every index enters
    for (; c < vocab && !heap->full(); ++c) {
      const float x = to_float(row[c]);
      if (std::isnan(x)) return false;
      best = x > best ? x : best;
      heap->offer(x, c);
    }
  }
  alignas(32) float x_lanes[8];
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  for (; c + 8 <= vocab; c += 8) {
    const __m256 x = load8(row + c);
    if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)) != 0) return false;
    vmax = _mm256_max_ps(vmax, x);
    if (heap == nullptr) continue;
    const int m = _mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_set1_ps(heap->floor), _CMP_GT_OQ));
    if (m == 0) continue;
    _mm256_store_ps(x_lanes, x);
    for (uint32_t bits = static_cast<uint32_t>(m); bits != 0; bits &= bits - 1) {
      const int j = __builtin_ctz(bits);
      heap->offer(x_lanes[j], c + j);
    }
  }
  _mm256_store_ps(x_lanes, vmax);
  for (float v : x_lanes) best = v > best ? v : best;
  for (; c < vocab; ++c) {
    const float x = to_float(row[c]);
    if (std::isnan(x)) return false;
    best = x > best ? x : best;
    if (heap != nullptr) heap->offer(x, c);
  }
  max_value = best;
  return true;
}

template <typename T>
void noised_top2(const T* row, int64_t vocab, const RowPlan& plan, NoisedTop2& top) {
  const float* bound = gumbel_bound_table();
  const float t = plan.temperature;
  const Hasher hasher(plan.key);
  const Candidates candidates(plan);
  const __m256 vt = _mm256_set1_ps(t);
  const __m256 vbound_max = _mm256_set1_ps(gumbel_bound_max());
  alignas(32) float xs_lanes[8];
  int64_t c = 0;
  for (; c + 8 <= vocab; c += 8) {
    const __m256 x = load8(row + c);
    int m = candidates.top_k(x, c);
    if (plan.min_p) m &= candidates.min_p(candidates.diff(x));
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
      noised_step(plan, bound, xs_lanes[j], c + j, top);
    }
  }
  for (; c < vocab; ++c) {
    const float x = to_float(row[c]);
    if (plan.truncated() && !plan.inside(x, c)) continue;
    noised_step(plan, bound, x / t, c, top);
  }
}

// Pass 3: the vector part computes D_i of 8 indices (the scalar arithmetic: gap and max) and keeps
// the outside indices with D_i < best; cutoff_step redoes them exactly.
template <typename T>
float cutoff_margin(const T* row, int64_t vocab, const RowPlan& plan, float token_score, float best) {
  const float* bound = gumbel_bound_table();
  const Candidates candidates(plan);
  const __m256 kth_value = _mm256_set1_ps(plan.kth_value);
  alignas(32) float x_lanes[8];
  int64_t c = 0;
  for (; c + 8 <= vocab && best > 0.0f; c += 8) {
    const __m256 x = load8(row + c);
    const int in_k = candidates.top_k(x, c);
    const __m256 diff = candidates.diff(x);
    const int in_p = candidates.min_p(diff);
    const int outside = ~(in_k & in_p) & 0xFF;
    if (outside == 0) continue;
    __m256 d = _mm256_setzero_ps();
    if (plan.top_k) d = _mm256_blendv_ps(d, gap8(kth_value, x), lanes(~in_k & 0xFF));
    if (plan.min_p) d = _mm256_blendv_ps(d, _mm256_max_ps(d, gap8(candidates.log_bound, diff)), lanes(~in_p & 0xFF));
    const int m = outside & _mm256_movemask_ps(_mm256_cmp_ps(d, _mm256_set1_ps(best), _CMP_LT_OQ));
    if (m == 0) continue;
    _mm256_store_ps(x_lanes, x);
    for (uint32_t bits = static_cast<uint32_t>(m); bits != 0; bits &= bits - 1) {
      const int j = __builtin_ctz(bits);
      cutoff_step(plan, bound, x_lanes[j], c + j, token_score, best);
    }
  }
  for (; c < vocab && best > 0.0f; ++c) {
    const float x = to_float(row[c]);
    if (plan.inside(x, c)) continue;
    cutoff_step(plan, bound, x, c, token_score, best);
  }
  return best;
}

}  // namespace

#define MARGINGATE_DISPATCH(call)                                        \
  switch (dtype) {                                                       \
    case DType::kFloat32: { using T = float; call; }                     \
    case DType::kFloat16: { using T = fp16_t; call; }                    \
    case DType::kBFloat16: { using T = bf16_t; call; }                   \
  }

bool max_and_top_k_avx2(DType dtype, const void* row, int64_t vocab, float& max_value, TopKHeap* heap) {
  MARGINGATE_DISPATCH(return max_top_k(static_cast<const T*>(row), vocab, max_value, heap));
  return false;
}

void noised_top2_avx2(DType dtype, const void* row, int64_t vocab, const RowPlan& plan, NoisedTop2& top) {
  MARGINGATE_DISPATCH(return noised_top2(static_cast<const T*>(row), vocab, plan, top));
}

float cutoff_margin_avx2(DType dtype, const void* row, int64_t vocab, const RowPlan& plan, float token_score,
                         float best) {
  MARGINGATE_DISPATCH(return cutoff_margin(static_cast<const T*>(row), vocab, plan, token_score, best));
  return best;
}
#undef MARGINGATE_DISPATCH

}  // namespace margingate::sampling_impl
