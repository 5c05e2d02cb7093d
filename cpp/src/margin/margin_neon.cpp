// margin: NEON segment scan (aarch64). Advanced SIMD is part of the base ISA: no flag, no check.
//
// The blocked scheme of the x86 scans: a max pass over 2K-element blocks decides which blocks can
// change the running top-2 (a value > the current second), and only those are rescanned with the
// exact scalar rule and merged exactly, so the answer is the scalar path's, bit for bit. NEON's
// fmax propagates NaN, so a NaN anywhere in a block shows up as a NaN block maximum.
#include <arm_neon.h>

#include <algorithm>

#include "margin_impl.h"

namespace margingate::margin_impl {

namespace {

constexpr int64_t kBlock = 2048;
constexpr int64_t kStep = 16;  // elements per max-pass iteration

inline float32x4_t widen_bf16(uint16x4_t h) { return vreinterpretq_f32_u32(vshll_n_u16(h, 16)); }

// Four independent max chains; the max of a set is exact, however the chains split it.
inline float max_pass(const float* p, int64_t n) {
  float32x4_t m0 = vdupq_n_f32(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  for (int64_t i = 0; i + kStep <= n; i += kStep) {
    m0 = vmaxq_f32(m0, vld1q_f32(p + i));
    m1 = vmaxq_f32(m1, vld1q_f32(p + i + 4));
    m2 = vmaxq_f32(m2, vld1q_f32(p + i + 8));
    m3 = vmaxq_f32(m3, vld1q_f32(p + i + 12));
  }
  return vmaxvq_f32(vmaxq_f32(vmaxq_f32(m0, m1), vmaxq_f32(m2, m3)));
}

inline float max_pass(const bf16_t* p, int64_t n) {
  const auto* q = reinterpret_cast<const uint16_t*>(p);
  float32x4_t m0 = vdupq_n_f32(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  for (int64_t i = 0; i + kStep <= n; i += kStep) {
    const uint16x8_t a = vld1q_u16(q + i), b = vld1q_u16(q + i + 8);
    m0 = vmaxq_f32(m0, widen_bf16(vget_low_u16(a)));
    m1 = vmaxq_f32(m1, widen_bf16(vget_high_u16(a)));
    m2 = vmaxq_f32(m2, widen_bf16(vget_low_u16(b)));
    m3 = vmaxq_f32(m3, widen_bf16(vget_high_u16(b)));
  }
  return vmaxvq_f32(vmaxq_f32(vmaxq_f32(m0, m1), vmaxq_f32(m2, m3)));
}

inline float max_pass(const fp16_t* p, int64_t n) {
  const auto* q = reinterpret_cast<const float16_t*>(p);
  float32x4_t m0 = vdupq_n_f32(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  for (int64_t i = 0; i + kStep <= n; i += kStep) {
    const float16x8_t a = vld1q_f16(q + i), b = vld1q_f16(q + i + 8);
    m0 = vmaxq_f32(m0, vcvt_f32_f16(vget_low_f16(a)));
    m1 = vmaxq_f32(m1, vcvt_high_f32_f16(a));
    m2 = vmaxq_f32(m2, vcvt_f32_f16(vget_low_f16(b)));
    m3 = vmaxq_f32(m3, vcvt_high_f32_f16(b));
  }
  return vmaxvq_f32(vmaxq_f32(vmaxq_f32(m0, m1), vmaxq_f32(m2, m3)));
}

template <typename T>
Top2 scan_blocked(const T* row, int64_t begin, int64_t end, DType dtype) {
  Top2 best;
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t e = std::min(end, b + kBlock);
    const int64_t full = (e - b) / kStep * kStep;
    float block_max = max_pass(row + b, full);
    bool nan = block_max != block_max;
    for (int64_t c = b + full; c < e; ++c) {
      const float x = to_float(row[c]);
      if (x != x) nan = true;
      block_max = x > block_max ? x : block_max;
    }
    if (nan) {  // the row is redone exactly by the NaN rule; nothing else matters
      best.has_nan = true;
      return best;
    }
    // Equal values never displace anything (their indices come later), so only a block holding a
    // value > second can change the answer; it is rescanned by the exact rule.
    if (best.i2 < 0 || block_max > best.v2) best = merge(best, segment_scalar(dtype, row, b, e, 1));
  }
  return best;
}

}  // namespace

Top2 segment_neon(DType dtype, const void* row, int64_t begin, int64_t end) {
  switch (dtype) {
    case DType::kFloat32: return scan_blocked(static_cast<const float*>(row), begin, end, dtype);
    case DType::kFloat16: return scan_blocked(static_cast<const fp16_t*>(row), begin, end, dtype);
    case DType::kBFloat16: return scan_blocked(static_cast<const bf16_t*>(row), begin, end, dtype);
  }
  return {};
}

}  // namespace margingate::margin_impl
