// Internal to the margin kernels: the running top-2 state of a row segment and its merge rule.
#pragma once

#include <cmath>
#include <cstdint>

#include "margingate/common.h"

namespace margingate::margin_impl {

// Best and second-best of a segment, ordered by (value descending, index ascending); index -1 =
// empty. NaN values are not ranked here: a segment only reports that it saw one, and such rows are
// redone by the exact scalar path (NaN is rare and must follow torch.argmax's rules).
struct Top2 {
  float v1 = -INFINITY;
  int64_t i1 = -1;
  float v2 = -INFINITY;
  int64_t i2 = -1;
  bool has_nan = false;
};

// Does candidate (v, i) rank above (w, j)? Empty (j < 0) ranks below everything.
inline bool ranks_above(float v, int64_t i, float w, int64_t j) {
  if (i < 0) return false;
  if (j < 0) return true;
  return v > w || (v == w && i < j);
}

inline void offer(Top2& t, float v, int64_t i) {
  if (ranks_above(v, i, t.v1, t.i1)) {
    t.v2 = t.v1;
    t.i2 = t.i1;
    t.v1 = v;
    t.i1 = i;
  } else if (ranks_above(v, i, t.v2, t.i2)) {
    t.v2 = v;
    t.i2 = i;
  }
}

// Merging is exact (a max, no rounding), so any split of a row gives the same answer.
inline Top2 merge(Top2 a, const Top2& b) {
  offer(a, b.v1, b.i1);
  offer(a, b.v2, b.i2);
  a.has_nan = a.has_nan || b.has_nan;
  return a;
}

// Segment kernels: scan logits[begin, end) of a contiguous row. `dtype` selects the storage.
Top2 segment_scalar(DType dtype, const void* row, int64_t begin, int64_t end, int64_t col_stride);
// The SIMD scans read a contiguous row (col_stride 1); each exists only on its architecture.
#if MARGINGATE_ARCH_X86
Top2 segment_avx2(DType dtype, const void* row, int64_t begin, int64_t end);
Top2 segment_avx512(DType dtype, const void* row, int64_t begin, int64_t end);
#endif
#if MARGINGATE_ARCH_ARM64
Top2 segment_neon(DType dtype, const void* row, int64_t begin, int64_t end);
#endif

}  // namespace margingate::margin_impl
