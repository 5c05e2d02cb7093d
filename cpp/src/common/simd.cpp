// Run-time choice of the SIMD level, made once per process.
#include <cstdlib>
#include <cstring>
#include <string>

#include "margingate/common.h"

namespace margingate {

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::kScalar: return "scalar";
    case SimdLevel::kAvx2: return "avx2";
    case SimdLevel::kAvx512: return "avx512";
    case SimdLevel::kNeon: return "neon";
  }
  return "?";
}

SimdLevel simd_level_supported() {
#if MARGINGATE_ARCH_X86
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
  return SimdLevel::kScalar;
#elif MARGINGATE_ARCH_ARM64
  return SimdLevel::kNeon;  // Advanced SIMD is part of the aarch64 base architecture
#else
  return SimdLevel::kScalar;
#endif
}

namespace {

struct Choice {
  SimdLevel level;
  std::string reason;
};

// Can `wanted` run here, given the best level `best` of this CPU? x86 levels nest
// (scalar < avx2 < avx512); neon exists only on aarch64.
bool runs_here(SimdLevel wanted, SimdLevel best) {
  if (wanted == SimdLevel::kScalar || wanted == best) return true;
  if (wanted == SimdLevel::kNeon || best == SimdLevel::kNeon) return false;
  return static_cast<int>(wanted) < static_cast<int>(best);
}

Choice choose_level() {
  const SimdLevel best = simd_level_supported();
  const char* env = std::getenv("MARGINGATE_SIMD");
  if (env == nullptr || *env == '\0') return {best, "detected"};
  const std::string value = env;
  const std::string setting = "MARGINGATE_SIMD=" + value;
  for (SimdLevel wanted : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512, SimdLevel::kNeon}) {
    if (value != simd_level_name(wanted)) continue;
    if (wanted == best) return {best, "detected (" + setting + " asks for the same)"};
    if (runs_here(wanted, best)) return {wanted, "capped by " + setting};
    // Never go above (or beside) what the CPU has.
    return {best, setting + " is not available on this CPU: detected " + simd_level_name(best) + " used"};
  }
  return {best, setting + " is not a level (scalar, avx2, avx512, neon): ignored, detected " +
                    simd_level_name(best) + " used"};
}

const Choice& choice() {
  static const Choice c = [] {
    Choice r = choose_level();
    for (char& ch : r.reason) {
      if (ch == ';') ch = ',';  // build_info() separates its fields with ';'
    }
    return r;
  }();
  return c;
}

}  // namespace

SimdLevel simd_level() { return choice().level; }

const char* simd_level_reason() { return choice().reason.c_str(); }

}  // namespace margingate
