// CUDA registration of margingate::attention: the shared checks (attention_args.h), the CUDA device
// rules, the index values checked on the host, then the launch.
//
// kv_start / kv_rows values are checked on the host so that a bad one raises like on the CPU
// instead of reaching the kernel's device-side trap (which kills the CUDA context). Indices
// passed as CPU tensors cost one small host-to-device copy; indices on the GPU are copied to the
// host first, which waits for the stream (callers who care pass CPU indices). While the stream is being captured into a CUDA graph
// that wait is impossible: GPU indices are then checked only by the kernel (a trap), and CPU
// indices are refused (their copy would be baked into the graph).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "attention_args.h"
#include "margingate/cuda/attention.h"

namespace margingate::binding {

namespace {

bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// An optional [B] index tensor as int64 on `device`, its values checked on the host unless the
// stream is capturing (see the top of the file).
at::Tensor index_on_device(const at::Tensor& t, const char* arg, int64_t low, int64_t high, bool high_inclusive,
                           const at::Device& device, bool capturing) {
  if (capturing) {
    TORCH_CHECK(t.device() == device, "margingate.attention: ", arg, " is on ", t.device(),
                " while the stream is being captured into a CUDA graph; pass it on ", device);
    return as_int64_index(t, "attention", arg).contiguous();
  }
  const at::Tensor host = checked_index(t, arg, low, high, high_inclusive);
  if (t.device() == device && t.scalar_type() == at::kLong && t.is_contiguous()) return t;
  // Through pinned memory: an asynchronous copy that does not wait for the stream.
  return host.pin_memory().to(device, at::kLong, /*non_blocking=*/true);
}

}  // namespace

at::Tensor attention_cuda(const at::Tensor& q,                         // [B, Hq, Tq, D]
                          const at::Tensor& k,                         // [Bkv, Hkv, Tk, D]
                          const at::Tensor& v,                         // [Bkv, Hkv, Tk, D]
                          const std::optional<at::Tensor>& kv_start,   // [B] int32/int64
                          const std::optional<at::Tensor>& kv_rows,    // [B] int32/int64
                          bool causal, std::optional<double> scale, std::optional<int64_t> window) {
  TORCH_CHECK(q.is_cuda(), "margingate.attention: q must be a CUDA tensor, got ", q.device());
  const std::pair<const char*, const at::Tensor*> kv[2] = {{"k", &k}, {"v", &v}};
  for (const auto& [name, t] : kv) {
    TORCH_CHECK(t->device() == q.device(), "margingate.attention: ", name, " is on ", t->device(), " but q is on ",
                q.device(), "; all arguments must be on one device");
  }
  const std::pair<const char*, const std::optional<at::Tensor>*> indices[2] = {{"kv_start", &kv_start},
                                                                              {"kv_rows", &kv_rows}};
  for (const auto& [name, t] : indices) {
    TORCH_CHECK(!t->has_value() || (*t)->device() == q.device() || (*t)->device().is_cpu(),
                "margingate.attention: ", name, " is on ", (*t)->device(), " but q is on ", q.device(),
                "; it must be on that device or the CPU");
  }
  const AttentionOptions opt = check_attention_args(q, k, v, kv_start, kv_rows, causal, scale, window);
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool capturing = stream_is_capturing(stream);
  at::Tensor start_dev, rows_dev;
  if (kv_rows.has_value()) rows_dev = index_on_device(*kv_rows, "kv_rows", 0, k.size(0), false, q.device(), capturing);
  if (kv_start.has_value()) {
    start_dev = index_on_device(*kv_start, "kv_start", 0, k.size(2), true, q.device(), capturing);
  }

  at::Tensor o = at::empty({B, Hq, Tq, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (o.numel() == 0) return o;
  const AttentionArgs a = attention_args(opt.dtype, q, k, v, o, rows_dev.defined() ? rows_dev.data_ptr<int64_t>() : nullptr,
                                         start_dev.defined() ? start_dev.data_ptr<int64_t>() : nullptr, causal,
                                         opt.scale, opt.window);
  const size_t ws_bytes = ::margingate::cuda::attention_workspace_bytes(a);
  at::Tensor workspace;
  if (ws_bytes > 0) workspace = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  C10_CUDA_CHECK(::margingate::cuda::attention(a, ws_bytes > 0 ? workspace.data_ptr() : nullptr, ws_bytes, stream));
  return o;
}

TORCH_LIBRARY_IMPL(margingate, CUDA, m) { m.impl("attention", &attention_cuda); }

}  // namespace margingate::binding
