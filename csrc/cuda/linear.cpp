// CUDA registration of margingate::linear.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "linear_args.h"
#include "margingate/cuda/linear.h"

namespace margingate::binding {

at::Tensor linear_cuda(const at::Tensor& x,                    // [..., K]
                       const at::Tensor& weight,               // [N, K]
                       const std::optional<at::Tensor>& bias) {  // [N]
  TORCH_CHECK(x.dim() >= 1, "margingate.linear: x must have at least 1 dimension, got a scalar");
  TORCH_CHECK(weight.dim() == 2, "margingate.linear: weight must be 2-D [out_features, in_features], got ",
              weight.dim(), "-D");
  const DType dtype = core_dtype(x, "linear", "x");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "margingate.linear: weight has dtype ",
                   weight.scalar_type(), " but x has ", x.scalar_type());
  const int64_t K = x.size(-1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "margingate.linear: weight has ", weight.size(1),
              " input features but x has ", K, " (last dimension)");
  TORCH_CHECK(x.is_cuda(), "margingate.linear: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(weight.device() == x.device(), "margingate.linear: weight is on ", weight.device(), " but x is on ",
              x.device(), "; all arguments must be on one device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "margingate.linear: bias must be 1-D with ", N,
                " entries, got shape ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "margingate.linear: bias has dtype ",
                     bias->scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK(bias->device() == x.device(), "margingate.linear: bias is on ", bias->device(), " but x is on ",
                x.device(), "; all arguments must be on one device");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  // [..., K] -> [M, K]: a view whenever the leading dims can be flattened, else a copy (a copy
  // does not change any row's bits).
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  const at::Tensor x2 = x.reshape({M, K});
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor y2 = y.view({M, N});

  const LinearArgs a = linear_args(dtype, x2, weight, bias, y2);
  C10_CUDA_CHECK(::margingate::cuda::linear(a, c10::cuda::getCurrentCUDAStream()));
  return y;
}

TORCH_LIBRARY_IMPL(margingate, CUDA, m) { m.impl("linear", &linear_cuda); }

}  // namespace margingate::binding
