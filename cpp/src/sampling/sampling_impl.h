// Internal to the sampling kernels: the per-row plan (truncation decided from the logits), the
// noise bound table and the running noised top-2, shared by the scalar and AVX-512 scans.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "margingate/sampling.h"

namespace margingate::sampling_impl {

// Upper bounds of the fp32 noise by the top 12 bits of its hash: gumbel_from_bits(b) <=
// gumbel_bound_table()[b >> 52] for every b (the noise is increasing in the hash; the table adds
// slack for the last-bit wobble of log_mg). Lets a scan skip the two logarithms of every index
// whose bound cannot reach the running second best: the answer is unchanged, only cheaper.
constexpr int kBoundBits = 12;
const float* gumbel_bound_table();
// The largest value of the table (bucket 4095): a bound for every index.
float gumbel_bound_max();

// A total order on (value, index) as one integer: a larger key is a larger value, or the same
// value at a lower index. -0 and +0 are one value (they compare equal as floats). No NaN here.
inline uint64_t order_key(float x, int64_t index) {
  const float canonical = x + 0.0f;  // -0 -> +0
  uint32_t u;
  std::memcpy(&u, &canonical, 4);
  const uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(ordered) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(index));
}
inline float key_value(uint64_t key) {
  const uint32_t ordered = static_cast<uint32_t>(key >> 32);
  const uint32_t u = (ordered & 0x80000000u) ? (ordered & 0x7FFFFFFFu) : ~ordered;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// p - q for p >= q, exactly 0 when equal (equal infinities are no gap, never inf - inf = NaN).
inline float gap(float p, float q) { return p == q ? 0.0f : p - q; }

// How a row is truncated, decided from its logits alone (pass 1).
struct RowPlan {
  float temperature = 1.0f;
  uint64_t key = 0;            // noise::row_key(seed, position)
  bool top_k = false;          // a top-k cut-off exists (0 < k < V)
  uint64_t kth_key = 0;        // order key of the k-th largest (the last candidate)
  uint64_t next_key = 0;       // order key of the (k+1)-th largest (the first one out)
  float kth_value = 0, next_value = 0;
  bool min_p = false;          // a min-p cut-off exists (q > 0)
  float max_value = 0;         // x_max
  float log_bound = 0;         // L = fp32(T * log_mg(q))

  bool truncated() const { return top_k || min_p; }
  float diff_from_max(float x) const { return x == max_value ? 0.0f : x - max_value; }
  bool inside(float x, int64_t i) const {
    if (top_k && order_key(x, i) <= next_key) return false;
    if (min_p && !(diff_from_max(x) >= log_bound)) return false;
    return true;
  }
  // Membership distance D_i (sampling.h) of an index inside / outside the candidates.
  float distance_inside(float x) const {
    float d = INFINITY;
    if (top_k) d = gap(x, next_value);
    if (min_p) d = std::fmin(d, gap(diff_from_max(x), log_bound));
    return d;
  }
  float distance_outside(float x, int64_t i) const {
    float d = 0.0f;
    if (top_k && order_key(x, i) <= next_key) d = gap(kth_value, x);
    if (min_p) {
      const float diff = diff_from_max(x);
      if (!(diff >= log_bound)) d = std::fmax(d, gap(log_bound, diff));
    }
    return d;
  }
};

// Running best and second best noised score of a row, ordered by (score desc, index asc).
struct NoisedTop2 {
  float s1 = -INFINITY, s2 = -INFINITY;
  int64_t i1 = -1, i2 = -1;

  static bool ranks_above(float v, int64_t i, float w, int64_t j) {
    if (j < 0) return true;
    return v > w || (v == w && i < j);
  }
  // Whether an index with score at most `bound` could still enter the top 2. Indices arrive in
  // increasing order, so an equal score never displaces the second best.
  bool may_enter(float bound) const { return i2 < 0 || bound > s2; }
  void offer(float s, int64_t i) {
    if (ranks_above(s, i, s1, i1)) {
      s2 = s1;
      i2 = i1;
      s1 = s;
      i1 = i;
    } else if (ranks_above(s, i, s2, i2)) {
      s2 = s;
      i2 = i;
    }
  }
};

// The k + 1 largest order keys seen so far (a min-heap), for pass 1 with a small k.
struct TopKHeap {
  size_t capacity = 0;
  std::vector<uint64_t> keys;
  float floor = -INFINITY;  // value of the minimum once full: only a strictly larger value enters

  explicit TopKHeap(size_t k_plus_1) : capacity(k_plus_1) { keys.reserve(k_plus_1); }
  bool full() const { return keys.size() == capacity; }
  // Offers index c (increasing from call to call, so later indices lose ties).
  void offer(float x, int64_t c) {
    if (!full()) {
      keys.push_back(order_key(x, c));
      std::push_heap(keys.begin(), keys.end(), std::greater<uint64_t>());
    } else if (x > floor) {
      std::pop_heap(keys.begin(), keys.end(), std::greater<uint64_t>());
      keys.back() = order_key(x, c);
      std::push_heap(keys.begin(), keys.end(), std::greater<uint64_t>());
    } else {
      return;
    }
    if (full()) floor = key_value(keys.front());
  }
};

// One index of pass 2: xs = fp32(x / T) of a candidate.
inline void noised_step(const RowPlan& plan, const float* bound, float xs, int64_t c, NoisedTop2& top) {
  const uint64_t h = noise::bits(plan.key, static_cast<uint64_t>(c));
  if (!top.may_enter(xs + bound[h >> (64 - kBoundBits)])) return;
  top.offer(xs + noise::gumbel_from_bits(h), c);
}

// One outside index of pass 3: best = min(best, max(D_i, E_i)), the noise bounded before it is
// computed. E for a score s (or a bound of it) is T * (s_token - s), 0 when s >= s_token; a bound
// of s gives a lower bound of E (monotone rounding), so the skip is exact.
inline void cutoff_step(const RowPlan& plan, const float* bound, float x, int64_t c, float token_score, float& best) {
  const float d = plan.distance_outside(x, c);
  if (!(d < best)) return;
  const float t = plan.temperature;
  auto excess = [&](float s) { return s >= token_score ? 0.0f : t * (token_score - s); };
  const float xs = x / t;
  const uint64_t h = noise::bits(plan.key, static_cast<uint64_t>(c));
  if (!(std::fmax(d, excess(xs + bound[h >> (64 - kBoundBits)])) < best)) return;
  best = std::fmin(best, std::fmax(d, excess(xs + noise::gumbel_from_bits(h))));
}

// SIMD versions of the passes over a contiguous row, bit for bit the scalar passes' results.
// Pass 1: false for a row holding NaN; else the maximum, and every index that can enter `heap`
// (if any) offered to it in increasing order.
struct SimdPasses {
  bool (*max_and_top_k)(DType dtype, const void* row, int64_t vocab, float& max_value, TopKHeap* heap);
  void (*noised_top2)(DType dtype, const void* row, int64_t vocab, const RowPlan& plan, NoisedTop2& top);
  float (*cutoff_margin)(DType dtype, const void* row, int64_t vocab, const RowPlan& plan, float token_score,
                         float best);
};

#if MARGINGATE_ARCH_X86
// sampling_avx2.cpp (x86-64 builds only).
bool max_and_top_k_avx2(DType dtype, const void* row, int64_t vocab, float& max_value, TopKHeap* heap);
void noised_top2_avx2(DType dtype, const void* row, int64_t vocab, const RowPlan& plan, NoisedTop2& top);
float cutoff_margin_avx2(DType dtype, const void* row, int64_t vocab, const RowPlan& plan, float token_score,
                         float best);
#endif

}  // namespace margingate::sampling_impl
