// Internal to the linear kernels: the normalised problem each SIMD level receives.
//
// The dispatcher (linear.cpp) packs what the kernels cannot read directly, so every kernel sees
// rows that are contiguous along K. Packing only copies (or converts exactly, fp16 -> fp32), so
// it never changes a single bit of the arithmetic; it is what lets the kernels promise the same
// instruction sequence for a row whatever strides the caller used.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "margingate/common.h"
#include "margingate/linear.h"

namespace margingate::linear_impl {

struct Problem {
  DType dtype = DType::kFloat32;  // storage type of w and y
  int64_t M = 0, N = 0, K = 0;
  // x rows, contiguous along K. Element type: `dtype`, except fp16 at the avx2/avx512 levels,
  // where the dispatcher has already widened x to fp32 (exact) and `x_is_float` is set; avx2 and neon
  // also take bf16 x widened.
  const void* x = nullptr;
  int64_t x_row_stride = 0;
  bool x_is_float = false;
  // weight rows [N, K], contiguous along K, always in `dtype` (never widened: bf16 stays bf16).
  const void* w = nullptr;
  int64_t w_row_stride = 0;
  // bias widened to fp32 (exact), or nullptr.
  const float* bias = nullptr;
  // output, any strides, in `dtype`.
  void* y = nullptr;
  int64_t y_row_stride = 0, y_col_stride = 1;
};

// y[m, n] = reduce(...) + bias[n], rounded once to `dtype`. Shared epilogue of every level: the
// sum of the K-reduction (fp32) plus the bias (one fp32 add), then one rounding.
inline void store_output(const Problem& p, int64_t m, int64_t n, float sum) {
  const float v = p.bias != nullptr ? sum + p.bias[n] : sum;
  char* base = static_cast<char*>(p.y) + (m * p.y_row_stride + n * p.y_col_stride) * dtype_size(p.dtype);
  switch (p.dtype) {
    case DType::kFloat32: *reinterpret_cast<float*>(base) = v; break;
    case DType::kFloat16: *reinterpret_cast<uint16_t*>(base) = float_to_fp16(v); break;
    case DType::kBFloat16: *reinterpret_cast<uint16_t*>(base) = float_to_bf16(v); break;
  }
}

void linear_scalar(const Problem& p, const Parallel& parallel);
#if MARGINGATE_ARCH_X86
void linear_avx2(const Problem& p, const Parallel& parallel);
void linear_avx512(const Problem& p, const Parallel& parallel);
#endif
#if MARGINGATE_ARCH_ARM64
void linear_neon(const Problem& p, const Parallel& parallel);
#endif

}  // namespace margingate::linear_impl

namespace margingate::linear_impl {

// The work decomposition every level uses: output tiles of up to mr x nr elements, grouped into
// panels of nr weight rows. The work is cut into units (a group of rows x a run of panels; rows
// are split into groups only when there are too few panels to keep every thread busy) that the
// threads take from a shared counter as they go, so a thread the OS preempts (these machines
// are shared) does not hold up the rest. Within a unit, rows are walked in blocks of `m_block`
// so the x block stays in cache while the unit's weight panels stream by.
// Only *which* tile a thread computes depends on the shape, the thread count and the timing: the
// tile function computes every element of it with the same fixed K-reduction, so none of this
// changes a bit of the result.
//
// block(m_lo, m_hi, n0, cols) computes output rows [m_lo, m_hi) (at most m_block, a multiple of
// mr except at the end) x columns [n0, n0+cols), cols <= nr.
template <typename BlockFn>
void run_blocks(const Problem& p, const Parallel& parallel, int64_t mr, int64_t nr, int64_t m_block,
                BlockFn&& block) {
  const int64_t panels = (p.N + nr - 1) / nr;
  const int64_t m_tiles = (p.M + mr - 1) / mr;
  const int64_t threads = parallel.num_threads < 1 ? 1 : parallel.num_threads;
  int64_t groups = 1;
  if (panels < 2 * threads) groups = std::min<int64_t>(m_tiles, (2 * threads + panels - 1) / panels);
  const int64_t tiles_per_group = (m_tiles + groups - 1) / groups;
  // About 8 units per thread: fine enough to balance, coarse enough to keep each x block busy.
  const int64_t unit_panels = std::max<int64_t>(1, panels * groups / (8 * threads));
  const int64_t units_per_group = (panels + unit_panels - 1) / unit_panels;
  const int64_t units = groups * units_per_group;
  m_block = std::max<int64_t>(mr, m_block / mr * mr);
  auto run_unit = [&](int64_t u) {
    const int64_t g = u / units_per_group;
    const int64_t pb = (u % units_per_group) * unit_panels, pe = std::min(panels, pb + unit_panels);
    const int64_t m_lo = std::min(p.M, g * tiles_per_group * mr);
    const int64_t m_hi = std::min(p.M, (g + 1) * tiles_per_group * mr);
    for (int64_t mb = m_lo; mb < m_hi; mb += m_block) {
      const int64_t mb_end = std::min(m_hi, mb + m_block);
      for (int64_t panel = pb; panel < pe; ++panel) {
        const int64_t n0 = panel * nr;
        block(mb, mb_end, n0, std::min(nr, p.N - n0));
      }
    }
  };
  // Small problems are not worth waking a second thread for (~10 us of fork/join).
  const double work = static_cast<double>(p.M) * static_cast<double>(p.N) * static_cast<double>(p.K);
  if (threads == 1 || units == 1 || work < 2e5) {
    for (int64_t u = 0; u < units; ++u) run_unit(u);
    return;
  }
  std::atomic<int64_t> next{0};
  parallel.for_range(threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t u = next.fetch_add(1, std::memory_order_relaxed); u < units;
           u = next.fetch_add(1, std::memory_order_relaxed)) {
        run_unit(u);
      }
    }
  });
}

// tile(m0, rows, n0, cols) computes output rows [m0, m0+rows) x columns [n0, n0+cols), with
// rows <= mr and cols <= nr.
template <typename TileFn>
void run_tiles(const Problem& p, const Parallel& parallel, int64_t mr, int64_t nr, int64_t m_block,
               TileFn&& tile) {
  run_blocks(p, parallel, mr, nr, m_block, [&](int64_t m_lo, int64_t m_hi, int64_t n0, int64_t cols) {
    for (int64_t m0 = m_lo; m0 < m_hi; m0 += mr) tile(m0, std::min(mr, m_hi - m0), n0, cols);
  });
}

}  // namespace margingate::linear_impl
