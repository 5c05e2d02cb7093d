// The core call description for margingate::linear, shared by the CPU and CUDA registrations.
#pragma once

#include <optional>

#include "margingate/linear.h"
#include "torch_utils.h"

namespace margingate::binding {

// x2 [M, K] (the flattened x), weight [N, K], bias [N]?, y2 [M, N]; all already checked.
inline LinearArgs linear_args(DType dtype, const at::Tensor& x2, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& y2) {
  LinearArgs a;
  a.dtype = dtype;
  a.x = x2.data_ptr();
  a.M = x2.size(0);
  a.K = x2.size(1);
  a.x_row_stride = x2.stride(0);
  a.x_col_stride = x2.stride(1);
  a.w = weight.data_ptr();
  a.N = weight.size(0);
  a.w_row_stride = weight.stride(0);
  a.w_col_stride = weight.stride(1);
  if (bias.has_value()) {
    a.bias = bias->data_ptr();
    a.bias_stride = bias->stride(0);
  }
  a.y = y2.data_ptr();
  a.y_row_stride = y2.stride(0);
  a.y_col_stride = y2.stride(1);
  return a;
}

}  // namespace margingate::binding
