// CUDA registration of margingate::kv_patch_.
//
// Indices are validated on the host before anything is written. Index tensors on the GPU are
// therefore copied to the host first, which waits for the stream (one small device-to-host copy
// per call); pass rows/positions as CPU tensors to avoid that sync.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "margingate/cuda/kv_patch.h"
#include "torch_utils.h"

namespace margingate::binding {

namespace {
CacheView cuda_cache_view(const at::Tensor& t) {
  CacheView c;
  c.data = t.data_ptr();
  c.batch = t.size(0);
  c.heads = t.size(1);
  c.capacity = t.size(2);
  c.head_dim = t.size(3);
  for (int d = 0; d < 4; ++d) c.stride[d] = t.stride(d);
  return c;
}
ColumnsView cuda_columns_view(const at::Tensor& t) {
  ColumnsView c;
  c.data = t.data_ptr();
  c.n = t.size(0);
  c.heads = t.size(1);
  c.head_dim = t.size(2);
  for (int d = 0; d < 3; ++d) c.stride[d] = t.stride(d);
  return c;
}
}  // namespace

void kv_patch_cuda(const at::Tensor& k_cache,    // [B, H_kv, T, D], written in place
                   const at::Tensor& v_cache,    // [B, H_kv, T, D], written in place
                   const at::Tensor& rows,       // [n] int32/int64, on the caches' device or the CPU
                   const at::Tensor& positions,  // [n] int32/int64, on the caches' device or the CPU
                   const at::Tensor& k_new,      // [n, H_kv, D]
                   const at::Tensor& v_new) {    // [n, H_kv, D]
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
  TORCH_CHECK(k_cache.is_cuda(), "margingate.kv_patch_: k_cache must be a CUDA tensor, got ", k_cache.device());
  const std::pair<const char*, const at::Tensor*> data[3] = {{"v_cache", &v_cache}, {"k_new", &k_new}, {"v_new", &v_new}};
  for (const auto& [name, t] : data) {
    TORCH_CHECK(t->device() == k_cache.device(), "margingate.kv_patch_: ", name, " is on ", t->device(),
                " but k_cache is on ", k_cache.device(), "; all arguments must be on one device");
  }
  const std::pair<const char*, const at::Tensor*> indices[2] = {{"rows", &rows}, {"positions", &positions}};
  for (const auto& [name, t] : indices) {
    TORCH_CHECK(t->device() == k_cache.device() || t->device().is_cpu(), "margingate.kv_patch_: ", name, " is on ",
                t->device(), " but k_cache is on ", k_cache.device(), "; indices must be on that device or the CPU");
  }
  TORCH_CHECK(!k_cache.is_same(v_cache), "margingate.kv_patch_: k_cache and v_cache must be different tensors");
  const c10::cuda::CUDAGuard guard(k_cache.device());

  // Host copies for validation (a stream sync when the indices live on the GPU).
  const at::Tensor rows_host = as_int64_index(rows, "kv_patch_", "rows").cpu();
  const at::Tensor positions_host = as_int64_index(positions, "kv_patch_", "positions").cpu();
  const CacheView kc = cuda_cache_view(k_cache), vc = cuda_cache_view(v_cache);
  const ColumnsView kn = cuda_columns_view(k_new), vn = cuda_columns_view(v_new);
  check_status(::margingate::cuda::kv_patch_validate(kc, vc, rows_host.data_ptr<int64_t>(),
                                                     positions_host.data_ptr<int64_t>(), rows_host.size(0), kn, vn));
  if (rows_host.size(0) == 0) return;
  // Device copies for the kernel: the caller's tensors when they already are int64 on the device.
  const at::Tensor rows_dev = as_int64_index(rows, "kv_patch_", "rows").to(k_cache.device());
  const at::Tensor positions_dev = as_int64_index(positions, "kv_patch_", "positions").to(k_cache.device());
  C10_CUDA_CHECK(::margingate::cuda::kv_patch(dtype, kc, vc, rows_dev.data_ptr<int64_t>(),
                                              positions_dev.data_ptr<int64_t>(), rows_host.size(0), kn, vn,
                                              c10::cuda::getCurrentCUDAStream()));
}

TORCH_LIBRARY_IMPL(margingate, CUDA, m) { m.impl("kv_patch_", &kv_patch_cuda); }

}  // namespace margingate::binding
