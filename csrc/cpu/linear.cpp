// CPU registration of margingate::linear.
#include "linear_args.h"

namespace margingate::binding {

at::Tensor linear_cpu(const at::Tensor& x,                   // [..., K]
                      const at::Tensor& weight,              // [N, K]
                      const std::optional<at::Tensor>& bias  // [N]
) {
  TORCH_CHECK(x.dim() >= 1, "margingate.linear: x must have at least 1 dimension [..., K], got a 0-D tensor");
  TORCH_CHECK(weight.dim() == 2, "margingate.linear: weight must be 2-D [N, K], got ", weight.dim(), "-D");
  const DType dtype = core_dtype(x, "linear", "x");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "margingate.linear: weight must have x's dtype ",
                   x.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "margingate.linear: x and weight must be on the same device, got x on ", x.device(), " and weight on ",
              weight.device());
  const int64_t K = x.size(-1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "margingate.linear: weight must be [N, K] with K = x.size(-1) = ", K,
              ", got weight of shape ", weight.sizes());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device().is_cpu(), "margingate.linear: bias must be on x's device ", x.device(), ", got ",
                b.device());
    TORCH_CHECK_TYPE(b.scalar_type() == x.scalar_type(), "margingate.linear: bias must have x's dtype ",
                     x.scalar_type(), ", got ", b.scalar_type());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N, "margingate.linear: bias must be 1-D [N] with N = ", N,
                ", got shape ", b.sizes());
  }

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
