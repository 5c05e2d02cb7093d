// linear on CUDA: the fixed-order, row-invariant GEMM y = x @ w^T (+ bias).
#pragma once

#include <cuda_runtime_api.h>

#include "margingate/common.h"
#include "margingate/linear.h"  // LinearArgs

namespace margingate::cuda {

// The same contract as margingate::linear (cpp/include/margingate/linear.h), with every pointer
// in `args` in device memory and element strides describing any layout. Row invariance:
// y[m, :] depends on x[m, :], w and bias alone, bit for bit, for any M, any position of the row and
// any strides (see cuda/src/linear.cu for the argument). Enqueued on `stream`; returns
// cudaErrorInvalidValue for arguments outside the contract or the launch error.
cudaError_t linear(const LinearArgs& args, cudaStream_t stream);

}  // namespace margingate::cuda
