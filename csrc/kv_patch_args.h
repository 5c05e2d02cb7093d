// The kv_patch_ argument checks and views shared by the CPU and CUDA registrations (device rules
// differ and stay in each registration).
#pragma once

#include <utility>

#include "margingate/kv_patch.h"
#include "torch_utils.h"

namespace margingate::binding {

inline CacheView cache_view(const at::Tensor& t) {  // [B, H_kv, T, D]
  CacheView c;
  c.data = t.data_ptr();
  c.batch = t.size(0);
  c.heads = t.size(1);
  c.capacity = t.size(2);
  c.head_dim = t.size(3);
  for (int d = 0; d < 4; ++d) c.stride[d] = t.stride(d);
  return c;
}

inline ColumnsView columns_view(const at::Tensor& t) {  // [n, H_kv, D]
  ColumnsView c;
  c.data = t.data_ptr();
  c.n = t.size(0);
  c.heads = t.size(1);
  c.head_dim = t.size(2);
  for (int d = 0; d < 3; ++d) c.stride[d] = t.stride(d);
  return c;
}

// Ranks, lengths, dtypes and memory overlap; returns the caches' dtype. Nothing is written before
// this passes.
inline DType check_kv_patch_args(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& rows,
                                 const at::Tensor& positions, const at::Tensor& k_new, const at::Tensor& v_new) {
  TORCH_CHECK(k_cache.dim() == 4, "margingate.kv_patch_: k_cache must be 4-D [batch, heads, capacity, head_dim], got ",
              k_cache.dim(), "-D");
  TORCH_CHECK(v_cache.dim() == 4, "margingate.kv_patch_: v_cache must be 4-D [batch, heads, capacity, head_dim], got ",
              v_cache.dim(), "-D");
  TORCH_CHECK(rows.dim() == 1, "margingate.kv_patch_: rows must be 1-D, got ", rows.dim(), "-D");
  TORCH_CHECK(positions.dim() == 1, "margingate.kv_patch_: positions must be 1-D, got ", positions.dim(), "-D");
  TORCH_CHECK(positions.size(0) == rows.size(0), "margingate.kv_patch_: positions has ", positions.size(0),
              " entries but rows has ", rows.size(0));
  TORCH_CHECK(k_new.dim() == 3, "margingate.kv_patch_: k_new must be 3-D [n, heads, head_dim], got ", k_new.dim(), "-D");
  TORCH_CHECK(v_new.dim() == 3, "margingate.kv_patch_: v_new must be 3-D [n, heads, head_dim], got ", v_new.dim(), "-D");
  const DType dtype = core_dtype(k_cache, "kv_patch_", "k_cache");
  const std::pair<const char*, const at::Tensor*> same_dtype[3] = {
      {"v_cache", &v_cache}, {"k_new", &k_new}, {"v_new", &v_new}};
  for (const auto& [name, t] : same_dtype) {
    TORCH_CHECK_TYPE(t->scalar_type() == k_cache.scalar_type(), "margingate.kv_patch_: ", name, " has dtype ",
                     t->scalar_type(), " but k_cache has ", k_cache.scalar_type());
  }
  TORCH_CHECK(!k_cache.is_same(v_cache), "margingate.kv_patch_: k_cache and v_cache must be different tensors");
  // Aliasing (a self-overlapping cache, k and v sharing elements, k_new/v_new inside a cache) is
  // refused here too, so the CUDA registration refuses it before its launch as the CPU core does.
  check_status(kv_patch_check_memory(static_cast<int64_t>(k_cache.element_size()), cache_view(k_cache),
                                     cache_view(v_cache), columns_view(k_new), columns_view(v_new)));
  return dtype;
}

}  // namespace margingate::binding
