// CPU registration of margingate::linear.
#include "linear_args.h"

namespace margingate::binding {

at::Tensor linear_cpu(const at::Tensor& x,                   // [..., K]
                      const at::Tensor& weight,              // [N, K]
                      const std::optional<at::Tensor>& bias  // [N]
) {
  // Devices first (a tensor on another device must not be read), then the shared checks.
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "margingate.linear: x and weight must be on the same device, got x on ", x.device(), " and weight on ",
              weight.device());
  TORCH_CHECK(!bias.has_value() || bias->device().is_cpu(), "margingate.linear: bias must be on x's device ",
              x.device(), ", got ", bias.has_value() ? bias->device() : x.device());
  const DType dtype = check_linear_args(x, weight, bias);
  const int64_t K = x.size(-1), N = weight.size(0);

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  // Flatten the leading dims: a view when the strides allow one, else a copy (bits only, so the
  // result is the same either way).
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  const at::Tensor x2 = x.reshape({M, K});
  at::Tensor y = at::empty({M, N}, x.options());

  const LinearArgs a = linear_args(dtype, x2, weight, bias, y);
  check_status(linear(a, torch_parallel()));
  return y.view(out_shape);
}

TORCH_LIBRARY_IMPL(margingate, CPU, m) { m.impl("linear", &linear_cpu); }

}  // namespace margingate::binding
