// CPU registration of margingate::attention: the shared checks (attention_args.h), the CPU device
// rule, then one call to the core.
#include <optional>

#include "attention_args.h"

namespace margingate::binding {

at::Tensor attention_cpu(const at::Tensor& q,                        // [B, Hq, Tq, D]
                         const at::Tensor& k,                        // [Bkv, Hkv, Tk, D]
                         const at::Tensor& v,                        // [Bkv, Hkv, Tk, D]
                         const std::optional<at::Tensor>& kv_start,  // [B] int32/int64, first valid key
                         const std::optional<at::Tensor>& kv_rows,   // [B] int32/int64, k/v row of query row b
                         bool causal, std::optional<double> scale, std::optional<int64_t> window) {
  const std::pair<const char*, const at::Tensor*> tensors[3] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t->device().is_cpu(), "margingate.attention: ", name, " is on ", t->device(),
                " but this kernel runs on the CPU; all arguments must be on one device");
  }
  const std::pair<const char*, const std::optional<at::Tensor>*> indices[2] = {{"kv_start", &kv_start},
                                                                              {"kv_rows", &kv_rows}};
  for (const auto& [name, t] : indices) {
    TORCH_CHECK(!t->has_value() || (*t)->device().is_cpu(), "margingate.attention: ", name, " is on ",
                (*t)->device(), " but this kernel runs on the CPU; all arguments must be on one device");
  }
  const AttentionOptions opt = check_attention_args(q, k, v, kv_start, kv_rows, causal, scale, window);
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);
  const at::Tensor rows = kv_rows.has_value() ? checked_index(*kv_rows, "kv_rows", 0, k.size(0), false) : at::Tensor();
  const at::Tensor start =
      kv_start.has_value() ? checked_index(*kv_start, "kv_start", 0, k.size(2), true) : at::Tensor();

  at::Tensor out = at::empty({B, Hq, Tq, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;

  const AttentionArgs a = attention_args(opt.dtype, q, k, v, out, rows.defined() ? rows.data_ptr<int64_t>() : nullptr,
                                         start.defined() ? start.data_ptr<int64_t>() : nullptr, causal, opt.scale,
                                         opt.window);
  check_status(attention(a, torch_parallel()));
  return out;
}

TORCH_LIBRARY_IMPL(margingate, CPU, m) { m.impl("attention", &attention_cpu); }

}  // namespace margingate::binding
