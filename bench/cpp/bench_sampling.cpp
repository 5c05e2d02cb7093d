// sample_margin rows of the C++ benchmark: T = 0.7, no truncation / top_k = 50 / min_p = 0.05.
#include <memory>
#include <string>

#include "harness.h"
#include "margingate/sampling.h"

namespace margingate::bench {
namespace {

const Register sampling_cases("sample_margin", [](const Parallel& parallel, std::vector<Case>& out) {
  const DType dtype = DType::kBFloat16;
  struct Truncation {
    const char* name;
    int64_t top_k;
    float min_p;
  };
  for (const Truncation tr : {Truncation{"none", 0, 0.0f}, Truncation{"top_k=50", 50, 0.0f},
                              Truncation{"min_p=0.05", 0, 0.05f}}) {
    for (int64_t V : {128256, 262144}) {
      for (int64_t B : {1, 8, 64}) {
        auto pool = std::make_shared<std::vector<std::vector<char>>>();
        void* data = scratch(*pool, dtype, B * V);
        fill_random(dtype, data, B * V, 99 + V + B, 6.0f);
        auto ints = std::make_shared<std::vector<int64_t>>(5 * B);  // seed, position, top_k, token, runner_up
        auto floats = std::make_shared<std::vector<float>>(4 * B);  // temperature, min_p, margin, cutoff
        for (int64_t r = 0; r < B; ++r) {
          (*ints)[r] = r;
          (*ints)[B + r] = 17;
          (*ints)[2 * B + r] = tr.top_k;
          (*floats)[r] = 0.7f;
          (*floats)[B + r] = tr.min_p;
        }
        out.push_back({"sample_margin", dtype_name(dtype),
                       std::string(tr.name) + " B=" + std::to_string(B) + " V=" + std::to_string(V),
                       static_cast<double>(B * V * dtype_size(dtype)), 0.0, [=, &parallel] {
                         (void)pool;
                         SamplingArgs a;
                         a.dtype = dtype;
                         a.logits = data;
                         a.rows = B;
                         a.vocab = V;
                         a.row_stride = V;
                         a.seed = ints->data();
                         a.position = ints->data() + B;
                         a.top_k = ints->data() + 2 * B;
                         a.temperature = floats->data();
                         a.min_p = floats->data() + B;
                         a.token = ints->data() + 3 * B;
                         a.runner_up = ints->data() + 4 * B;
                         a.margin = floats->data() + 2 * B;
                         a.cutoff_margin = floats->data() + 3 * B;
                         if (!sample_margin(a, parallel).ok()) std::abort();
                       }});
      }
    }
  }
});

}  // namespace
}  // namespace margingate::bench
