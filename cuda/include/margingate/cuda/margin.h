// margin on CUDA: top-1 index, top-2 index and their logit gap, one pass over each row.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "margingate/common.h"

namespace margingate::cuda {

// The same contract as margingate::margin (cpp/include/margingate/margin.h): for each of `rows`
// rows of `vocab` logits at logits[r * row_stride + c * col_stride] (element strides, device
// memory), top1 = torch.argmax (first index on ties, first NaN when the row has one), top2 = the
// best of the other indices (second NaN, else the best number, in a NaN row), margin = value(top1)
// - value(top2), exactly 0 on ties, NaN for a NaN row. vocab in [2, 2^31 - 1]; rows >= 0.
//
// Bytes of device workspace the call needs (0 or more; depends on the current device's SM count,
// so ask on the device you launch on). Pass at least that many bytes, 16-byte aligned.
size_t margin_workspace_bytes(int64_t rows, int64_t vocab);

// Enqueues the kernel(s) on `stream`; returns cudaErrorInvalidValue for arguments outside the
// contract (the binding checks them first) or the launch error.
cudaError_t margin(DType dtype, const void* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                   int64_t col_stride, int64_t* top1, int64_t* top2, float* margin, void* workspace,
                   size_t workspace_bytes, cudaStream_t stream);

}  // namespace margingate::cuda
