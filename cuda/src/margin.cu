// margin on CUDA: top-1 / top-2 / gap of each row in one pass over the logits.
//
// Invariance argument. margin involves no rounding at all: values are widened exactly to fp32 and
// only compared; the one subtraction happens once, on the final two values. The state of a piece
// of a row is its top-2 under the total order (value descending, index ascending) plus its two
// smallest NaN indices, and merging two states is an exact selection that is commutative and
// associative. So any split of a row (threads, warps, blocks, segments) and any merge tree give
// the same answer bit for bit, and a row's answer never depends on the other rows.
//
// Speed: 16-byte vector loads (8 bf16/fp16 or 4 fp32 per load, 4 loads in flight per thread, 1024
// threads: 64 KiB in flight per block, enough for one SM to stream at well over its share of HBM
// bandwidth), warp shuffles then shared memory to merge. One block per row as long as the rows
// keep at least half of the SMs busy (B = 64 on 132 SMs: one kernel, no merge pass); with fewer
// rows a row is split into segments whose states go to a workspace and a tiny second kernel
// merges them.
#include <climits>
#include <cmath>

#include "device_utils.cuh"
#include "margingate/cuda/margin.h"
#include "margin_plan.h"
#include "top2.cuh"

namespace margingate::cuda {
namespace {

using detail::empty_top2;
using detail::merge;
using detail::offer;
using detail::Top2;

// Within one thread indices only grow, so a value equal to the current second best can never
// rank above it: skipping `v <= v2` is exact, and it is the common case.
__device__ __forceinline__ void offer_increasing(Top2& t, float v, int i) {
  if (!(v <= t.v2) || t.i2 < 0) offer(t, v, i);
}

__device__ __forceinline__ void write_result(const Top2& t, int64_t row, int64_t* top1, int64_t* top2,
                                             float* margin) {
  if (t.n1 != INT_MAX) {  // torch.argmax: NaN beats every number, the first NaN wins
    top1[row] = t.n1;
    top2[row] = t.n2 != INT_MAX ? t.n2 : t.i1;
    margin[row] = NAN;
  } else {
    top1[row] = t.i1;
    top2[row] = t.i2;
    margin[row] = t.v1 == t.v2 ? 0.0f : t.v1 - t.v2;  // equal infinities are a tie, not NaN
  }
}

constexpr int kThreads = 1024;
constexpr int kUnroll = 4;

// One block per (row, segment): block b is segment b % segments of row b / segments (columns
// from margin_segment). With one segment the block writes the result, otherwise its state goes to
// partial[b]. Columns are int64 (see margin_plan.h); a finished index (< vocab <= INT_MAX) is an int.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    margin_kernel(const T* __restrict__ logits, int64_t vocab, int64_t row_stride, int64_t col_stride,
                  detail::MarginPlan plan, int64_t* __restrict__ top1, int64_t* __restrict__ top2,
                  float* __restrict__ margin, Top2* __restrict__ partial) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t row = blockIdx.x / plan.segments;
  const detail::ColumnRange cols = detail::margin_segment(plan, vocab, blockIdx.x % plan.segments);
  const int64_t begin = cols.begin, end = cols.end;
  const T* base = logits + row * row_stride;
  Top2 t = empty_top2();

  if (col_stride == 1) {
    // Scalar head up to the first 16-byte boundary, vectors, scalar tail.
    const uintptr_t addr = reinterpret_cast<uintptr_t>(base + begin);
    int64_t head = static_cast<int64_t>(((16 - (addr & 15u)) & 15u) / sizeof(T));
    if ((addr % sizeof(T)) != 0) head = end - begin;  // not even element-aligned: all scalar
    const int64_t vbegin = begin + head < end ? begin + head : end;
    const int nvec = static_cast<int>((end - vbegin) / kVec);  // < 2^31 / kVec
    const int64_t vend = vbegin + static_cast<int64_t>(nvec) * kVec;
    for (int64_t c = begin + threadIdx.x; c < vbegin; c += kThreads) {
      offer(t, detail::to_float(base[c]), static_cast<int>(c));
    }
    const uint4* vp = reinterpret_cast<const uint4*>(base + vbegin);
    for (int v0 = threadIdx.x; v0 < nvec; v0 += kThreads * kUnroll) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int v = v0 + u * kThreads;
        if (v < nvec) raw[u] = __ldg(vp + v);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int v = v0 + u * kThreads;
        if (v < nvec) {
          float x[kVec];
          detail::unpack16<T>(raw[u], x);
          const int c0 = static_cast<int>(vbegin + static_cast<int64_t>(v) * kVec);  // + kVec - 1 < vocab
#pragma unroll
          for (int e = 0; e < kVec; ++e) offer_increasing(t, x[e], c0 + e);
        }
      }
    }
    for (int64_t c = vend + threadIdx.x; c < end; c += kThreads) {
      offer(t, detail::to_float(base[c]), static_cast<int>(c));
    }
  } else {
    for (int64_t c = begin + threadIdx.x; c < end; c += kThreads) {
      offer(t, detail::to_float(base[c * col_stride]), static_cast<int>(c));
    }
  }

  // Merge: warp butterfly, then warp 0 over the warps (exact, so the tree shape is irrelevant).
  static_assert(kThreads == 32 * 32, "merge_block_into_warp0 merges 32 warps");
  __shared__ Top2 warps[kThreads / 32];
  t = detail::merge_block_into_warp0(t, warps);
  if (threadIdx.x != 0) return;
  if (plan.segments == 1) {
    write_result(t, row, top1, top2, margin);
  } else {
    partial[blockIdx.x] = t;
  }
}

__global__ void margin_merge_kernel(const Top2* __restrict__ partial, int64_t rows, int segments,
                                    int64_t* __restrict__ top1, int64_t* __restrict__ top2,
                                    float* __restrict__ margin) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  Top2 t = partial[row * segments];
  for (int s = 1; s < segments; ++s) t = merge(t, partial[row * segments + s]);
  write_result(t, row, top1, top2, margin);
}

}  // namespace

size_t margin_workspace_bytes(int64_t rows, int64_t vocab) {
  if (rows <= 0 || vocab < 2 || vocab > INT_MAX) return 0;
  const detail::MarginPlan p = detail::margin_plan(rows, vocab, detail::current_device_sms());
  return p.segments > 1 ? static_cast<size_t>(rows) * p.segments * sizeof(Top2) : 0;
}

cudaError_t margin(DType dtype, const void* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                   int64_t col_stride, int64_t* top1, int64_t* top2, float* margin_out, void* workspace,
                   size_t workspace_bytes, cudaStream_t stream) {
  if (rows < 0 || vocab < 2 || vocab > INT_MAX) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const detail::MarginPlan p = detail::margin_plan(rows, vocab, detail::current_device_sms());
  Top2* partial = nullptr;
  if (p.segments > 1) {
    if (workspace == nullptr || workspace_bytes < static_cast<size_t>(rows) * p.segments * sizeof(Top2))
      return cudaErrorInvalidValue;
    partial = static_cast<Top2*>(workspace);
  }
  if (rows * p.segments > INT_MAX) return cudaErrorInvalidValue;
  const unsigned grid = static_cast<unsigned>(rows * p.segments);
  detail::dispatch_dtype(dtype, [&]<typename T>() {
    margin_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(logits), vocab, row_stride, col_stride, p,
                                                   top1, top2, margin_out, partial);
    return 0;
  });
  if (p.segments > 1) {
    const int threads = 128;
    const unsigned blocks = static_cast<unsigned>((rows + threads - 1) / threads);
    margin_merge_kernel<<<blocks, threads, 0, stream>>>(partial, rows, static_cast<int>(p.segments), top1, top2,
                                                        margin_out);
  }
  return cudaGetLastError();
}

}  // namespace margingate::cuda
