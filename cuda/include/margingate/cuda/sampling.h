// sample_margin on CUDA: seeded Gumbel-max sampling with its margins, one block per row.
#pragma once

#include <cuda_runtime_api.h>

#include "margingate/sampling.h"

namespace margingate::cuda {

// The contract of margingate::sample_margin (cpp/include/margingate/sampling.h), bit for bit:
// the same noise (noise::gumbel_from_bits is host/device code written with correctly rounded fp64
// intrinsics), the same fp32 score and margin arithmetic, the same selections. Every pointer of
// `args` (logits, per-row parameters, outputs) is device memory. The launcher cannot read the
// parameters, so the caller checks them first (sample_margin_validate on a host copy); outside the
// contract the results are unspecified but nothing outside the outputs is written.
// Enqueues one kernel on `stream`; cudaErrorInvalidValue for rows < 0 or vocab outside [2, 2^31 - 1].
cudaError_t sample_margin(const SamplingArgs& args, cudaStream_t stream);

}  // namespace margingate::cuda
