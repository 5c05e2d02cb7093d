// Links every CUDA launcher into an executable (so a missing definition or instantiation fails the
// CPU-only CI build) and runs the host-side parts that need no GPU: kv_patch_ index validation,
// argument rejection before any launch, and margin's column arithmetic up to V = 2^31 - 1.
#include <climits>
#include <cstdio>

#include "margingate/cuda/attention.h"
#include "margingate/cuda/kv_patch.h"
#include "margingate/cuda/linear.h"
#include "margingate/cuda/margin.h"
#include "margingate/cuda/sampling.h"
#include "src/margin_plan.h"

namespace {

// The segments of a row must tile [0, vocab) exactly, in order, whatever the row count and SM
// count: a gap skips columns (the V near 2^31 - 1 bug: the last segment's end wrapped in int32).
bool margin_segments_tile_the_row(int64_t rows, int64_t vocab, int64_t sms) {
  using namespace margingate::cuda::detail;
  const MarginPlan p = margin_plan(rows, vocab, sms);
  if (p.segments < 1 || p.seg_len < 1) return false;
  if (p.segments > 1 && (p.seg_len % 8 != 0 || rows * p.segments > INT_MAX)) return false;
  int64_t next = 0;
  for (int64_t s = 0; s < p.segments; ++s) {
    const ColumnRange c = margin_segment(p, vocab, s);
    if (c.begin != next || c.end <= c.begin || c.end > vocab) return false;
    next = c.end;
  }
  return next == vocab;
}

}  // namespace

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
  // margin's segments, for the sizes of the contract (2 <= V <= 2^31 - 1) on small and large GPUs.
  const int64_t vocabs[] = {2, 7, 4096, 4097, 128256, 152064, 262147, int64_t{1} << 30, INT_MAX - 8, INT_MAX};
  const int64_t row_counts[] = {1, 2, 3, 65, 66, 1000};
  const int64_t sm_counts[] = {1, 108, 132, 170};
  for (int64_t vocab : vocabs)
    for (int64_t rows : row_counts)
      for (int64_t sms : sm_counts) {
        if (!margin_segments_tile_the_row(rows, vocab, sms)) {
          std::printf("FAILED: margin segments of rows = %lld, V = %lld, SMs = %lld do not tile the row\n",
                      static_cast<long long>(rows), static_cast<long long>(vocab), static_cast<long long>(sms));
          ++failures;
        }
      }
  {
    // One row of V = 2^31 - 1 on 132 SMs is split, and its last segment ends at column V.
    using namespace margingate::cuda::detail;
    const MarginPlan p = margin_plan(1, INT_MAX, 132);
    expect(p.segments > 1 && margin_segment(p, INT_MAX, p.segments - 1).end == INT_MAX,
           "one row of 2^31 - 1 columns: the last segment ends at the last column");
  }
  std::printf(failures == 0 ? "margingate_cuda_link_check: ok\n" : "margingate_cuda_link_check: %d failures\n",
              failures);
  return failures == 0 ? 0 : 1;
}
