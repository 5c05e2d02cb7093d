// CPU registration of margingate::attention: every user-facing check, then one call to the core.
#include <cmath>
#include <optional>

#include "attention_args.h"

namespace margingate::binding {

namespace {

// Reads a [B] index tensor (int32/int64) as int64 and checks every value lies in [low, high].
at::Tensor checked_index(const at::Tensor& t, const char* arg, int64_t B, int64_t low, int64_t high,
                         bool high_inclusive) {
  TORCH_CHECK(t.device().is_cpu(), "margingate.attention: ", arg, " is on ", t.device(),
              " but this kernel runs on the CPU; all arguments must be on one device");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "margingate.attention: ", arg, " must have shape [", B,
              "] (one entry per query row), got ", t.sizes());
  at::Tensor r = as_int64_index(t, "attention", arg);
  const int64_t* p = r.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const bool ok = p[b] >= low && (high_inclusive ? p[b] <= high : p[b] < high);
    TORCH_CHECK_INDEX(ok, "margingate.attention: ", arg, "[", b, "] = ", p[b], " is out of range [", low, ", ",
                      high, high_inclusive ? "]" : ")");
  }
  return r;
}

}  // namespace

at::Tensor attention_cpu(const at::Tensor& q,                        // [B, Hq, Tq, D]
                         const at::Tensor& k,                        // [Bkv, Hkv, Tk, D]
                         const at::Tensor& v,                        // [Bkv, Hkv, Tk, D]
                         const std::optional<at::Tensor>& kv_start,  // [B] int32/int64, first valid key
                         const std::optional<at::Tensor>& kv_rows,   // [B] int32/int64, k/v row of query row b
                         bool causal, std::optional<double> scale, std::optional<int64_t> window) {
  const std::pair<const char*, const at::Tensor*> tensors[3] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t->dim() == 4, "margingate.attention: ", name, " must be 4-D [batch, heads, seq, head_dim], got ",
                t->dim(), "-D");
    TORCH_CHECK(t->device().is_cpu(), "margingate.attention: ", name, " is on ", t->device(),
                " but this kernel runs on the CPU; all arguments must be on one device");
  }
  const DType dtype = core_dtype(q, "attention", "q");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "margingate.attention: q, k and v must have one dtype, got ", q.scalar_type(), ", ",
                   k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), "margingate.attention: k and v must have the same shape, got ", k.sizes(),
              " and ", v.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t Bkv = k.size(0), Hkv = k.size(1), Tk = k.size(2);
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

  at::Tensor rows, start;
  if (kv_rows.has_value()) {
    rows = checked_index(*kv_rows, "kv_rows", B, 0, Bkv, false);
  } else {
    TORCH_CHECK(Bkv == B, "margingate.attention: k/v have ", Bkv, " rows but q has ", B,
                " (pass kv_rows to read other rows of a shared cache)");
  }
  if (kv_start.has_value()) start = checked_index(*kv_start, "kv_start", B, 0, Tk, true);

  at::Tensor out = at::empty({B, Hq, Tq, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;

  const AttentionArgs a = attention_args(dtype, q, k, v, out, rows.defined() ? rows.data_ptr<int64_t>() : nullptr,
                                         start.defined() ? start.data_ptr<int64_t>() : nullptr, causal, s,
                                         window.has_value() ? *window : 0);
  check_status(attention(a, torch_parallel()));
  return out;
}

TORCH_LIBRARY_IMPL(margingate, CPU, m) { m.impl("attention", &attention_cpu); }

}  // namespace margingate::binding
