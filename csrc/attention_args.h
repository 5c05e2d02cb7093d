// margingate::attention's argument checks and core call description, shared by the CPU and CUDA
// registrations (device rules differ and stay in each registration), so both reject the same
// input with the same message before anything runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>

#include "margingate/attention.h"
#include "torch_utils.h"

namespace margingate::binding {

// What the checks resolve: the core dtype, the scale (default 1/sqrt(D)) and the window (0 = none).
struct AttentionOptions {
  DType dtype;
  double scale;
  int64_t window;
};

// Ranks, dtypes, shapes, heads, head_dim, window and scale of q [B, Hq, Tq, D], k/v [Bkv, Hkv, Tk, D],
// and the shape and dtype of the optional [B] kv_start / kv_rows (their values: checked_index).
inline AttentionOptions check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const std::optional<at::Tensor>& kv_start,
                                             const std::optional<at::Tensor>& kv_rows, bool causal,
                                             std::optional<double> scale, std::optional<int64_t> window) {
  const std::pair<const char*, const at::Tensor*> tensors[3] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t->dim() == 4, "margingate.attention: ", name, " must be 4-D [batch, heads, seq, head_dim], got ",
                t->dim(), "-D");
  }
  const DType dtype = core_dtype(q, "attention", "q");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "margingate.attention: q, k and v must have one dtype, got ", q.scalar_type(), ", ",
                   k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), "margingate.attention: k and v must have the same shape, got ", k.sizes(),
              " and ", v.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3);
  const int64_t Bkv = k.size(0), Hkv = k.size(1);
  TORCH_CHECK(k.size(3) == D, "margingate.attention: q has head_dim ", D, " but k/v have ", k.size(3));
  TORCH_CHECK(D >= 1 && D <= 256, "margingate.attention: head_dim must be in [1, 256], got ", D);
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, "margingate.attention: the number of query heads (", Hq,
              ") must be a multiple of the number of kv heads (", Hkv, ")");
  if (window.has_value()) {
    TORCH_CHECK(*window >= 1, "margingate.attention: window must be >= 1, got ", *window);
    TORCH_CHECK(causal, "margingate.attention: a sliding window requires causal=True");
  }
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  TORCH_CHECK(std::isfinite(s), "margingate.attention: scale must be finite, got ", s);
  if (!kv_rows.has_value()) {
    TORCH_CHECK(Bkv == B, "margingate.attention: k/v have ", Bkv, " rows but q has ", B,
                " (pass kv_rows to read other rows of a shared cache)");
  }
  const std::pair<const char*, const std::optional<at::Tensor>*> indices[2] = {{"kv_start", &kv_start},
                                                                              {"kv_rows", &kv_rows}};
  for (const auto& [name, t] : indices) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == B, "margingate.attention: ", name, " must have shape [", B,
                "] (one entry per query row), got ", (*t)->sizes());
    TORCH_CHECK_TYPE((*t)->scalar_type() == at::kLong || (*t)->scalar_type() == at::kInt, "margingate.attention: ",
                     name, " must be int32 or int64, got ", (*t)->scalar_type());
  }
  return AttentionOptions{dtype, s, window.has_value() ? *window : 0};
}

// A host int64 copy of a [B] index tensor (already shape/dtype-checked) whose every value is checked
// to lie in [low, high] (or [low, high)). A tensor on a GPU is copied to the host, which waits for
// its stream: the price of raising here instead of trapping in the kernel.
inline at::Tensor checked_index(const at::Tensor& t, const char* arg, int64_t low, int64_t high,
                                bool high_inclusive) {
  at::Tensor r = as_int64_index(t, "attention", arg).cpu();
  const int64_t* p = r.data_ptr<int64_t>();
  for (int64_t b = 0; b < r.size(0); ++b) {
    const bool ok = p[b] >= low && (high_inclusive ? p[b] <= high : p[b] < high);
    TORCH_CHECK_INDEX(ok, "margingate.attention: ", arg, "[", b, "] = ", p[b], " is out of range [", low, ", ",
                      high, high_inclusive ? "]" : ")");
  }
  return r;
}

// q [B, Hq, Tq, D], k/v [Bkv, Hkv, Tk, D], out [B, Hq, Tq, D]; all already checked. kv_rows and
// kv_start are int64 pointers on the kernel's device, or nullptr; window <= 0 means none.
inline AttentionArgs attention_args(DType dtype, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& out, const int64_t* kv_rows, const int64_t* kv_start,
                                    bool causal, double scale, int64_t window) {
  AttentionArgs a;
  a.dtype = dtype;
  a.q = q.data_ptr();
  a.B = q.size(0);
  a.Hq = q.size(1);
  a.Tq = q.size(2);
  a.D = q.size(3);
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.Bkv = k.size(0);
  a.Hkv = k.size(1);
  a.Tk = k.size(2);
  for (int d = 0; d < 4; ++d) {
    a.q_stride[d] = q.stride(d);
    a.k_stride[d] = k.stride(d);
    a.v_stride[d] = v.stride(d);
    a.o_stride[d] = out.stride(d);
  }
  a.kv_rows = kv_rows;
  a.kv_start = kv_start;
  a.causal = causal;
  a.scale = static_cast<float>(scale);
  a.window = window;
  a.o = out.data_ptr();
  return a;
}

}  // namespace margingate::binding
