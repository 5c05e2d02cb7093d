// sample_margin on CUDA: one block per row, three passes over the row (four with top_k).
//
// Exactness: the same arithmetic as the CPU (cpp/src/sampling/sampling.cpp). The noise is
// noise::gumbel_from_bits, host/device code whose fp64 operations are __dadd_rn/__dmul_rn/
// __ddiv_rn (never contracted into FMAs) and whose logarithm is our own (sampling.h), so the noise
// bits equal the CPU's; scores are __fdiv_rn then __fadd_rn, as on the CPU. Every reduction is a
// selection under a total order (value, then index) or a min over exact values, commutative and
// associative, so the thread/warp split and the merge tree cannot change a bit. Pruning (an index
// whose noise bound cannot reach the thread's running second best is skipped) never changes an
// answer, as on the CPU; here the bound is the global one (no table: the GPU has the fp64 rate to
// compute the noise of the indices that pass it).
//
// Passes per row: (1) greedy top-2 with NaN tracking, which also gives x_max and settles T = 0 and
// NaN rows; (top_k only) a radix selection of the (k+1)-th largest order key, 8 rounds of 8 bits
// (a 256-bin shared histogram each, integer atomics: exact), plus one min-reduction for the k-th;
// (2) the noised top-2 over the candidates; (3, with truncation) cutoff_margin.
// Cost: one block per row, so B = 1 uses one SM: fine for decode batches, slow for a lone row of
// 262144 (about 10 reads of 0.5 MB from L2 by one SM); split rows over blocks if that ever matters.
#include <climits>
#include <cmath>

#include "device_utils.cuh"
#include "margingate/cuda/sampling.h"
#include "top2.cuh"

namespace margingate::cuda {
namespace {

using detail::kFullMask;

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
// Every noise value is at most -log(-log(1 - 2^-53)) = 36.7368...; a looser bound only prunes less.
constexpr float kNoiseBound = 36.75f;

// ---- greedy top-2 with the two smallest NaN indices: margingate::margin's state (top2.cuh) ----
using detail::empty_top2;
using detail::offer_nan;
using detail::offer_number;
using detail::ranks_above;
using detail::Top2;

// ---- noised top-2 (score desc, index asc) ----
struct Noised {
  float s1, s2;
  int i1, i2;  // -1 = none
};

__device__ __forceinline__ void offer(Noised& t, float s, int i) {
  if (ranks_above(s, i, t.s1, t.i1)) {
    t.s2 = t.s1;
    t.i2 = t.i1;
    t.s1 = s;
    t.i1 = i;
  } else if (ranks_above(s, i, t.s2, t.i2)) {
    t.s2 = s;
    t.i2 = i;
  }
}
// Within one thread indices only grow, so a score equal to the second best never displaces it.
__device__ __forceinline__ bool may_enter(const Noised& t, float bound) { return t.i2 < 0 || bound > t.s2; }

__device__ __forceinline__ Noised merge(Noised a, const Noised& b) {
  offer(a, b.s1, b.i1);
  offer(a, b.s2, b.i2);
  return a;
}

__device__ __forceinline__ Noised shfl_xor(const Noised& t, int o) {
  return Noised{__shfl_xor_sync(kFullMask, t.s1, o), __shfl_xor_sync(kFullMask, t.s2, o),
                __shfl_xor_sync(kFullMask, t.i1, o), __shfl_xor_sync(kFullMask, t.i2, o)};
}

struct MinKey {
  unsigned long long v;
};
__device__ __forceinline__ MinKey merge(MinKey a, const MinKey& b) { return MinKey{a.v < b.v ? a.v : b.v}; }
__device__ __forceinline__ MinKey shfl_xor(const MinKey& t, int o) { return MinKey{__shfl_xor_sync(kFullMask, t.v, o)}; }

struct MinFloat {
  float v;
};
__device__ __forceinline__ MinFloat merge(MinFloat a, const MinFloat& b) { return MinFloat{fminf(a.v, b.v)}; }
__device__ __forceinline__ MinFloat shfl_xor(const MinFloat& t, int o) {
  return MinFloat{__shfl_xor_sync(kFullMask, t.v, o)};
}

// Block-wide merge; every thread gets the result. `warps` and `result` are shared memory.
template <typename S>
__device__ __forceinline__ S block_merge(S v, S* warps, S* result) {
  static_assert(kWarps == 32, "merge_block_into_warp0 merges 32 warps");
  v = detail::merge_block_into_warp0(v, warps);
  if (threadIdx.x == 0) *result = v;
  __syncthreads();
  const S out = *result;
  __syncthreads();  // the shared slots may be reused by the next merge
  return out;
}

// ---- the truncation plan (cpp/src/sampling/sampling_impl.h's RowPlan, on the device) ----
__device__ __forceinline__ unsigned long long order_key(float x, int index) {
  const unsigned u = __float_as_uint(__fadd_rn(x, 0.0f));  // -0 -> +0
  const unsigned ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<unsigned long long>(ordered) << 32) | (0xFFFFFFFFu - static_cast<unsigned>(index));
}
__device__ __forceinline__ float key_value(unsigned long long key) {
  const unsigned ordered = static_cast<unsigned>(key >> 32);
  return __uint_as_float((ordered & 0x80000000u) ? (ordered & 0x7FFFFFFFu) : ~ordered);
}
__device__ __forceinline__ float gap(float p, float q) { return p == q ? 0.0f : __fsub_rn(p, q); }

struct Plan {
  float temperature;
  unsigned long long key;
  bool top_k;
  unsigned long long next_key;
  float kth_value, next_value;
  bool min_p;
  float max_value, log_bound;

  __device__ bool truncated() const { return top_k || min_p; }
  __device__ float diff_from_max(float x) const { return x == max_value ? 0.0f : __fsub_rn(x, max_value); }
  __device__ bool inside(float x, int i) const {
    if (top_k && order_key(x, i) <= next_key) return false;
    if (min_p && !(diff_from_max(x) >= log_bound)) return false;
    return true;
  }
  __device__ float distance_inside(float x) const {
    float d = INFINITY;
    if (top_k) d = gap(x, next_value);
    if (min_p) d = fminf(d, gap(diff_from_max(x), log_bound));
    return d;
  }
  __device__ float distance_outside(float x, int i) const {
    float d = 0.0f;
    if (top_k && order_key(x, i) <= next_key) d = gap(kth_value, x);
    if (min_p) {
      const float diff = diff_from_max(x);
      if (!(diff >= log_bound)) d = fmaxf(d, gap(log_bound, diff));
    }
    return d;
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sample_margin_kernel(const T* __restrict__ logits, int vocab, int64_t row_stride, int64_t col_stride,
                         const int64_t* __restrict__ seed, const int64_t* __restrict__ position,
                         const float* __restrict__ temperature, const int64_t* __restrict__ top_k,
                         const float* __restrict__ min_p, int64_t* __restrict__ token, int64_t* __restrict__ runner_up,
                         float* __restrict__ margin, float* __restrict__ cutoff_margin) {
  __shared__ Top2 greedy_warps[kWarps], greedy_result;
  __shared__ Noised noised_warps[kWarps], noised_result;
  __shared__ MinKey key_warps[kWarps], key_result;
  __shared__ MinFloat min_warps[kWarps], min_result;
  __shared__ unsigned histogram[256];
  __shared__ unsigned long long chosen_prefix, chosen_rank;

  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const T* base = logits + row * row_stride;
  auto at = [&](int c) { return detail::to_float(base[static_cast<int64_t>(c) * col_stride]); };

  // (1) greedy top-2, NaN and x_max.
  Top2 g = empty_top2();
  for (int c = tid; c < vocab; c += kThreads) {
    const float x = at(c);
    if (isnan(x)) {
      offer_nan(g, c);
    } else {
      offer_number(g, x, c);
    }
  }
  g = block_merge(g, greedy_warps, &greedy_result);
  const float t = temperature[row];
  if (t == 0.0f || g.n1 != INT_MAX) {
    if (tid == 0) {
      if (g.n1 != INT_MAX) {
        token[row] = g.n1;
        runner_up[row] = g.n2 != INT_MAX ? g.n2 : g.i1;
        margin[row] = NAN;
        cutoff_margin[row] = NAN;
      } else {
        token[row] = g.i1;
        runner_up[row] = g.i2;
        margin[row] = g.v1 == g.v2 ? 0.0f : __fsub_rn(g.v1, g.v2);
        cutoff_margin[row] = INFINITY;
      }
    }
    return;
  }

  Plan plan;
  plan.temperature = t;
  plan.key = noise::row_key(static_cast<uint64_t>(seed[row]), static_cast<uint64_t>(position[row]));
  plan.max_value = g.v1;
  plan.top_k = false;
  plan.min_p = false;
  plan.next_key = 0;
  plan.kth_value = plan.next_value = plan.log_bound = 0.0f;
  const int64_t k = top_k != nullptr ? top_k[row] : 0;
  if (k > 0 && k < vocab) {
    // The (k+1)-th largest order key, 8 bits at a time from the top.
    unsigned long long prefix = 0, mask = 0, rank = static_cast<unsigned long long>(k) + 1;
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += kThreads) histogram[i] = 0;
      __syncthreads();
      for (int c = tid; c < vocab; c += kThreads) {
        const unsigned long long key = order_key(at(c), c);
        if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        unsigned long long above = 0;
        for (int d = 255; d >= 0; --d) {
          if (above + histogram[d] >= rank) {
            chosen_rank = rank - above;
            chosen_prefix = prefix | (static_cast<unsigned long long>(d) << shift);
            break;
          }
          above += histogram[d];
        }
      }
      __syncthreads();
      rank = chosen_rank;
      prefix = chosen_prefix;
      mask |= 0xFFull << shift;
      __syncthreads();
    }
    // The k-th largest: the smallest key above the (k+1)-th.
    MinKey kth{~0ull};
    for (int c = tid; c < vocab; c += kThreads) {
      const unsigned long long key = order_key(at(c), c);
      if (key > prefix && key < kth.v) kth.v = key;
    }
    kth = block_merge(kth, key_warps, &key_result);
    plan.top_k = true;
    plan.next_key = prefix;
    plan.kth_value = key_value(kth.v);
    plan.next_value = key_value(prefix);
  }
  const float q = min_p != nullptr ? min_p[row] : 0.0f;
  if (q > 0.0f) {
    plan.min_p = true;
    plan.log_bound =
        __double2float_rn(noise::mul(static_cast<double>(t), noise::log_mg(static_cast<double>(q))));
  }
  const bool truncated = plan.truncated();

  // (2) the noised top-2 over the candidates.
  Noised top{-INFINITY, -INFINITY, -1, -1};
  for (int c = tid; c < vocab; c += kThreads) {
    const float x = at(c);
    if (truncated && !plan.inside(x, c)) continue;
    const float xs = __fdiv_rn(x, t);
    if (!may_enter(top, __fadd_rn(xs, kNoiseBound))) continue;
    offer(top, __fadd_rn(xs, noise::gumbel_from_bits(noise::bits(plan.key, static_cast<uint64_t>(c)))), c);
  }
  top = block_merge(top, noised_warps, &noised_result);
  if (tid == 0) {
    token[row] = top.i1;
    runner_up[row] = top.i2;
    margin[row] = top.i2 < 0 ? INFINITY : (top.s1 == top.s2 ? 0.0f : __fmul_rn(t, __fsub_rn(top.s1, top.s2)));
    if (!truncated) cutoff_margin[row] = INFINITY;
  }
  if (!truncated) return;

  // (3) cutoff_margin = min(D_token, min over outside i of max(D_i, E_i)).
  const float token_score = top.s1;
  auto excess = [&](float s) { return s >= token_score ? 0.0f : __fmul_rn(t, __fsub_rn(token_score, s)); };
  MinFloat best{plan.distance_inside(at(top.i1))};
  for (int c = tid; c < vocab; c += kThreads) {
    const float x = at(c);
    if (plan.inside(x, c)) continue;
    const float d = plan.distance_outside(x, c);
    if (!(d < best.v)) continue;
    const float xs = __fdiv_rn(x, t);
    if (!(fmaxf(d, excess(__fadd_rn(xs, kNoiseBound))) < best.v)) continue;
    const float s = __fadd_rn(xs, noise::gumbel_from_bits(noise::bits(plan.key, static_cast<uint64_t>(c))));
    best.v = fminf(best.v, fmaxf(d, excess(s)));
  }
  best = block_merge(best, min_warps, &min_result);
  if (tid == 0) cutoff_margin[row] = best.v;
}

}  // namespace

cudaError_t sample_margin(const SamplingArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.vocab < 2 || a.vocab > INT_MAX || a.rows > INT_MAX) return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaSuccess;
  detail::dispatch_dtype(a.dtype, [&]<typename T>() {
    sample_margin_kernel<T><<<static_cast<unsigned>(a.rows), kThreads, 0, stream>>>(
        static_cast<const T*>(a.logits), static_cast<int>(a.vocab), a.row_stride, a.col_stride, a.seed, a.position,
        a.temperature, a.top_k, a.min_p, a.token, a.runner_up, a.margin, a.cutoff_margin);
    return 0;
  });
  return cudaGetLastError();
}

}  // namespace margingate::cuda
