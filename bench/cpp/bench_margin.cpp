// margin and kv_patch rows of the C++ benchmark.
#include <memory>
#include <string>

#include "harness.h"
#include "margingate/kv_patch.h"
#include "margingate/margin.h"

namespace margingate::bench {
namespace {

const Register margin_cases("margin", [](const Parallel& parallel, std::vector<Case>& out) {
  for (DType dtype : {DType::kBFloat16, DType::kFloat32}) {
    for (int64_t V : {32000, 128256, 262144}) {
      for (int64_t B : {1, 8, 64}) {
        auto pool = std::make_shared<std::vector<std::vector<char>>>();
        void* data = scratch(*pool, dtype, B * V);
        fill_random(dtype, data, B * V, 1234 + V + B, 8.0f);
        auto idx = std::make_shared<std::vector<int64_t>>(2 * B);
        auto mar = std::make_shared<std::vector<float>>(B);
        out.push_back({"margin", dtype_name(dtype), "B=" + std::to_string(B) + " V=" + std::to_string(V),
                       static_cast<double>(B * V * dtype_size(dtype)), 0.0, [=, &parallel] {
                         (void)pool;
                         Status s = margin(dtype, data, B, V, V, 1, idx->data(), idx->data() + B, mar->data(),
                                           parallel);
                         if (!s.ok()) std::abort();
                       }});
      }
    }
  }
});

const Register kv_patch_cases("kv_patch", [](const Parallel&, std::vector<Case>& out) {
  // The cost must not depend on the capacity T: the same n columns into caches of 512 and 8192.
  const DType dtype = DType::kBFloat16;
  const int64_t B = 8, H = 8, D = 128, n = 8;
  for (int64_t T : {512, 8192}) {
    auto pool = std::make_shared<std::vector<std::vector<char>>>();
    void* k = scratch(*pool, dtype, B * H * T * D);
    void* v = scratch(*pool, dtype, B * H * T * D);
    void* kn = scratch(*pool, dtype, n * H * D);
    void* vn = scratch(*pool, dtype, n * H * D);
    auto rows = std::make_shared<std::vector<int64_t>>();
    auto pos = std::make_shared<std::vector<int64_t>>();
    for (int64_t i = 0; i < n; ++i) {
      rows->push_back(i);
      pos->push_back(T - 1 - i);
    }
    CacheView kc{k, B, H, T, D, {H * T * D, T * D, D, 1}};
    CacheView vc{v, B, H, T, D, {H * T * D, T * D, D, 1}};
    ColumnsView kv{kn, n, H, D, {H * D, D, 1}};
    ColumnsView vv{vn, n, H, D, {H * D, D, 1}};
    out.push_back({"kv_patch", dtype_name(dtype),
                   "n=8 B=8 H=8 T=" + std::to_string(T) + " D=128", static_cast<double>(4 * n * H * D * 2), 0.0,
                   [=] {
                     (void)pool;
                     Status s = kv_patch(dtype, kc, vc, rows->data(), pos->data(), n, kv, vv);
                     if (!s.ok()) std::abort();
                   }});
  }
});

}  // namespace
}  // namespace margingate::bench
