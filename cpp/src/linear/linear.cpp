// linear: the row-invariant GEMM y = x @ w^T (+ bias). Dispatcher, packing and the scalar path.
//
// WHY EVERY ROW IS BATCH-INVARIANT (the contract; read this before touching any kernel)
//
// Each output element y[m, n] is produced by exactly one sequence of floating-point operations,
// fixed per SIMD level and independent of M, of the row's position, of the strides, of the tile
// the element falls in and of the thread that computes it:
//
//   1. K-reduction.  A level has L lanes (avx512: 16, avx2 and neon: 8, scalar: 8 plain floats).
//      One fp32 accumulator vector per output element starts at +0. K is walked in chunks, always
//      from k = 0 upward in steps of the chunk size (avx512: 32 for bf16, 16 for fp16/fp32; avx2,
//      neon and scalar: 8); a chunk updates the accumulator with ONE fixed instruction:
//        avx512 bf16  acc = vdpbf16ps(acc, x[k:k+32], w[k:k+32])   (lane l: pairs 2l, 2l+1)
//        avx512 fp16/fp32, avx2 and neon (all)  acc = fma(x[k:k+L], w[k:k+L], acc)   (bf16/fp16
//                     widened exactly to fp32 first; neon holds the 8 lanes in two registers and
//                     so computes exactly avx2's bits)
//        scalar       acc[l] = fma(x[k+l], w[k+l], acc[l]), l = 0..7   (std::fma: one rounding,
//                     the bits of avx2's and neon's vfmadd; the core builds with
//                     -ffp-contract=off, so no other multiply-add is fused behind our back)
//      The last, partial chunk reads zeros beyond K (masked loads; the scalar level feeds zeros
//      to the same fma), the same for every row.
//      There is no split-K and no shape-dependent choice of chunk, instruction or accumulator
//      count: register blocking computes several (m, n) pairs side by side, but each pair has
//      its own accumulator that sees exactly the sequence above.
//   2. Lane reduction.  The L lanes are summed with one fixed halving tree
//      (lane i += lane i + L/2, then L/4, ..., 1). avx512 reduces 16 accumulators at once with a
//      shuffle network that performs, for every accumulator, precisely this tree (the slot an
//      accumulator occupies in the network does not change its additions).
//   3. Epilogue.  y = sum + bias[n] (one fp32 add, bias widened exactly), rounded once to the
//      output dtype, round-to-nearest-even exactly as the scalar helpers of common.h (avx512
//      stores a tile row with vector code that reproduces them bit for bit, NaN included).
//
// Packing (copying x or w rows that are not contiguous along K into scratch, widening fp16/bf16
// x to fp32, avx512's chunk-interleaved copy of long x rows) changes no value, so strides and
// layouts cannot change the result either. Threads only decide which tiles they compute
// (run_blocks in linear_impl.h, work units taken from a shared counter), never how an element is
// computed.
// One bit class across levels (the canonical bit contract, docs/DESIGN.md): scalar, avx2 and
// neon perform the same 8-lane fma sequence, so they give the same bits for every dtype and the
// canonical forward is the same on every such CPU. avx512 (16 lanes; vdpbf16ps for bf16) is a
// sequence of its own until it is rewritten and tested on an AVX-512 machine. The self-check of
// the C++ benchmark binary (margingate_bench --check) replays the 8-lane sequence in plain scalar
// code and demands the same bits at scalar, avx2 and neon.
#include <cmath>
#include <cstring>
#include <memory>
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
      // 8 interleaved partial sums (lane l takes k = l mod 8), exactly an 8-lane fma vector:
      // the same bits as the avx2/neon levels, then the same halving tree.
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 8 <= p.K; k += 8) {
        for (int l = 0; l < 8; ++l) acc[l] = std::fma(to_float(xr[k + l]), to_float(wr[k + l]), acc[l]);
      }
      if (k < p.K) {  // the partial chunk: zeros past K, as the SIMD levels' masked loads read them
        for (int l = 0; l < 8; ++l) {
          const bool in = k + l < p.K;
          acc[l] = std::fma(in ? to_float(xr[k + l]) : 0.f, in ? to_float(wr[k + l]) : 0.f, acc[l]);
        }
      }
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

// Copies `rows` rows of `cols` elements (element (r, c) at src[r*rs + c*cs]) into rows of
// `dst_stride` elements. Only bits move. Works in 32 x 32 blocks, walking the source's contiguous
// direction inner-most, so a transposed source (rs = 1, cs large: mm's b read as linear's weight)
// is read a cache line at a time; the caller pads dst_stride off multiples of 4 KiB so the 32
// destination lines of a block do not all compete for one L1 set.
template <typename T>
void pack_rows_typed(const T* src, int64_t rows, int64_t cols, int64_t rs, int64_t cs, T* dst, int64_t dst_stride,
                     const Parallel& parallel) {
  // 32 x 32 blocks inside 256 x 256 super-blocks: a super-block touches 256 source and 256
  // destination rows (pages), few enough for the TLB, before moving on.
  constexpr int64_t kB = 32, kSuper = 256;
  const int64_t row_supers = (rows + kSuper - 1) / kSuper;
  parallel.for_range(row_supers, rows * cols < (1 << 16) ? row_supers : 1, [&](int64_t b, int64_t e) {
    for (int64_t rs0 = b * kSuper; rs0 < std::min(rows, e * kSuper); rs0 += kSuper) {
      const int64_t rs1 = std::min(rows, rs0 + kSuper);
      for (int64_t cs0 = 0; cs0 < cols; cs0 += kSuper) {
        const int64_t cs1 = std::min(cols, cs0 + kSuper);
        for (int64_t rb = rs0; rb < rs1; rb += kB) {
          const int64_t re = std::min(rs1, rb + kB);
          for (int64_t cb = cs0; cb < cs1; cb += kB) {
            const int64_t ce = std::min(cs1, cb + kB);
            if (rs < cs) {
              // Transposed source: gather the block through a small local tile, reading source
              // lines and writing destination lines whole (and free of aliasing worries).
              T tile[kB][kB];
              for (int64_t c = cb; c < ce; ++c) {
                for (int64_t r = rb; r < re; ++r) tile[c - cb][r - rb] = src[r * rs + c * cs];
              }
              for (int64_t r = rb; r < re; ++r) {
                T* d = dst + r * dst_stride;
                for (int64_t c = cb; c < ce; ++c) d[c] = tile[c - cb][r - rb];
              }
            } else {
              for (int64_t r = rb; r < re; ++r) {
                for (int64_t c = cb; c < ce; ++c) dst[r * dst_stride + c] = src[r * rs + c * cs];
              }
            }
          }
        }
      }
    }
  });
}

void pack_rows(const void* src, int64_t rows, int64_t cols, int64_t rs, int64_t cs, int64_t esize, void* dst,
               int64_t dst_stride, const Parallel& parallel) {
  if (esize == 4) {
    pack_rows_typed(static_cast<const uint32_t*>(src), rows, cols, rs, cs, static_cast<uint32_t*>(dst), dst_stride,
                    parallel);
  } else {
    pack_rows_typed(static_cast<const uint16_t*>(src), rows, cols, rs, cs, static_cast<uint16_t*>(dst), dst_stride,
                    parallel);
  }
}

// A row stride for packed rows of K elements: K rounded up to 64 bytes plus one more line, so
// consecutive rows never sit a multiple of 4 KiB apart.
int64_t padded_stride(int64_t K, int64_t esize) {
  const int64_t line = 64 / esize;
  return (K + line - 1) / line * line + line;
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
  // Scratch is default-initialised (new T[n], not std::vector): zero-filling a packed weight
  // would be one more pass over it; the padding between packed rows is never read.
  std::unique_ptr<float[]> x_wide;
  std::unique_ptr<char[]> x_packed;
  const bool fp32_x_level = level == SimdLevel::kAvx2 || level == SimdLevel::kNeon;
  const bool widen_x = a.K > 0 && ((a.dtype == DType::kFloat16 && level != SimdLevel::kScalar) ||
                                   (a.dtype == DType::kBFloat16 && fp32_x_level));
  if (widen_x) {
    x_wide.reset(new float[static_cast<size_t>(a.M * a.K)]);
    if (a.dtype == DType::kFloat16) {
      widen_rows(static_cast<const fp16_t*>(a.x), a.M, a.K, a.x_row_stride, a.x_col_stride, x_wide.get(), parallel);
    } else {
      widen_rows(static_cast<const bf16_t*>(a.x), a.M, a.K, a.x_row_stride, a.x_col_stride, x_wide.get(), parallel);
    }
    p.x = x_wide.get();
    p.x_row_stride = a.K;
    p.x_is_float = true;
  } else if (a.K > 1 && a.x_col_stride != 1) {
    const int64_t stride = padded_stride(a.K, esize);
    x_packed.reset(new char[static_cast<size_t>(a.M * stride * esize)]);
    pack_rows(a.x, a.M, a.K, a.x_row_stride, a.x_col_stride, esize, x_packed.get(), stride, parallel);
    p.x = x_packed.get();
    p.x_row_stride = stride;
  } else {
    p.x = a.x;
    p.x_row_stride = a.x_row_stride;
  }

  // w: read in place when each row is contiguous (nn.Linear weights); otherwise (mm routed as
  // linear(a, b^T)) packed to [N, K] in its own dtype -- a bf16 weight stays bf16.
  std::unique_ptr<char[]> w_packed;
  if (a.K > 1 && a.w_col_stride != 1) {
    const int64_t stride = padded_stride(a.K, esize);
    w_packed.reset(new char[static_cast<size_t>(a.N * stride * esize)]);
    pack_rows(a.w, a.N, a.K, a.w_row_stride, a.w_col_stride, esize, w_packed.get(), stride, parallel);
    p.w = w_packed.get();
    p.w_row_stride = stride;
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
#if MARGINGATE_ARCH_X86
    case SimdLevel::kAvx512: linear_avx512(p, parallel); break;
    case SimdLevel::kAvx2: linear_avx2(p, parallel); break;
#endif
#if MARGINGATE_ARCH_ARM64
    case SimdLevel::kNeon: linear_neon(p, parallel); break;
#endif
    default: linear_scalar(p, parallel); break;
  }
  return Status::success();
}

}  // namespace margingate
