// margingate::linear's argument checks and core call description, shared by the CPU and CUDA
// registrations (device rules differ and stay in each registration).
#pragma once

#include <optional>

#include "margingate/linear.h"
#include "torch_utils.h"

namespace margingate::binding {

// Ranks, dtypes and shapes of x [..., K], weight [N, K], bias [N]?; returns the core dtype.
inline DType check_linear_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, "margingate.linear: x must have at least 1 dimension [..., K], got a 0-D tensor");
  TORCH_CHECK(weight.dim() == 2, "margingate.linear: weight must be 2-D [N, K], got ", weight.dim(), "-D");
  const DType dtype = core_dtype(x, "linear", "x");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "margingate.linear: weight must have x's dtype ",
                   x.scalar_type(), ", got ", weight.scalar_type());
  const int64_t K = x.size(-1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "margingate.linear: weight must be [N, K] with K = x.size(-1) = ", K,
              ", got weight of shape ", weight.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "margingate.linear: bias must have x's dtype ",
                     x.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "margingate.linear: bias must be 1-D [N] with N = ", N,
                ", got shape ", bias->sizes());
  }
  return dtype;
}

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
