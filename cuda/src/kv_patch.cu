// kv_patch on CUDA: in-place K/V column writes, validated on the host before any write.
//
// Invariance argument: a copy, no arithmetic; the written bits are the input bits.
//
// One thread per (column, head, element) of both caches; every store goes to a distinct address
// (validation rejects duplicate (row, position) pairs), so the order of the stores is irrelevant.
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "device_utils.cuh"
#include "margingate/cuda/kv_patch.h"

namespace margingate::cuda {

namespace {

struct Strides4 {
  int64_t s[4];
};
struct Strides3 {
  int64_t s[3];
};

template <typename T>
__global__ void kv_patch_kernel(T* __restrict__ k_cache, T* __restrict__ v_cache, Strides4 ks, Strides4 vs,
                                const int64_t* __restrict__ rows, const int64_t* __restrict__ positions,
                                const T* __restrict__ k_new, const T* __restrict__ v_new, Strides3 kn, Strides3 vn,
                                int64_t n, int64_t heads, int64_t head_dim) {
  const int64_t per_column = heads * head_dim;
  const int64_t total = n * per_column;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / per_column;
    const int64_t h = (idx % per_column) / head_dim;
    const int64_t d = idx % head_dim;
    const int64_t r = rows[i], p = positions[i];
    k_cache[r * ks.s[0] + h * ks.s[1] + p * ks.s[2] + d * ks.s[3]] = k_new[i * kn.s[0] + h * kn.s[1] + d * kn.s[2]];
    v_cache[r * vs.s[0] + h * vs.s[1] + p * vs.s[2] + d * vs.s[3]] = v_new[i * vn.s[0] + h * vn.s[1] + d * vn.s[2]];
  }
}

}  // namespace

cudaError_t kv_patch(DType dtype, const CacheView& k_cache, const CacheView& v_cache, const int64_t* rows,
                     const int64_t* positions, int64_t n, const ColumnsView& k_new, const ColumnsView& v_new,
                     cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  const int64_t total = n * k_cache.heads * k_cache.head_dim;
  if (total == 0) return cudaSuccess;
  const Strides4 ks{{k_cache.stride[0], k_cache.stride[1], k_cache.stride[2], k_cache.stride[3]}};
  const Strides4 vs{{v_cache.stride[0], v_cache.stride[1], v_cache.stride[2], v_cache.stride[3]}};
  const Strides3 kn{{k_new.stride[0], k_new.stride[1], k_new.stride[2]}};
  const Strides3 vn{{v_new.stride[0], v_new.stride[1], v_new.stride[2]}};
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535);
  detail::dispatch_dtype(dtype, [&]<typename T>() {
    kv_patch_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        static_cast<T*>(k_cache.data), static_cast<T*>(v_cache.data), ks, vs, rows, positions,
        static_cast<const T*>(k_new.data), static_cast<const T*>(v_new.data), kn, vn, n, k_cache.heads,
        k_cache.head_dim);
    return 0;
  });
  return cudaGetLastError();
}

}  // namespace margingate::cuda
