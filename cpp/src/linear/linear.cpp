// linear: the row-invariant GEMM y = x @ w^T (+ bias). Dispatcher, packing and the scalar path.
//
// WHY EVERY ROW IS BATCH-INVARIANT (the contract; read this before touching any kernel)
//
// Each output element y[m, n] is produced by exactly one sequence of floating-point operations,
// fixed per SIMD level and independent of M, of the row's position, of the strides, of the tile
// the element falls in and of the thread that computes it:
//
//   1. K-reduction.  A level has L lanes (avx512: 16, avx2: 8, scalar: 8 plain floats). One fp32 accumulator
//      vector per output element starts at +0. K is walked in chunks, always from k = 0 upward in
//      steps of the chunk size (avx512: 32 for bf16, 16 for fp16/fp32; avx2 and scalar: 8); a
//      chunk updates the accumulator with ONE fixed instruction:
//        avx512 bf16  acc = vdpbf16ps(acc, x[k:k+32], w[k:k+32])   (lane l: pairs 2l, 2l+1)
//        avx512 fp16/fp32, avx2 (all)  acc = fma(x[k:k+L], w[k:k+L], acc)   (bf16/fp16 widened
//                     exactly to fp32 first)
//        scalar       acc[l] = acc[l] + x[k+l] * w[k+l], l = 0..7   (two roundings; the
//                     core builds with -ffp-contract=off, so the compiler may not fuse them)
//      The last, partial chunk reads zeros beyond K (masked loads; the scalar level simply skips
//      those lanes), the same for every row.
//      There is no split-K and no shape-dependent choice of chunk, instruction or accumulator
//      count: register blocking computes several (m, n) pairs side by side, but each pair has
//      its own accumulator that sees exactly the sequence above.
//   2. Lane reduction.  The L lanes are summed with one fixed halving tree
//      (lane i += lane i + L/2, then L/4, ..., 1). avx512 reduces 16 accumulators at once with a
//      shuffle network that performs, for every accumulator, precisely this tree (the slot an
//      accumulator occupies in the network does not change its additions).
//   3. Epilogue.  y = sum + bias[n] (one fp32 add, bias widened exactly), rounded once to the
//      output dtype with the scalar round-to-nearest-even helpers of common.h.
//
// Packing (copying x or w rows that are not contiguous along K into scratch, widening fp16/bf16
// x to fp32) changes no value, so strides cannot change the result either. Threads only decide
// which tiles they compute (run_tiles in linear_impl.h), never how an element is computed.
// Different SIMD levels are different (each fixed) sequences: a process uses one level
// (simd_level() is read once), and the tests check each level on its own.
#include <cstring>
#include <vector>

#include "linear_impl.h"

namespace margingate {
namespace linear_impl {

namespace {

template <typename T>
void scalar_tiles(const Problem& p, const Parallel& parallel) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  run_tiles(p, parallel, 1, 8, 256, [&](int64_t m0, int64_t, int64_t n0, int64_t cols) {
    const T* xr = x + m0 * p.x_row_stride;
    for (int64_t n = n0; n < n0 + cols; ++n) {
      const T* wr = w + n * p.w_row_stride;
      // 8 interleaved partial sums (lane l takes k = l mod 8), like an 8-lane vector: shorter
      // rounding chains than one running sum, then the same halving tree as the SIMD levels.
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 8 <= p.K; k += 8) {
        for (int l = 0; l < 8; ++l) acc[l] = acc[l] + to_float(xr[k + l]) * to_float(wr[k + l]);
      }
      for (int l = 0; k + l < p.K; ++l) acc[l] = acc[l] + to_float(xr[k + l]) * to_float(wr[k + l]);
      for (int half = 4; half >= 1; half /= 2) {
        for (int l = 0; l < half; ++l) acc[l] = acc[l] + acc[l + half];
      }
      store_output(p, m0, n, acc[0]);
    }
  });
}

}  // namespace

void linear_scalar(const Problem& p, const Parallel& parallel) {
  switch (p.dtype) {
    case DType::kFloat32: scalar_tiles<float>(p, parallel); break;
    case DType::kFloat16: scalar_tiles<fp16_t>(p, parallel); break;
    case DType::kBFloat16: scalar_tiles<bf16_t>(p, parallel); break;
  }
}

namespace {

// Copies `rows` rows of `cols` elements (element (r, c) at src[r*rs + c*cs], `esize` bytes each)
// into a dense [rows, cols] buffer. Only bits move.
void pack_rows(const void* src, int64_t rows, int64_t cols, int64_t rs, int64_t cs, int64_t esize,
               void* dst, const Parallel& parallel) {
  const char* s = static_cast<const char*>(src);
  char* d = static_cast<char*>(dst);
  // Blocks of 16 rows x 64 columns keep a transposed source (cs large, rs = 1) cache friendly.
  constexpr int64_t kRb = 16, kCb = 64;
  const int64_t row_blocks = (rows + kRb - 1) / kRb;
  parallel.for_range(row_blocks, rows * cols < (1 << 16) ? row_blocks : 1, [&](int64_t b, int64_t e) {
    for (int64_t rb = b * kRb; rb < std::min(rows, e * kRb); rb += kRb) {
      const int64_t re = std::min(rows, rb + kRb);
      for (int64_t cb = 0; cb < cols; cb += kCb) {
        const int64_t ce = std::min(cols, cb + kCb);
        for (int64_t r = rb; r < re; ++r) {
          for (int64_t c = cb; c < ce; ++c) {
            std::memcpy(d + (r * cols + c) * esize, s + (r * rs + c * cs) * esize, static_cast<size_t>(esize));
          }
        }
      }
    }
  });
}

// Widens `rows` x `cols` 16-bit floats (any strides) to a dense fp32 buffer; exact.
template <typename T>
void widen_rows(const T* src, int64_t rows, int64_t cols, int64_t rs, int64_t cs, float* dst,
                const Parallel& parallel) {
  parallel.for_range(rows, rows * cols < (1 << 16) ? rows : 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = to_float(src[r * rs + c * cs]);
    }
  });
}

}  // namespace
}  // namespace linear_impl

Status linear(const LinearArgs& a, const Parallel& parallel) {
  using namespace linear_impl;
  if (a.M < 0 || a.N < 0 || a.K < 0) return Status::error("margingate.linear: negative size");
  if (a.M == 0 || a.N == 0) return Status::success();
  if (a.y == nullptr) return Status::error("margingate.linear: y is null");
  if (a.K > 0 && (a.x == nullptr || a.w == nullptr)) return Status::error("margingate.linear: x or w is null");

  const SimdLevel level = simd_level();
  const int64_t esize = dtype_size(a.dtype);
  Problem p;
  p.dtype = a.dtype;
  p.M = a.M;
  p.N = a.N;
  p.K = a.K;
  p.y = a.y;
  p.y_row_stride = a.y_row_stride;
  p.y_col_stride = a.y_col_stride;

  // x: the SIMD levels take fp16 x (and, at avx2, bf16 x) already widened to fp32, so the
  // micro-kernels convert only the weight; everything else is read in place when contiguous.
  std::vector<float> x_wide;
  std::vector<char> x_packed;
  const bool widen_x = a.K > 0 && ((a.dtype == DType::kFloat16 && level != SimdLevel::kScalar) ||
                                   (a.dtype == DType::kBFloat16 && level == SimdLevel::kAvx2));
  if (widen_x) {
    x_wide.resize(static_cast<size_t>(a.M * a.K));
    if (a.dtype == DType::kFloat16) {
      widen_rows(static_cast<const fp16_t*>(a.x), a.M, a.K, a.x_row_stride, a.x_col_stride, x_wide.data(), parallel);
    } else {
      widen_rows(static_cast<const bf16_t*>(a.x), a.M, a.K, a.x_row_stride, a.x_col_stride, x_wide.data(), parallel);
    }
    p.x = x_wide.data();
    p.x_row_stride = a.K;
    p.x_is_float = true;
  } else if (a.K > 1 && a.x_col_stride != 1) {
    x_packed.resize(static_cast<size_t>(a.M * a.K * esize));
    pack_rows(a.x, a.M, a.K, a.x_row_stride, a.x_col_stride, esize, x_packed.data(), parallel);
    p.x = x_packed.data();
    p.x_row_stride = a.K;
  } else {
    p.x = a.x;
    p.x_row_stride = a.x_row_stride;
  }

  // w: read in place when each row is contiguous (nn.Linear weights); otherwise (mm routed as
  // linear(a, b^T)) packed to [N, K] in its own dtype -- a bf16 weight stays bf16.
  std::vector<char> w_packed;
  if (a.K > 1 && a.w_col_stride != 1) {
    w_packed.resize(static_cast<size_t>(a.N * a.K * esize));
    pack_rows(a.w, a.N, a.K, a.w_row_stride, a.w_col_stride, esize, w_packed.data(), parallel);
    p.w = w_packed.data();
    p.w_row_stride = a.K;
  } else {
    p.w = a.w;
    p.w_row_stride = a.w_row_stride;
  }

  std::vector<float> bias;
  if (a.bias != nullptr) {
    bias.resize(static_cast<size_t>(a.N));
    for (int64_t n = 0; n < a.N; ++n) {
      const char* b = static_cast<const char*>(a.bias) + n * a.bias_stride * esize;
      switch (a.dtype) {
        case DType::kFloat32: bias[n] = *reinterpret_cast<const float*>(b); break;
        case DType::kFloat16: bias[n] = fp16_to_float(*reinterpret_cast<const uint16_t*>(b)); break;
        case DType::kBFloat16: bias[n] = bf16_to_float(*reinterpret_cast<const uint16_t*>(b)); break;
      }
    }
    p.bias = bias.data();
  }

  switch (level) {
    case SimdLevel::kAvx512: linear_avx512(p, parallel); break;
    case SimdLevel::kAvx2: linear_avx2(p, parallel); break;
    case SimdLevel::kScalar: linear_scalar(p, parallel); break;
  }
  return Status::success();
}

}  // namespace margingate
