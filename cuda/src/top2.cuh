// Internal to cuda/src: the exact top-2 of a row under torch.argmax's order, as a mergeable state.
// margin.cu reduces a row to it; sampling.cu reduces the greedy (temperature 0) candidates to it.
// Torch-free.
//
// The state holds the best and second-best numbers (value desc, index asc) and the two smallest
// indices holding NaN (torch.argmax: NaN outranks every number, the first NaN wins). Offering a
// value and merging two states are exact and the merge is commutative and associative, so any
// split of a row (threads, warps, blocks, segments) and any merge tree give the same bits.
#pragma once

#include <climits>
#include <cmath>

#include "device_utils.cuh"

namespace margingate::cuda::detail {

struct Top2 {
  float v1, v2;  // best and second-best number (not NaN)
  int i1, i2;    // their indices, -1 = none
  int n1, n2;    // the two smallest indices holding NaN, INT_MAX = none
};

__device__ __forceinline__ Top2 empty_top2() { return Top2{-INFINITY, -INFINITY, -1, -1, INT_MAX, INT_MAX}; }

// Does (v, i) rank above (w, j)? An empty slot (j < 0) ranks below everything.
__device__ __forceinline__ bool ranks_above(float v, int i, float w, int j) {
  if (i < 0) return false;
  if (j < 0) return true;
  return v > w || (v == w && i < j);
}

__device__ __forceinline__ void offer_number(Top2& t, float v, int i) {
  if (ranks_above(v, i, t.v1, t.i1)) {
    t.v2 = t.v1;
    t.i2 = t.i1;
    t.v1 = v;
    t.i1 = i;
  } else if (ranks_above(v, i, t.v2, t.i2)) {
    t.v2 = v;
    t.i2 = i;
  }
}

__device__ __forceinline__ void offer_nan(Top2& t, int i) {
  if (i < t.n1) {
    t.n2 = t.n1;
    t.n1 = i;
  } else if (i < t.n2) {
    t.n2 = i;
  }
}

__device__ __forceinline__ void offer(Top2& t, float v, int i) {
  if (isnan(v)) {
    offer_nan(t, i);
  } else {
    offer_number(t, v, i);
  }
}

// The top-2 of the union of the two rows' parts a and b.
__device__ __forceinline__ Top2 merge(Top2 a, const Top2& b) {
  offer_number(a, b.v1, b.i1);
  offer_number(a, b.v2, b.i2);
  offer_nan(a, b.n1);
  offer_nan(a, b.n2);
  return a;
}

// The state of the lane `o` away (xor), for a warp butterfly.
__device__ __forceinline__ Top2 shfl_xor(const Top2& t, int o) {
  return Top2{__shfl_xor_sync(kFullMask, t.v1, o), __shfl_xor_sync(kFullMask, t.v2, o),
              __shfl_xor_sync(kFullMask, t.i1, o), __shfl_xor_sync(kFullMask, t.i2, o),
              __shfl_xor_sync(kFullMask, t.n1, o), __shfl_xor_sync(kFullMask, t.n2, o)};
}

// Block-wide merge of a mergeable state S (with merge and shfl_xor, as Top2) over a block of 32
// full warps: a warp butterfly, then warp 0 over the warps' states. The result is valid in warp 0
// only; `warps` is shared memory for 32 states. Exact states make the tree shape irrelevant.
template <typename S>
__device__ __forceinline__ S merge_block_into_warp0(S v, S* warps) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = merge(v, shfl_xor(v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warps[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = warps[lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = merge(v, shfl_xor(v, o));
  }
  return v;
}

}  // namespace margingate::cuda::detail
