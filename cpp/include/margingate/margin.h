// margin: top-1 index, top-2 index and their logit gap, one fused pass per row.
#pragma once

#include "margingate/common.h"

namespace margingate {

// For each of `rows` rows of `vocab` logits (element (r, c) at logits[r*row_stride + c*col_stride],
// strides in elements):
//   top1[r]   = index of the largest value, the first one on ties (torch.argmax semantics:
//               NaN counts as larger than everything, so a row with NaN has its first NaN here);
//   top2[r]   = index of the largest value among the other indices (first on ties);
//   margin[r] = value(top1) - value(top2), exactly 0 when the two values are equal (also for
//               equal infinities), NaN when the row holds a NaN.
// Values are compared in fp32 (exact for bf16/fp16). Requires vocab >= 2. Each row is read once
// and rows are independent, so results do not depend on the batch or on threading.
Status margin(DType dtype, const void* logits, int64_t rows, int64_t vocab, int64_t row_stride,
              int64_t col_stride, int64_t* top1, int64_t* top2, float* margin,
              const Parallel& parallel);

}  // namespace margingate
