// sample_margin: the scalar passes, the argument checks and the dispatcher (see sampling.h).
//
// Exactness argument. Every quantity is a fixed sequence of IEEE operations on one row's logits
// and its (seed, position), so a row's answer does not depend on the batch, the thread count or
// the SIMD level. The speed-ups never change an answer: the top-k selection is a selection under
// a total order (no rounding), and the noise bound only skips indices that provably cannot enter
// the noised top 2 (s_i <= fp32(x_i / T + bound) < running second best, by monotone rounding).
#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "margingate/margin.h"
#include "margingate/sampling.h"
#include "sampling_impl.h"

namespace margingate {
namespace sampling_impl {

namespace {

struct BoundTable {
  float bound[1 << kBoundBits];
  BoundTable() {
    for (int b = 0; b < (1 << kBoundBits); ++b) {
      // The largest hash of bucket b, and so the largest uniform and the largest noise in it.
      const uint64_t top = (static_cast<uint64_t>(b + 1) << (64 - kBoundBits)) - 1;
      const double g = -noise::log_mg(-noise::log_mg(noise::uniform(top)));
      // log_mg is accurate to < 1 ulp but not proven monotone: 1e-9 absolute slack (g <= 37, so
      // ~10^6 ulps) covers any wobble, then rounding up to fp32 keeps it an upper bound.
      const double slack = g + 1e-9;
      float f = static_cast<float>(slack);
      while (static_cast<double>(f) < slack) f = std::nextafter(f, INFINITY);
      bound[b] = f;
    }
  }
};

const BoundTable& table() {
  static const BoundTable t;
  return t;
}

template <typename T>
inline float load(const T* row, int64_t c, int64_t col_stride) {
  return to_float(row[c * col_stride]);
}

// Pass 1: NaN check, maximum and the top-k cut-off. Returns false for a row holding NaN.
template <typename T>
bool plan_row(const T* row, int64_t vocab, int64_t col_stride, int64_t k, float min_p, const SimdPasses* simd,
              DType dtype, RowPlan& plan) {
  float max_value = -INFINITY;
  const bool want_top_k = k > 0 && k < vocab;
  if (want_top_k && k + 1 <= 4096) {
    // A min-heap of the k + 1 largest keys: its minimum is the (k+1)-th, the next one the k-th.
    TopKHeap heap(static_cast<size_t>(k + 1));
    if (simd) {
      if (!simd->max_and_top_k(dtype, row, vocab, max_value, &heap)) return false;
    } else {
      for (int64_t c = 0; c < vocab; ++c) {
        const float x = load(row, c, col_stride);
        if (std::isnan(x)) return false;
        max_value = x > max_value ? x : max_value;
        heap.offer(x, c);
      }
    }
    std::pop_heap(heap.keys.begin(), heap.keys.end(), std::greater<uint64_t>());
    plan.next_key = heap.keys.back();
    heap.keys.pop_back();
    plan.kth_key = heap.keys.front();
  } else if (want_top_k) {
    // Large k: a selection over a copy of the row's keys, O(V).
    std::vector<uint64_t> keys(static_cast<size_t>(vocab));
    for (int64_t c = 0; c < vocab; ++c) {
      const float x = load(row, c, col_stride);
      if (std::isnan(x)) return false;
      max_value = x > max_value ? x : max_value;
      keys[static_cast<size_t>(c)] = order_key(x, c);
    }
    std::nth_element(keys.begin(), keys.begin() + k, keys.end(), std::greater<uint64_t>());
    plan.next_key = keys[static_cast<size_t>(k)];
    plan.kth_key = *std::min_element(keys.begin(), keys.begin() + k);
  } else if (simd) {
    if (!simd->max_and_top_k(dtype, row, vocab, max_value, nullptr)) return false;
  } else {
    for (int64_t c = 0; c < vocab; ++c) {
      const float x = load(row, c, col_stride);
      if (std::isnan(x)) return false;
      max_value = x > max_value ? x : max_value;
    }
  }
  plan.max_value = max_value;
  if (want_top_k) {
    plan.top_k = true;
    plan.kth_value = key_value(plan.kth_key);
    plan.next_value = key_value(plan.next_key);
  }
  if (min_p > 0.0f) {
    plan.min_p = true;
    plan.log_bound =
        static_cast<float>(noise::mul(static_cast<double>(plan.temperature), noise::log_mg(static_cast<double>(min_p))));
  }
  return true;
}

// Pass 2 (scalar): the noised top 2 over the candidates.
template <typename T>
void noised_top2_scalar(const T* row, int64_t vocab, int64_t col_stride, const RowPlan& plan, NoisedTop2& top) {
  const float* bound = table().bound;
  const float bound_max = bound[(1 << kBoundBits) - 1];
  const bool truncated = plan.truncated();
  for (int64_t c = 0; c < vocab; ++c) {
    const float x = load(row, c, col_stride);
    if (truncated && !plan.inside(x, c)) continue;
    const float xs = x / plan.temperature;
    if (!top.may_enter(xs + bound_max)) continue;
    noised_step(plan, bound, xs, c, top);
  }
}

// Pass 3 (scalar): cutoff_margin = min(D_token, min over outside i of max(D_i, E_i)) (sampling.h).
template <typename T>
float cutoff_margin_scalar(const T* row, int64_t vocab, int64_t col_stride, const RowPlan& plan, float token_score,
                           float best) {
  const float* bound = table().bound;
  for (int64_t c = 0; c < vocab && best > 0.0f; ++c) {
    const float x = load(row, c, col_stride);
    if (plan.inside(x, c)) continue;
    cutoff_step(plan, bound, x, c, token_score, best);
  }
  return best;
}

template <typename T>
void sample_row(const SamplingArgs& a, int64_t r, const SimdPasses* simd) {
  const T* row = static_cast<const T*>(a.logits) + r * a.row_stride;
  const float temperature = a.temperature[r];
  auto greedy = [&]() {
    // margingate::margin's exact answer for this row (its NaN rule included: margin NaN).
    const Status s = margin(a.dtype, row, 1, a.vocab, 0, a.col_stride, &a.token[r], &a.runner_up[r], &a.margin[r],
                            serial());
    (void)s;  // the arguments were validated by sample_margin
    a.cutoff_margin[r] = std::isnan(a.margin[r]) ? NAN : INFINITY;
  };
  if (temperature == 0.0f) {
    greedy();
    return;
  }
  RowPlan plan;
  plan.temperature = temperature;
  plan.key = noise::row_key(static_cast<uint64_t>(a.seed[r]), static_cast<uint64_t>(a.position[r]));
  if (!plan_row(row, a.vocab, a.col_stride, a.top_k ? a.top_k[r] : 0, a.min_p ? a.min_p[r] : 0.0f, simd, a.dtype,
                plan)) {
    greedy();
    return;
  }
  NoisedTop2 top;
  if (simd) {
    simd->noised_top2(a.dtype, row, a.vocab, plan, top);
  } else {
    noised_top2_scalar(row, a.vocab, a.col_stride, plan, top);
  }
  a.token[r] = top.i1;
  a.runner_up[r] = top.i2;
  a.margin[r] = top.i2 < 0 ? INFINITY : (top.s1 == top.s2 ? 0.0f : temperature * (top.s1 - top.s2));
  if (!plan.truncated()) {
    a.cutoff_margin[r] = INFINITY;
    return;
  }
  const float best = plan.distance_inside(load(row, top.i1, a.col_stride));
  a.cutoff_margin[r] = simd ? simd->cutoff_margin(a.dtype, row, a.vocab, plan, top.s1, best)
                            : cutoff_margin_scalar(row, a.vocab, a.col_stride, plan, top.s1, best);
}

}  // namespace

const float* gumbel_bound_table() { return table().bound; }
float gumbel_bound_max() { return table().bound[(1 << kBoundBits) - 1]; }

}  // namespace sampling_impl

Status sample_margin_validate(const SamplingArgs& a) {
  if (a.rows < 0) return Status::error("margingate.sample_margin: negative number of rows");
  if (a.vocab < 2) return Status::error("margingate.sample_margin: logits must have at least 2 columns");
  if (a.vocab > INT32_MAX) return Status::error("margingate.sample_margin: at most 2^31 - 1 columns are supported");
  for (int64_t r = 0; r < a.rows; ++r) {
    const float t = a.temperature[r];
    if (!(std::isfinite(t) && t >= 0.0f)) {
      return Status::error("margingate.sample_margin: temperature must be finite and >= 0 (0 = greedy), got " +
                           std::to_string(t) + " in row " + std::to_string(r));
    }
    if (a.top_k != nullptr && a.top_k[r] < 0) {
      return Status::error("margingate.sample_margin: top_k must be >= 0 (0 = no top-k), got " +
                           std::to_string(a.top_k[r]) + " in row " + std::to_string(r));
    }
    if (a.min_p != nullptr && !(a.min_p[r] >= 0.0f && a.min_p[r] <= 1.0f)) {
      return Status::error("margingate.sample_margin: min_p must be in [0, 1] (0 = no min-p), got " +
                           std::to_string(a.min_p[r]) + " in row " + std::to_string(r));
    }
  }
  return Status::success();
}

Status sample_margin(const SamplingArgs& a, const Parallel& parallel) {
  using namespace sampling_impl;
  Status status = sample_margin_validate(a);
  if (!status.ok() || a.rows == 0) return status;
  (void)table();  // build the bound table once, before the threads race for it
  // The SIMD passes want a contiguous row; any other stride, and aarch64 (no NEON passes yet),
  // take the scalar passes (same answer). The AVX2 passes serve AVX-512 machines too.
  const SimdPasses* simd = nullptr;
#if MARGINGATE_ARCH_X86
  static constexpr SimdPasses kAvx2{&max_and_top_k_avx2, &noised_top2_avx2, &cutoff_margin_avx2};
  if (a.col_stride == 1 && simd_level() >= SimdLevel::kAvx2) simd = &kAvx2;
#endif
  parallel.for_range(a.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      switch (a.dtype) {
        case DType::kFloat32: sample_row<float>(a, r, simd); break;
        case DType::kFloat16: sample_row<fp16_t>(a, r, simd); break;
        case DType::kBFloat16: sample_row<bf16_t>(a, r, simd); break;
      }
    }
  });
  return Status::success();
}

}  // namespace margingate
