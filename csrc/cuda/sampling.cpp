// CUDA registration of margingate::sample_margin.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "margingate/cuda/sampling.h"
#include "sampling_args.h"

namespace margingate::binding {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_margin_cuda(
    const at::Tensor& logits,                  // [B, V] bf16/fp16/fp32
    const at::Tensor& seed,                    // [B] int64
    const at::Tensor& position,                // [B] int32/int64
    const at::Tensor& temperature,             // [B] fp32, >= 0 (0 = greedy)
    const std::optional<at::Tensor>& top_k,    // [B] int32/int64, >= 0 (0 = off)
    const std::optional<at::Tensor>& min_p) {  // [B] fp32 in [0, 1] (0 = off)
  const DType dtype = core_dtype(logits, "sample_margin", "logits");
  TORCH_CHECK(logits.is_cuda(), "margingate.sample_margin: logits must be a CUDA tensor, got ", logits.device());
  const SamplingTensors t = check_sampling_args(logits, seed, position, temperature, top_k, min_p);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  auto token = at::empty({rows}, logits.options().dtype(at::kLong));
  auto runner_up = at::empty({rows}, logits.options().dtype(at::kLong));
  auto margin_out = at::empty({rows}, logits.options().dtype(at::kFloat));
  auto cutoff = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (rows == 0) return {token, runner_up, margin_out, cutoff};
  // The parameter values are checked on a host copy with the CPU op's checks (same messages), at
  // the price of one small device-to-host copy per call; the kernel could not report an error.
  SamplingTensors host{t.seed.cpu(), t.position.cpu(), t.temperature.cpu(),
                       t.top_k.defined() ? t.top_k.cpu() : at::Tensor(), t.min_p.defined() ? t.min_p.cpu() : at::Tensor()};
  check_status(sample_margin_validate(sampling_args(dtype, logits, host)));
  SamplingArgs a = sampling_args(dtype, logits, t);
  a.token = token.data_ptr<int64_t>();
  a.runner_up = runner_up.data_ptr<int64_t>();
  a.margin = margin_out.data_ptr<float>();
  a.cutoff_margin = cutoff.data_ptr<float>();
  C10_CUDA_CHECK(::margingate::cuda::sample_margin(a, c10::cuda::getCurrentCUDAStream()));
  return {token, runner_up, margin_out, cutoff};
}

TORCH_LIBRARY_IMPL(margingate, CUDA, m) { m.impl("sample_margin", &sample_margin_cuda); }

}  // namespace margingate::binding
