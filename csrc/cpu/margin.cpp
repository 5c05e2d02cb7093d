// CPU registration of margingate::margin.
#include "margingate/margin.h"
#include "torch_utils.h"

namespace margingate::binding {

std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_cpu(const at::Tensor& logits) {  // [B, V]
  TORCH_CHECK(logits.dim() == 2, "margingate.margin: logits must be 2-D [batch, vocab], got ",
              logits.dim(), "-D");
  const DType dtype = core_dtype(logits, "margin", "logits");
  TORCH_CHECK(logits.size(1) >= 2, "margingate.margin: logits must have at least 2 columns, got ",
              logits.size(1));
  const int64_t rows = logits.size(0);
  auto top1 = at::empty({rows}, logits.options().dtype(at::kLong));
  auto top2 = at::empty({rows}, logits.options().dtype(at::kLong));
  auto margin_out = at::empty({rows}, logits.options().dtype(at::kFloat));
  check_status(margin(dtype, logits.data_ptr(), rows, logits.size(1), logits.stride(0),
                      logits.stride(1), top1.data_ptr<int64_t>(), top2.data_ptr<int64_t>(),
                      margin_out.data_ptr<float>(), torch_parallel()));
  return {top1, top2, margin_out};
}

TORCH_LIBRARY_IMPL(margingate, CPU, m) { m.impl("margin", &margin_cpu); }

}  // namespace margingate::binding
