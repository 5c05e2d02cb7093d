// Run-time choice of the SIMD level, made once per process.
#include <cstdlib>
#include <cstring>

#include "margingate/common.h"

namespace margingate {

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::kScalar: return "scalar";
    case SimdLevel::kAvx2: return "avx2";
    case SimdLevel::kAvx512: return "avx512";
  }
  return "?";
}

SimdLevel simd_level_supported() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // The AVX-512 kernels use F/BW/VL/DQ and the BF16 dot-product instruction.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bf16")) {
    return SimdLevel::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return SimdLevel::kAvx2;
  }
#endif
  return SimdLevel::kScalar;
}

static SimdLevel choose_level() {
  SimdLevel best = simd_level_supported();
  const char* env = std::getenv("MARGINGATE_SIMD");
  if (env == nullptr || *env == '\0') return best;
  SimdLevel wanted = best;
  if (std::strcmp(env, "scalar") == 0) wanted = SimdLevel::kScalar;
  else if (std::strcmp(env, "avx2") == 0) wanted = SimdLevel::kAvx2;
  else if (std::strcmp(env, "avx512") == 0) wanted = SimdLevel::kAvx512;
  // Never go above what the CPU has.
  return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
}

SimdLevel simd_level() {
  static const SimdLevel level = choose_level();
  return level;
}

}  // namespace margingate
