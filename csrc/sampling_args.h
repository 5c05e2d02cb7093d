// The tensor checks and the core call description for margingate::sample_margin, shared by the
// CPU and CUDA registrations.
#pragma once

#include <optional>

#include "margingate/sampling.h"
#include "torch_utils.h"

namespace margingate::binding {

// The per-row parameters as contiguous tensors of the core's types, on the logits' device.
struct SamplingTensors {
  at::Tensor seed, position, temperature, top_k, min_p;  // top_k / min_p undefined = off
};

inline at::Tensor per_row(const at::Tensor& t, const at::Tensor& logits, const char* arg) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0), "margingate.sample_margin: ", arg,
              " must be 1-D with one entry per row of logits [", logits.size(0), "], got shape ", t.sizes());
  TORCH_CHECK(t.device() == logits.device(), "margingate.sample_margin: ", arg, " is on ", t.device(),
              " but logits is on ", logits.device(), "; all arguments must be on one device");
  return t;
}

inline SamplingTensors check_sampling_args(const at::Tensor& logits, const at::Tensor& seed,
                                           const at::Tensor& position, const at::Tensor& temperature,
                                           const std::optional<at::Tensor>& top_k,
                                           const std::optional<at::Tensor>& min_p) {
  TORCH_CHECK(logits.dim() == 2, "margingate.sample_margin: logits must be 2-D [batch, vocab], got ",
              logits.dim(), "-D");
  core_dtype(logits, "sample_margin", "logits");
  TORCH_CHECK(logits.size(1) >= 2, "margingate.sample_margin: logits must have at least 2 columns, got ",
              logits.size(1));
  TORCH_CHECK(logits.size(1) <= INT32_MAX, "margingate.sample_margin: at most 2^31 - 1 columns are supported, got ",
              logits.size(1));
  SamplingTensors out;
  // A seed is 64 bits of key material: int32 would be ambiguous (sign extension), so int64 only.
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "margingate.sample_margin: seed must be int64, got ",
                   seed.scalar_type());
  out.seed = per_row(seed, logits, "seed").contiguous();
  out.position = as_int64_index(per_row(position, logits, "position"), "sample_margin", "position");
  TORCH_CHECK_TYPE(temperature.scalar_type() == at::kFloat,
                   "margingate.sample_margin: temperature must be float32, got ", temperature.scalar_type());
  out.temperature = per_row(temperature, logits, "temperature").contiguous();
  if (top_k.has_value()) out.top_k = as_int64_index(per_row(*top_k, logits, "top_k"), "sample_margin", "top_k");
  if (min_p.has_value()) {
    TORCH_CHECK_TYPE(min_p->scalar_type() == at::kFloat, "margingate.sample_margin: min_p must be float32, got ",
                     min_p->scalar_type());
    out.min_p = per_row(*min_p, logits, "min_p").contiguous();
  }
  return out;
}

// The core arguments; the parameter pointers are wherever `t` lives (host for the CPU op).
inline SamplingArgs sampling_args(DType dtype, const at::Tensor& logits, const SamplingTensors& t) {
  SamplingArgs a;
  a.dtype = dtype;
  a.logits = logits.data_ptr();
  a.rows = logits.size(0);
  a.vocab = logits.size(1);
  a.row_stride = logits.stride(0);
  a.col_stride = logits.stride(1);
  a.seed = t.seed.data_ptr<int64_t>();
  a.position = t.position.data_ptr<int64_t>();
  a.temperature = t.temperature.data_ptr<float>();
  a.top_k = t.top_k.defined() ? t.top_k.data_ptr<int64_t>() : nullptr;
  a.min_p = t.min_p.defined() ? t.min_p.data_ptr<float>() : nullptr;
  return a;
}

}  // namespace margingate::binding
