// Shared helpers of the binding layer: tensor -> core argument conversion and checks.
#pragma once

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "margingate/common.h"

namespace margingate::binding {

// The core's dtype for a tensor, or a clear error naming the op and the argument.
inline DType core_dtype(const at::Tensor& t, const char* op, const char* arg) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "margingate.", op, ": ", arg,
                       " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::kFloat32;
}

// torch's intra-op thread pool behind the core's Parallel interface, so margingate kernels share
// threads with the rest of torch instead of fighting them.
inline Parallel torch_parallel() {
  Parallel p;
  p.self = nullptr;
  p.num_threads = at::get_num_threads();
  p.run = [](void*, int64_t n, int64_t grain, void* ctx, Parallel::Body body) {
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { body(ctx, b, e); });
  };
  return p;
}

// Turns a failed core Status into a RuntimeError (the binding checks user input first, so this
// is what remains: index validation done by the core itself).
inline void check_status(const Status& s) { TORCH_CHECK(s.ok(), s.message); }

// Index tensors (rows, positions, kv_start) may be int32 or int64; the core takes int64.
inline at::Tensor as_int64_index(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, "margingate.", op,
                   ": ", arg, " must be int32 or int64, got ", t.scalar_type());
  return t.to(at::kLong).contiguous();
}

}  // namespace margingate::binding
