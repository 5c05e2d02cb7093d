// CUDA registration of margingate::margin.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "margingate/cuda/margin.h"
#include "torch_utils.h"

namespace margingate::binding {

std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_cuda(const at::Tensor& logits) {  // [B, V]
  TORCH_CHECK(logits.dim() == 2, "margingate.margin: logits must be 2-D [batch, vocab], got ",
              logits.dim(), "-D");
  const DType dtype = core_dtype(logits, "margin", "logits");
  TORCH_CHECK(logits.size(1) >= 2, "margingate.margin: logits must have at least 2 columns, got ",
              logits.size(1));
  TORCH_CHECK(logits.size(1) <= INT32_MAX, "margingate.margin: at most 2^31 - 1 columns are supported, got ",
              logits.size(1));
  TORCH_CHECK(logits.is_cuda(), "margingate.margin: logits must be a CUDA tensor, got ", logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  auto top1 = at::empty({rows}, logits.options().dtype(at::kLong));
  auto top2 = at::empty({rows}, logits.options().dtype(at::kLong));
  auto margin_out = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (rows == 0) return {top1, top2, margin_out};
  const size_t ws_bytes = ::margingate::cuda::margin_workspace_bytes(rows, logits.size(1));
  at::Tensor workspace;
  if (ws_bytes > 0) workspace = at::empty({static_cast<int64_t>(ws_bytes)}, logits.options().dtype(at::kByte));
  C10_CUDA_CHECK(::margingate::cuda::margin(
      dtype, logits.data_ptr(), rows, logits.size(1), logits.stride(0), logits.stride(1), top1.data_ptr<int64_t>(),
      top2.data_ptr<int64_t>(), margin_out.data_ptr<float>(), ws_bytes > 0 ? workspace.data_ptr() : nullptr, ws_bytes,
      c10::cuda::getCurrentCUDAStream()));
  return {top1, top2, margin_out};
}

TORCH_LIBRARY_IMPL(margingate, CUDA, m) { m.impl("margin", &margin_cuda); }

}  // namespace margingate::binding
