// CUDA registration of margingate::kv_patch_.
//
// Indices are validated on the host before anything is written. Index tensors on the GPU are
// therefore copied to the host first, which waits for the stream (one small device-to-host copy
// per call); pass rows/positions as CPU tensors to avoid that sync.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kv_patch_args.h"
#include "margingate/cuda/kv_patch.h"

namespace margingate::binding {

void kv_patch_cuda(const at::Tensor& k_cache,    // [B, H_kv, T, D], written in place
                   const at::Tensor& v_cache,    // [B, H_kv, T, D], written in place
                   const at::Tensor& rows,       // [n] int32/int64, on the caches' device or the CPU
                   const at::Tensor& positions,  // [n] int32/int64, on the caches' device or the CPU
                   const at::Tensor& k_new,      // [n, H_kv, D]
                   const at::Tensor& v_new) {    // [n, H_kv, D]
  const DType dtype = check_kv_patch_args(k_cache, v_cache, rows, positions, k_new, v_new);
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
  const c10::cuda::CUDAGuard guard(k_cache.device());

  // Host copies for validation (a stream sync when the indices live on the GPU).
  const at::Tensor rows_host = as_int64_index(rows, "kv_patch_", "rows").cpu();
  const at::Tensor positions_host = as_int64_index(positions, "kv_patch_", "positions").cpu();
  const CacheView kc = cache_view(k_cache), vc = cache_view(v_cache);
  const ColumnsView kn = columns_view(k_new), vn = columns_view(v_new);
  check_status(::margingate::cuda::kv_patch_validate(kc, vc, rows_host.data_ptr<int64_t>(),
                                                     positions_host.data_ptr<int64_t>(), rows_host.size(0), kn, vn));
  if (rows_host.size(0) == 0) return;
  // Device copies for the kernel: the caller's tensors when they already are int64 on the device,
  // else the checked host copies through pinned memory (asynchronous: no wait for the stream).
  auto on_device = [&](const at::Tensor& t, const at::Tensor& host) {
    if (t.device() == k_cache.device() && t.scalar_type() == at::kLong && t.is_contiguous()) return t;
    return host.pin_memory().to(k_cache.device(), at::kLong, /*non_blocking=*/true);
  };
  const at::Tensor rows_dev = on_device(rows, rows_host);
  const at::Tensor positions_dev = on_device(positions, positions_host);
  C10_CUDA_CHECK(::margingate::cuda::kv_patch(dtype, kc, vc, rows_dev.data_ptr<int64_t>(),
                                              positions_dev.data_ptr<int64_t>(), rows_host.size(0), kn, vn,
                                              c10::cuda::getCurrentCUDAStream()));
}

TORCH_LIBRARY_IMPL(margingate, CUDA, m) { m.impl("kv_patch_", &kv_patch_cuda); }

}  // namespace margingate::binding
