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
  TORCH_CHECK(x.is_cuda(), "margingate.linear: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(weight.device() == x.device(), "margingate.linear: x and weight must be on the same device, got x on ",
              x.device(), " and weight on ", weight.device());
  TORCH_CHECK(!bias.has_value() || bias->device() == x.device(), "margingate.linear: bias must be on x's device ",
              x.device(), ", got ", bias.has_value() ? bias->device() : x.device());
  const DType dtype = check_linear_args(x, weight, bias);
  const int64_t K = x.size(-1), N = weight.size(0);
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
