// Every margingate op schema, defined once. Backends register their kernels in
// csrc/cpu/*.cpp and csrc/cuda/*.cpp; Python fake (meta) kernels live in
// python/margingate/ops.py next to the wrappers.
#include <string>

#include "torch_utils.h"

namespace margingate::binding {

namespace {
std::string build_info() {
  std::string s = "torch=" MARGINGATE_TORCH_VERSION ";compiler=" MARGINGATE_COMPILER;
  s += ";simd=";
  s += simd_level_name(simd_level());
  s += ";simd_supported=";
  s += simd_level_name(simd_level_supported());
  s += ";simd_reason=";
  s += simd_level_reason();
  // Whether at::parallel_for, inlined into our kernels' bindings, uses torch's intra-op threads:
  // only when this file was compiled with OpenMP (torch's OpenMP builds) or against torch's
  // native pool. Without it every op runs on one thread, silently (CMakeLists.txt links OpenMP).
#ifdef INTRA_OP_PARALLEL
  s += ";parallel=1";
#else
  s += ";parallel=0";
#endif
#ifdef MARGINGATE_WITH_CUDA
  s += ";cuda=1";
#else
  s += ";cuda=0";
#endif
  return s;
}
}  // namespace

TORCH_LIBRARY(margingate, m) {
  // Top-1 index (torch.argmax), top-2 index and value(top1) - value(top2) per row, one pass.
  m.def("margin(Tensor logits) -> (Tensor top1, Tensor top2, Tensor margin)");
  // y = x @ weight^T (+ bias) with a fixed K-reduction order: every row is batch-invariant.
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  // GQA attention, queries at the last Tq positions, left padding via kv_start, optional
  // sliding window; batch-, padding-, capacity- and query-count-invariant. kv_rows[b] (optional)
  // names the row of k/v that query row b reads, so a verifier can attend over a few rows of a
  // shared batch cache without copying them.
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? kv_start=None, Tensor? kv_rows=None, *, "
      "bool causal=True, "
      "float? scale=None, int? window=None) -> Tensor");
  // In place: k_cache[rows[i], :, positions[i], :] = k_new[i] (and v); all indices checked first.
  m.def(
      "kv_patch_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rows, Tensor positions, "
      "Tensor k_new, Tensor v_new) -> ()");
  // Seeded Gumbel-max sampling (T > 0; T = 0 is greedy) with top_k / min_p, one row at a time:
  // token, noised runner-up, T * (noised top-1 - top-2) and the truncation cut-off's margin, both
  // in logit units (cpp/include/margingate/sampling.h).
  m.def(
      "sample_margin(Tensor logits, Tensor seed, Tensor position, Tensor temperature, Tensor? top_k=None, "
      "Tensor? min_p=None) -> (Tensor token, Tensor runner_up, Tensor margin, Tensor cutoff_margin)");
  // Build facts: torch version, compiler, SIMD level in use (and why), intra-op threads, CUDA.
  m.def("build_info() -> str", &build_info);
}

}  // namespace margingate::binding

#ifndef MARGINGATE_WITH_CUDA
// A CPU-only build still answers a CUDA tensor with a clear message instead of torch's generic
// "could not run ... with arguments from the 'CUDA' backend".
namespace margingate::binding {
namespace {
void cuda_not_built(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, "margingate.", op.schema().name().substr(std::string("margingate::").size()),
              ": got a CUDA tensor, but this margingate build has no CUDA kernels (it was built "
              "without nvcc or against a CPU-only torch; see margingate.build_info())");
}
}  // namespace

TORCH_LIBRARY_IMPL(margingate, CUDA, m) {
  for (const char* name : {"margin", "linear", "attention", "kv_patch_", "sample_margin"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&cuda_not_built>());
  }
}
}  // namespace margingate::binding
#endif
