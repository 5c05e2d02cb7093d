// Internal to cuda/src/margin.cu: how a row of the margin kernel is cut into segments, and which
// columns a segment covers. Plain C++ usable on the host and the device, so that the column
// arithmetic near V = 2^31 - 1 is unit-tested on the host (cuda/link_check.cpp) without a GPU.
//
// All column arithmetic is int64: with V up to 2^31 - 1 a segment start plus its length, or a
// thread's next column, exceeds INT32_MAX. Only a finished column index (< V) is narrowed to int.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define MARGINGATE_HD __host__ __device__ __forceinline__
#else
#define MARGINGATE_HD inline
#endif

namespace margingate::cuda::detail {

struct MarginPlan {
  int64_t segments = 1;  // blocks per row
  int64_t seg_len = 0;   // columns per segment (the last one may be shorter)
};

// Split rows only when they would leave more than half of the SMs idle; then enough segments to
// cover every SM about twice, each a whole number of 16-byte vectors (a multiple of 8 elements)
// and at least 4096 elements so the per-block merge stays negligible. Grid sizing only: any split
// gives the same answer (the merge is an exact selection).
MARGINGATE_HD MarginPlan margin_plan(int64_t rows, int64_t vocab, int64_t sms) {
  MarginPlan p;
  p.seg_len = vocab;
  if (rows <= 0 || vocab <= 0 || 2 * rows >= sms) return p;
  const int64_t want = (2 * sms + rows - 1) / rows;
  const int64_t max_by_size = (vocab + 4095) / 4096;
  const int64_t segments = want < max_by_size ? want : max_by_size;
  if (segments <= 1) return p;
  int64_t len = (vocab + segments - 1) / segments;
  len = (len + 7) / 8 * 8;
  p.seg_len = len;
  p.segments = (vocab + len - 1) / len;
  if (p.segments <= 1) {
    p.segments = 1;
    p.seg_len = vocab;
  }
  return p;
}

// Columns [begin, end) of segment `segment` of a row of `vocab` columns.
struct ColumnRange {
  int64_t begin, end;
};
MARGINGATE_HD ColumnRange margin_segment(const MarginPlan& p, int64_t vocab, int64_t segment) {
  const int64_t begin = segment * p.seg_len;
  const int64_t end = begin + p.seg_len < vocab ? begin + p.seg_len : vocab;
  return ColumnRange{begin, end};
}

}  // namespace margingate::cuda::detail
