// CPU registration of margingate::sample_margin.
#include "sampling_args.h"

namespace margingate::binding {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_margin_cpu(
    const at::Tensor& logits,                // [B, V] bf16/fp16/fp32
    const at::Tensor& seed,                  // [B] int64
    const at::Tensor& position,              // [B] int32/int64
    const at::Tensor& temperature,           // [B] fp32, >= 0 (0 = greedy)
    const std::optional<at::Tensor>& top_k,  // [B] int32/int64, >= 0 (0 = off)
    const std::optional<at::Tensor>& min_p) {  // [B] fp32 in [0, 1] (0 = off)
  const DType dtype = core_dtype(logits, "sample_margin", "logits");
  const SamplingTensors t = check_sampling_args(logits, seed, position, temperature, top_k, min_p);
  TORCH_CHECK(logits.device().is_cpu(), "margingate.sample_margin: logits must be a CPU tensor here, got ",
              logits.device());
  const int64_t rows = logits.size(0);
  auto token = at::empty({rows}, logits.options().dtype(at::kLong));
  auto runner_up = at::empty({rows}, logits.options().dtype(at::kLong));
  auto margin_out = at::empty({rows}, logits.options().dtype(at::kFloat));
  auto cutoff = at::empty({rows}, logits.options().dtype(at::kFloat));
  SamplingArgs a = sampling_args(dtype, logits, t);
  a.token = token.data_ptr<int64_t>();
  a.runner_up = runner_up.data_ptr<int64_t>();
  a.margin = margin_out.data_ptr<float>();
  a.cutoff_margin = cutoff.data_ptr<float>();
  check_status(sample_margin(a, torch_parallel()));
  return {token, runner_up, margin_out, cutoff};
}

TORCH_LIBRARY_IMPL(margingate, CPU, m) { m.impl("sample_margin", &sample_margin_cpu); }

}  // namespace margingate::binding
