// linear: the fixed-tile, row-invariant GEMM y = x @ w^T (+ bias).
#pragma once

#include "margingate/common.h"

namespace margingate {

// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), fp32 accumulation, all operands of `dtype`.
// All strides are in elements and may be anything (transposed views included), so aten's
// mm(a, b) is linear(x=a, w=b^T) with w_row_stride = b.stride(1), w_col_stride = b.stride(0).
//
// Row invariance (the contract): y[m, :] is a function of x[m, :], w and bias alone, bit for bit,
// for any M, any position of the row and any strides. The K-reduction order of each output
// element is fixed once and for all (see cpp/src/linear/ for the argument).
struct LinearArgs {
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  int64_t M = 0, K = 0;
  int64_t x_row_stride = 0, x_col_stride = 1;
  const void* w = nullptr;
  int64_t N = 0;
  int64_t w_row_stride = 0, w_col_stride = 1;
  const void* bias = nullptr;  // optional [N]
  int64_t bias_stride = 1;
  void* y = nullptr;
  int64_t y_row_stride = 0, y_col_stride = 1;
};

Status linear(const LinearArgs& args, const Parallel& parallel);

}  // namespace margingate
