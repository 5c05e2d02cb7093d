// margingate core: shared vocabulary of the torch-free kernels.
//
// Everything under cpp/ is plain C++17: raw pointers, sizes and element strides in, a Status
// out. No torch, no Python. The binding layer (csrc/) checks user input and turns a failed
// Status into a clear error; the C++ benchmark binary (bench/cpp) calls the same functions.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>

namespace margingate {

// Element types the kernels accept. Storage for the 16-bit types is uint16_t; arithmetic is fp32.
enum class DType { kFloat32, kFloat16, kBFloat16 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "?";
}

inline int64_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Result of a core call. `ok()` or a message naming the offending argument.
struct Status {
  std::string message;  // empty = success
  bool ok() const { return message.empty(); }
  static Status success() { return {}; }
  static Status error(std::string m) { return Status{std::move(m)}; }
};

// ---- scalar conversions (exact for bf16/fp16 -> fp32; round-to-nearest-even back) ----

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float fp16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (ax < 0x38800000u) {  // result is subnormal or zero in fp16
    if (ax < 0x33000000u) return static_cast<uint16_t>(sign);
    uint32_t e = ax >> 23;
    uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14..24
    uint32_t half = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u) - (static_cast<uint32_t>(127 - 15) << 23);
  return static_cast<uint16_t>(sign | (r >> 13));
}

template <typename T> inline float to_float(T v);
template <> inline float to_float<float>(float v) { return v; }

// Typed 16-bit storage so templates can tell bf16 from fp16 (both are uint16_t bits).
struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };
template <> inline float to_float<bf16_t>(bf16_t v) { return bf16_to_float(v.bits); }
template <> inline float to_float<fp16_t>(fp16_t v) { return fp16_to_float(v.bits); }

template <typename T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline bf16_t from_float<bf16_t>(float v) { return bf16_t{float_to_bf16(v)}; }
template <> inline fp16_t from_float<fp16_t>(float v) { return fp16_t{float_to_fp16(v)}; }

static_assert(sizeof(bf16_t) == 2 && sizeof(fp16_t) == 2, "16-bit storage types must be 2 bytes");

// ---- parallelism supplied by the caller ----
//
// The core never owns threads: the torch binding passes torch's intra-op pool (at::parallel_for),
// the benchmark binary its own std::thread pool. `run` must call body(ctx, begin, end) over
// disjoint ranges that cover [0, n) exactly once; ranges may run concurrently. Kernels only use
// this to split independent work (rows, tiles, heads), never to split a reduction, so results
// never depend on how many threads there are.
struct Parallel {
  using Body = void (*)(void* ctx, int64_t begin, int64_t end);
  void (*run)(void* self, int64_t n, int64_t grain, void* ctx, Body body) = nullptr;
  void* self = nullptr;
  int num_threads = 1;

  template <typename F>
  void for_range(int64_t n, int64_t grain, F&& f) const {
    if (n <= 0) return;
    auto body = [](void* ctx, int64_t b, int64_t e) { (*static_cast<F*>(ctx))(b, e); };
    if (run == nullptr || n <= grain) {
      f(int64_t{0}, n);
      return;
    }
    run(self, n, grain < 1 ? 1 : grain, &f, body);
  }
};

// Runs everything on the calling thread.
inline Parallel serial() { return Parallel{}; }

// ---- SIMD level, chosen once at run time ----
//
// The kernels of an architecture live in files named after their level (*_avx2.cpp,
// *_avx512.cpp on x86-64; *_neon.cpp on aarch64); CMake compiles only the current
// architecture's files, and dispatchers refer to them only under these macros.
#if defined(__x86_64__) || defined(_M_X64)
#define MARGINGATE_ARCH_X86 1
#else
#define MARGINGATE_ARCH_X86 0
#endif
#if defined(__aarch64__)
#define MARGINGATE_ARCH_ARM64 1
#else
#define MARGINGATE_ARCH_ARM64 0
#endif

// kAvx2 means AVX2 + FMA + F16C; kAvx512 means F/BW/VL/DQ + BF16; kNeon is aarch64's Advanced
// SIMD (always present there). Only levels of the running architecture can be chosen.
enum class SimdLevel { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kNeon = 3 };

const char* simd_level_name(SimdLevel level);
// The best level this CPU supports, capped by the environment variable MARGINGATE_SIMD
// (scalar | avx2 | avx512 | neon) when it is set. Each level is invariant on its own; two levels
// may differ in the last bit, so a process uses exactly one (read once, then fixed).
SimdLevel simd_level();
// What the CPU supports, ignoring MARGINGATE_SIMD.
SimdLevel simd_level_supported();
// Why simd_level() is what it is, in one line: "detected", "capped by MARGINGATE_SIMD=avx2", or
// why a MARGINGATE_SIMD value was not honoured. Never contains ';'.
const char* simd_level_reason();

}  // namespace margingate
