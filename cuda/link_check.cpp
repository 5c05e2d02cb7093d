// Links every CUDA launcher into an executable (so a missing definition or instantiation fails the
// CPU-only CI build) and runs the host-side parts that need no GPU: kv_patch_ index validation,
// and argument rejection before any launch.
#include <cstdio>

#include "margingate/cuda/attention.h"
#include "margingate/cuda/kv_patch.h"
#include "margingate/cuda/linear.h"
#include "margingate/cuda/margin.h"
#include "margingate/cuda/sampling.h"

int main() {
  using namespace margingate;
  int failures = 0;
  auto expect = [&](bool ok, const char* what) {
    if (!ok) {
      std::printf("FAILED: %s\n", what);
      ++failures;
    }
  };
  CacheView cache;
  cache.batch = 2;
  cache.heads = 1;
  cache.capacity = 4;
  cache.head_dim = 8;
  ColumnsView cols;
  cols.n = 2;
  cols.heads = 1;
  cols.head_dim = 8;
  const int64_t rows_ok[2] = {0, 1}, pos_ok[2] = {3, 3};
  const int64_t rows_bad[2] = {0, 2}, pos_dup[2] = {1, 1}, rows_dup[2] = {1, 1};
  expect(cuda::kv_patch_validate(cache, cache, rows_ok, pos_ok, 2, cols, cols).ok(), "valid kv_patch indices");
  expect(cuda::kv_patch_validate(cache, cache, rows_bad, pos_ok, 2, cols, cols).message.find("rows[1] = 2") !=
             std::string::npos,
         "out-of-range row is named");
  expect(cuda::kv_patch_validate(cache, cache, rows_dup, pos_dup, 2, cols, cols).message.find("more than once") !=
             std::string::npos,
         "duplicate (row, position) is rejected");
  // Out-of-contract arguments are refused before touching the device.
  expect(cuda::margin(DType::kBFloat16, nullptr, 1, 1, 1, 1, nullptr, nullptr, nullptr, nullptr, 0, nullptr) ==
             cudaErrorInvalidValue,
         "margin rejects vocab < 2");
  SamplingArgs sa;
  sa.rows = 1;
  sa.vocab = 1;
  expect(cuda::sample_margin(sa, nullptr) == cudaErrorInvalidValue, "sample_margin rejects vocab < 2");
  LinearArgs la;
  la.M = -1;
  expect(cuda::linear(la, nullptr) == cudaErrorInvalidValue, "linear rejects M < 0");
  AttentionArgs aa;
  aa.Hq = 3;
  aa.Hkv = 2;
  aa.D = 64;
  expect(cuda::attention(aa, nullptr, 0, nullptr) == cudaErrorInvalidValue, "attention rejects Hq % Hkv != 0");
  expect(cuda::attention_workspace_bytes(aa) == 0, "no workspace for invalid arguments");
  std::printf(failures == 0 ? "margingate_cuda_link_check: ok\n" : "margingate_cuda_link_check: %d failures\n",
              failures);
  return failures == 0 ? 0 : 1;
}
