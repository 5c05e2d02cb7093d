// How the ops meet autograd and the version counters, the way aten's own ops do.
//
// None of the ops has a backward (they serve inference), but a custom op left without an Autograd
// kernel gets torch's permissive fallback: outputs whose backward only warns, and in-place writes
// that autograd never hears of. So:
// - Autograd, margin/linear/attention: torch's "not implemented" kernel, as aten uses for its ops
//   without a derivative: outputs computed from inputs that require grad get a grad_fn whose
//   backward raises.
// - Autograd, kv_patch_: what aten's generated kernel does for an in-place op without a derivative
//   (torch's boxed fallback only recognises in-place ops by a returned alias, and kv_patch_
//   returns nothing): refuse a leaf (or a view of a leaf) that requires grad while grad mode is
//   on, and rebase a patched cache onto a grad_fn whose backward raises when any argument
//   requires grad, so no gradient flows through the overwritten columns.
// - ADInplaceOrView, kv_patch_: bump the version counters of k_cache and v_cache, so a tensor
//   saved for backward before the patch raises "modified by an inplace operation" instead of
//   giving a silently wrong gradient. This runs in inference mode too, for normal tensors, as
//   aten's does. Inference tensors have no version counter: patching one outside inference mode
//   is refused (aten refuses it as well), here before anything is written.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <utility>
#include <vector>

#include "torch_utils.h"

namespace margingate::binding {

namespace {

using KvPatchSignature = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&);

const c10::TypedOperatorHandle<KvPatchSignature>& kv_patch_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("margingate::kv_patch_", "").typed<KvPatchSignature>();
  return op;
}

void kv_patch_autograd(c10::DispatchKeySet keys, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& rows, const at::Tensor& positions, const at::Tensor& k_new,
                       const at::Tensor& v_new) {
  namespace ag = torch::autograd;
  std::vector<at::Tensor> requiring_grad;
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor* t : {&k_cache, &v_cache, &k_new, &v_new}) {
      if (t->requires_grad()) requiring_grad.push_back(*t);
    }
  }
  const bool any_requires_grad = !requiring_grad.empty();
  const std::pair<const char*, const at::Tensor*> caches[2] = {{"k_cache", &k_cache}, {"v_cache", &v_cache}};
  for (const auto& [name, t] : caches) {
    switch (ag::can_mutate_inplace(*t, any_requires_grad)) {
      case ag::can_mutate_inplace_result::is_leaf:
        TORCH_CHECK(false, "margingate.kv_patch_: ", name,
                    " is a leaf tensor that requires grad; like aten's in-place ops, kv_patch_ refuses to "
                    "overwrite it (patch under torch.no_grad(), or patch a tensor that does not require grad)");
        break;
      case ag::can_mutate_inplace_result::view_of_leaf:
        TORCH_CHECK(false, "margingate.kv_patch_: ", name,
                    " is a view of a leaf tensor that requires grad; like aten's in-place ops, kv_patch_ refuses "
                    "to overwrite it (patch under torch.no_grad())");
        break;
      default:
        ag::check_inplace(*t, any_requires_grad);  // aten's own rules for other views
    }
  }
  c10::intrusive_ptr<ag::NotImplemented> grad_fn;
  if (any_requires_grad) {
    grad_fn = c10::make_intrusive<ag::NotImplemented>("margingate::kv_patch_");
    grad_fn->set_next_edges(ag::collect_next_edges(requiring_grad));
  }
  {
    at::AutoDispatchBelowAutograd guard;  // the next stop is ADInplaceOrView: the version bump
    kv_patch_op().redispatch(keys & c10::after_autograd_keyset, k_cache, v_cache, rows, positions, k_new, v_new);
  }
  if (grad_fn) ag::rebase_history(std::vector<at::Tensor>{k_cache, v_cache}, grad_fn);
}

void kv_patch_inplace_or_view(c10::DispatchKeySet keys, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& rows, const at::Tensor& positions, const at::Tensor& k_new,
                              const at::Tensor& v_new) {
  if (!c10::InferenceMode::is_enabled()) {
    const std::pair<const char*, const at::Tensor*> caches[2] = {{"k_cache", &k_cache}, {"v_cache", &v_cache}};
    for (const auto& [name, t] : caches) {
      TORCH_CHECK(!t->is_inference(), "margingate.kv_patch_: ", name,
                  " is an inference tensor (made under torch.inference_mode()); like aten's in-place ops, "
                  "kv_patch_ updates one only inside torch.inference_mode() (or patch a clone made outside it)");
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    kv_patch_op().redispatch(keys & c10::after_ADInplaceOrView_keyset, k_cache, v_cache, rows, positions, k_new,
                             v_new);
  }
  torch::autograd::increment_version(k_cache);
  torch::autograd::increment_version(v_cache);
}

}  // namespace

TORCH_LIBRARY_IMPL(margingate, Autograd, m) {
  for (const char* name : {"margin", "linear", "attention"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
  m.impl("kv_patch_", TORCH_FN(kv_patch_autograd));
}

TORCH_LIBRARY_IMPL(margingate, ADInplaceOrView, m) { m.impl("kv_patch_", TORCH_FN(kv_patch_inplace_or_view)); }

}  // namespace margingate::binding
