// kv_patch on CUDA: overwrite single K/V columns of a device cache in place.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "margingate/common.h"
#include "margingate/kv_patch.h"  // CacheView, ColumnsView

namespace margingate::cuda {

// Indices and shapes are checked on the host by the core's kv_patch_validate (the CPU op's exact
// checks and messages): a caller holding the indices on the GPU must copy them to the host first,
// which synchronises with the stream (the price of "nothing is written on a bad index").
using ::margingate::kv_patch_validate;

// For i in [0, n): k_cache[rows[i], :, positions[i], :] = k_new[i] and the same for v, on `stream`.
// All data pointers (caches, columns, rows_device, positions_device) are device memory. The
// indices must already have passed kv_patch_validate: the kernel trusts them.
cudaError_t kv_patch(DType dtype, const CacheView& k_cache, const CacheView& v_cache,
                     const int64_t* rows_device, const int64_t* positions_device, int64_t n,
                     const ColumnsView& k_new, const ColumnsView& v_new, cudaStream_t stream);

}  // namespace margingate::cuda
