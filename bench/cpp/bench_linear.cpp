// linear rows of the C++ benchmark: the decode and prefill shapes of bench/python/bench_linear.py.
// GB/s counts the weight bytes (what decode must stream), GFLOP/s the 2*M*N*K multiply-adds.
#include <memory>
#include <string>

#include "harness.h"
#include "margingate/linear.h"

namespace margingate::bench {
namespace {

const Register linear_cases("linear", [](const Parallel& parallel, std::vector<Case>& out) {
  const int64_t shapes[][2] = {{640, 2048}, {2048, 640}, {1536, 8960}, {4096, 4096}};
  for (DType dtype : {DType::kBFloat16, DType::kFloat32}) {
    for (const auto& s : shapes) {
      const int64_t K = s[0], N = s[1];
      auto pool = std::make_shared<std::vector<std::vector<char>>>();
      // scratch() buffers stay put for the pool's lifetime.
      void* w = scratch(*pool, dtype, N * K);
      fill_random(dtype, w, N * K, 7 + K + N);
      for (int64_t M : {1, 4, 16, 64, 512}) {
        void* x = scratch(*pool, dtype, M * K);
        void* y = scratch(*pool, dtype, M * N);
        fill_random(dtype, x, M * K, 11 + M);
        LinearArgs a;
        a.dtype = dtype;
        a.x = x;
        a.M = M;
        a.K = K;
        a.x_row_stride = K;
        a.w = w;
        a.N = N;
        a.w_row_stride = K;
        a.y = y;
        a.y_row_stride = N;
        out.push_back({"linear", dtype_name(dtype),
                       "M=" + std::to_string(M) + " K=" + std::to_string(K) + " N=" + std::to_string(N),
                       static_cast<double>(N * K * dtype_size(dtype)), 2.0 * M * N * K, [=, &parallel] {
                         (void)pool;
                         Status st = linear(a, parallel);
                         if (!st.ok()) std::abort();
                       }});
      }
    }
  }
});

}  // namespace
}  // namespace margingate::bench
