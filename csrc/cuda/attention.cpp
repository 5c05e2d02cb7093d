// CUDA registration of margingate::attention.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>

#include "attention_args.h"
#include "margingate/cuda/attention.h"

namespace margingate::binding {

namespace {
// An optional [B] index tensor as int64 on `device` (kv_start, kv_rows); CPU tensors are moved.
at::Tensor index_on_device(const at::Tensor& t, int64_t B, const at::Device& device, const char* arg) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "margingate.attention: ", arg, " must be 1-D with ", B,
              " entries (one per row of q), got shape ", t.sizes());
  TORCH_CHECK(t.device() == device || t.device().is_cpu(), "margingate.attention: ", arg, " is on ", t.device(),
              " but q is on ", device, "; it must be on that device or the CPU");
  return as_int64_index(t, "attention", arg).to(device).contiguous();
}
}  // namespace

at::Tensor attention_cuda(const at::Tensor& q,                         // [B, Hq, Tq, D]
                          const at::Tensor& k,                         // [Bkv, Hkv, Tk, D]
                          const at::Tensor& v,                         // [Bkv, Hkv, Tk, D]
                          const std::optional<at::Tensor>& kv_start,   // [B] int32/int64
                          const std::optional<at::Tensor>& kv_rows,    // [B] int32/int64
                          bool causal, std::optional<double> scale, std::optional<int64_t> window) {
  const std::pair<const char*, const at::Tensor*> qkv[3] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, t] : qkv) {
    TORCH_CHECK(t->dim() == 4, "margingate.attention: ", name, " must be 4-D [batch, heads, seq, head_dim], got ",
                t->dim(), "-D");
  }
  const DType dtype = core_dtype(q, "attention", "q");
  for (const auto& [name, t] : qkv) {
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), "margingate.attention: ", name, " has dtype ",
                     t->scalar_type(), " but q has ", q.scalar_type());
  }
  TORCH_CHECK(q.is_cuda(), "margingate.attention: q must be a CUDA tensor, got ", q.device());
  for (const auto& [name, t] : qkv) {
    TORCH_CHECK(t->device() == q.device(), "margingate.attention: ", name, " is on ", t->device(), " but q is on ",
                q.device(), "; all arguments must be on one device");
  }
  TORCH_CHECK(k.sizes() == v.sizes(), "margingate.attention: k and v must have the same shape, got ", k.sizes(),
              " and ", v.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t Bkv = k.size(0), Hkv = k.size(1), Tk = k.size(2);
  TORCH_CHECK(k.size(3) == D, "margingate.attention: k has head_dim ", k.size(3), " but q has ", D);
  TORCH_CHECK(D >= 1 && D <= 256, "margingate.attention: head_dim must be in [1, 256] on CUDA, got ", D);
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, "margingate.attention: q heads (", Hq,
              ") must be a multiple of k/v heads (", Hkv, ")");
  TORCH_CHECK(Tq <= Tk, "margingate.attention: q has ", Tq, " queries but k/v only ", Tk,
              " positions (the queries are the last Tq positions)");
  TORCH_CHECK(kv_rows.has_value() || Bkv == B, "margingate.attention: k/v have batch ", Bkv, " but q has ", B,
              "; pass kv_rows to map q rows to k/v rows");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor start_dev, rows_dev;
  if (kv_start.has_value()) start_dev = index_on_device(*kv_start, B, q.device(), "kv_start");
  if (kv_rows.has_value()) rows_dev = index_on_device(*kv_rows, B, q.device(), "kv_rows");

  at::Tensor o = at::empty({B, Hq, Tq, D}, q.options());
  if (B == 0 || Tq == 0) return o;
  const AttentionArgs a = attention_args(
      dtype, q, k, v, o, kv_rows.has_value() ? rows_dev.data_ptr<int64_t>() : nullptr,
      kv_start.has_value() ? start_dev.data_ptr<int64_t>() : nullptr, causal,
      scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D)), window.has_value() ? *window : 0);
  const size_t ws_bytes = ::margingate::cuda::attention_workspace_bytes(a);
  at::Tensor workspace;
  if (ws_bytes > 0) workspace = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  C10_CUDA_CHECK(::margingate::cuda::attention(a, ws_bytes > 0 ? workspace.data_ptr() : nullptr, ws_bytes,
                                               c10::cuda::getCurrentCUDAStream()));
  return o;
}

TORCH_LIBRARY_IMPL(margingate, CUDA, m) { m.impl("attention", &attention_cuda); }

}  // namespace margingate::binding
