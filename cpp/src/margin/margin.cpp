// margin: top-1/top-2 of each row in one pass, the scalar path and the dispatcher.
//
// A row (or, for small batches, a segment of a row) is scanned once keeping a running top-2;
// segments are merged exactly, so the answer never depends on the split, the SIMD level or the
// number of threads. NaN follows torch.argmax: the first NaN is top-1 and the margin is NaN.
#include <algorithm>
#include <vector>

#include "margin_impl.h"
#include "margingate/margin.h"

namespace margingate {
namespace margin_impl {

namespace {
template <typename T>
Top2 scan(const T* row, int64_t begin, int64_t end, int64_t col_stride) {
  Top2 t;
  for (int64_t c = begin; c < end; ++c) {
    float x = to_float(row[c * col_stride]);
    if (std::isnan(x)) {
      t.has_nan = true;
      continue;
    }
    offer(t, x, c);
  }
  return t;
}
}  // namespace

Top2 segment_scalar(DType dtype, const void* row, int64_t begin, int64_t end, int64_t col_stride) {
  switch (dtype) {
    case DType::kFloat32: return scan(static_cast<const float*>(row), begin, end, col_stride);
    case DType::kFloat16: return scan(static_cast<const fp16_t*>(row), begin, end, col_stride);
    case DType::kBFloat16: return scan(static_cast<const bf16_t*>(row), begin, end, col_stride);
  }
  return {};
}

// The exact answer for a row holding NaN: NaN ranks above every number (torch.argmax), the first
// NaN wins, the next NaN (or the best number) is second, and the margin is NaN.
static void nan_row(DType dtype, const void* row, int64_t vocab, int64_t col_stride, int64_t* top1,
                    int64_t* top2) {
  int64_t first = -1, second = -1;
  for (int64_t c = 0; c < vocab && second < 0; ++c) {
    float x = 0.f;
    const char* p = static_cast<const char*>(row) + c * col_stride * dtype_size(dtype);
    switch (dtype) {
      case DType::kFloat32: x = *reinterpret_cast<const float*>(p); break;
      case DType::kFloat16: x = to_float(*reinterpret_cast<const fp16_t*>(p)); break;
      case DType::kBFloat16: x = to_float(*reinterpret_cast<const bf16_t*>(p)); break;
    }
    if (std::isnan(x)) (first < 0 ? first : second) = c;
  }
  *top1 = first;
  if (second >= 0) {
    *top2 = second;
  } else {
    *top2 = segment_scalar(dtype, row, 0, vocab, col_stride).i1;
  }
}

}  // namespace margin_impl

Status margin(DType dtype, const void* logits, int64_t rows, int64_t vocab, int64_t row_stride,
              int64_t col_stride, int64_t* top1, int64_t* top2, float* margin_out,
              const Parallel& parallel) {
  using namespace margin_impl;
  if (rows < 0) return Status::error("margingate.margin: negative number of rows");
  if (vocab < 2) return Status::error("margingate.margin: logits must have at least 2 columns");
  if (vocab > INT32_MAX) return Status::error("margingate.margin: at most 2^31 - 1 columns are supported");
  if (rows == 0) return Status::success();
  // The SIMD scans want a contiguous row; any other stride takes the scalar scan (same answer).
  using Segment = Top2 (*)(DType, const void*, int64_t, int64_t);
  Segment simd = nullptr;
  if (col_stride == 1) {
    switch (simd_level()) {
#if MARGINGATE_ARCH_X86
      case SimdLevel::kAvx512: simd = &segment_avx512; break;
      case SimdLevel::kAvx2: simd = &segment_avx2; break;
#endif
#if MARGINGATE_ARCH_ARM64
      case SimdLevel::kNeon: simd = &segment_neon; break;
#endif
      default: break;
    }
  }
  const int64_t esize = dtype_size(dtype);

  // Split each row into `segments` pieces when there are fewer rows than threads, so a single
  // long row still uses every core. Pieces are at least 16K elements (segment overhead is a
  // handful of vector ops).
  int64_t segments = 1;
  if (rows < parallel.num_threads) {
    segments = std::max<int64_t>(1, std::min<int64_t>(parallel.num_threads, vocab / 16384));
  }
  std::vector<Top2> parts(static_cast<size_t>(rows * segments));
  const int64_t seg_len = (vocab + segments - 1) / segments;
  parallel.for_range(rows * segments, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r = w / segments, s = w % segments;
      const void* row = static_cast<const char*>(logits) + r * row_stride * esize;
      const int64_t b = s * seg_len, e = std::min(vocab, b + seg_len);
      parts[w] = simd != nullptr ? simd(dtype, row, b, e) : segment_scalar(dtype, row, b, e, col_stride);
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    Top2 t = parts[r * segments];
    for (int64_t s = 1; s < segments; ++s) t = merge(t, parts[r * segments + s]);
    if (t.has_nan) {
      const void* row = static_cast<const char*>(logits) + r * row_stride * esize;
      nan_row(dtype, row, vocab, col_stride, &top1[r], &top2[r]);
      margin_out[r] = NAN;
      continue;
    }
    top1[r] = t.i1;
    top2[r] = t.i2;
    // Equal values (also equal infinities) are a tie: exactly 0, never inf - inf = NaN.
    margin_out[r] = t.v1 == t.v2 ? 0.0f : t.v1 - t.v2;
  }
  return Status::success();
}

}  // namespace margingate
