// CPU registration of margingate::kv_patch_.
#include "kv_patch_args.h"

namespace margingate::binding {

void kv_patch_cpu(const at::Tensor& k_cache,    // [B, H_kv, T, D], written in place
                  const at::Tensor& v_cache,    // [B, H_kv, T, D], written in place
                  const at::Tensor& rows,       // [n] int32/int64
                  const at::Tensor& positions,  // [n] int32/int64
                  const at::Tensor& k_new,      // [n, H_kv, D]
                  const at::Tensor& v_new) {    // [n, H_kv, D]
  const DType dtype = check_kv_patch_args(k_cache, v_cache, rows, positions, k_new, v_new);
  const std::pair<const char*, const at::Tensor*> all[6] = {{"k_cache", &k_cache}, {"v_cache", &v_cache},
                                                            {"rows", &rows},       {"positions", &positions},
                                                            {"k_new", &k_new},     {"v_new", &v_new}};
  for (const auto& [name, t] : all) {
    TORCH_CHECK(t->device().is_cpu(), "margingate.kv_patch_: ", name, " is on ", t->device(),
                " but this kernel runs on the CPU; all arguments must be on one device");
  }
  const at::Tensor r = as_int64_index(rows, "kv_patch_", "rows");
  const at::Tensor p = as_int64_index(positions, "kv_patch_", "positions");
  check_status(kv_patch(dtype, cache_view(k_cache), cache_view(v_cache), r.data_ptr<int64_t>(),
                        p.data_ptr<int64_t>(), r.size(0), columns_view(k_new), columns_view(v_new)));
}

TORCH_LIBRARY_IMPL(margingate, CPU, m) { m.impl("kv_patch_", &kv_patch_cpu); }

}  // namespace margingate::binding
