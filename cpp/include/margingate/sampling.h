// sampling: seeded Gumbel-max sampling at temperature > 0 with the margins a gate needs.
//
// ============================================================================ the noise
// A counter-based, stateless generator: the Gumbel noise of vocabulary index i at decode position
// p of a request with seed s is a pure function of (s, p, i). All integer arithmetic is on uint64
// modulo 2^64 (seed and position are reinterpreted as two's-complement uint64):
//
//   G        = 0x9E3779B97F4A7C15                          (SplitMix64's increment)
//   mix64(z) = SplitMix64's finaliser (Steele, Lea, Flood 2014; Stafford's "Mix13"):
//                z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
//                z ^= z >> 27; z *= 0x94D049BB133111EB;
//                z ^= z >> 31
//   row_key  = mix64(mix64(s + G) ^ p)                     (mix64(s + G): SplitMix64's first output
//                                                           for state s)
//   bits(i)  = mix64(row_key + (i + 1) * G)                (output i of SplitMix64 from row_key)
//   u        = ((bits >> 12) + 0.5) * 2^-52                (fp64, exact: 52 random bits, so u lies in
//                                                           [2^-53, 1 - 2^-53], never 0 or 1)
//   g        = fp32( -log_mg( -log_mg(u) ) )               (fp64 arithmetic, one rounding to fp32 at
//                                                           the end, round to nearest even)
//
// log_mg is our own fp64 logarithm, because libm's log() is not the same function on every
// platform: glibc's log and CUDA's log (libdevice) are both accurate to about 1 ulp but do not
// promise the same last bit, and one different bit of g can flip a sampled token. log_mg uses only
// IEEE +, -, *, / (each correctly rounded on every conforming CPU and GPU), no fused multiply-add
// (the core compiles with -ffp-contract=off, the CUDA code uses __dadd_rn/__dmul_rn/__ddiv_rn,
// which nvcc never contracts), no libm and no fast-math, so CPU scalar, AVX-512, CUDA and the
// plain-torch float64 reference (python/margingate/noise.py) agree bit for bit. It is fdlibm's
// e_log.c algorithm, for a positive normal x:
//   k = exponent of x, m = its 52 mantissa bits; if m >= 0x6A09E00000000 (mantissa >= ~sqrt 2):
//   y = 1.m * 2^-1, k += 1; else y = 1.m                   (y in [sqrt(2)/2, sqrt 2), exact)
//   f = y - 1; hfsq = (0.5 * f) * f; s = f / (2 + f); z = s * s; w = z * z
//   t1 = w * (Lg2 + w * (Lg4 + w * Lg6)); t2 = z * (Lg1 + w * (Lg3 + w * (Lg5 + w * Lg7)))
//   R = t2 + t1
//   log_mg(x) = k * ln2_hi - ((hfsq - (s * (hfsq + R) + k * ln2_lo)) - f)
// with fdlibm's constants (below). Error below 1 ulp of fp64; g has 24 bits, so this is far more
// than needed, and what matters is that it is the same function everywhere.
//
// ============================================================================ the sampler
// Row r with temperature T = temperature[r] > 0 and logits x (widened exactly to fp32):
//   candidates C  = the indices kept by top_k and min_p (both optional, see below);
//   score s_i     = fp32(fp32(x_i / T) + g_i)             (IEEE division, then one addition)
//   token         = argmax over C of s, the first index on ties
//   runner_up     = argmax over C without the token, first on ties; -1 when C has one index
//   margin        = T * (s_token - s_runner_up) in fp32, i.e. in logit units; exactly 0 on ties
//                   (also equal infinities); +inf when C has one index
// Truncation, applied to the logits (the noise never decides membership):
//   top_k = k > 0: C = the k largest logits under the total order (value descending, index
//     ascending), so exactly k candidates; ties at the k-th value keep the lowest indices (Hugging
//     Face's TopKLogitsWarper keeps every tie instead). k = 0 or k >= V: no top-k.
//   min_p = q in (0, 1]: C = {i : p_i >= q * p_max} with p = softmax(x / T), which in logit units
//     is x_i - x_max >= T * ln q. Decided as d_i >= L with d_i = fp32(x_i - x_max) (0 when
//     x_i == x_max) and L = fp32(T * log_mg(q)) in fp64. q = 0: no min-p.
//   Both: the intersection (what top-k followed by min-p gives).
// cutoff_margin: how far the truncation is from changing the token, in logit units. For each
//   index, its membership distance D_i is the smallest change of a logit difference that can move
//   it across a cut-off (top-k: x_i - x_(k+1) inside, x_(k) - x_i outside, where x_(j) is the j-th
//   largest value; min-p: |d_i - L|; inside with both rules: the smaller, outside: the larger
//   of the rules it fails). An outside index can only change the token by entering with a noised
//   score that beats the token, E_i = T * (s_token - s_i) (0 if s_i >= s_token). So
//     cutoff_margin = min( D_token, min over i outside C of max(D_i, E_i) )
//   and +inf without truncation. Gate: if every logit moves by less than h and both margin and
//   cutoff_margin are >= 2h (plus the fp32 rounding of the scores), the token cannot change.
//   This is tighter than the bare distance of the cut-off to its nearest logit, which at top_k = 50
//   is tiny on most steps (ranks 50 and 51 are close) although an index there almost never wins.
// Temperature 0: greedy. token, runner_up, margin are those of margingate::margin (top1, top2,
//   margin); top_k and min_p are ignored; cutoff_margin = +inf (NaN for a row holding NaN).
// A row holding NaN: token and runner_up as margingate::margin's (the first NaN, then the second
//   NaN or the best number), margin and cutoff_margin NaN (the gate verifies it).
// top_p is not offered: its cut-off is a cumulative sum of softmax probabilities, so whether an
//   index is kept depends on the rounding of every probability in the sum, not on one gap that a
//   margin could bound.
//
// Cost per row (CPU): one pass over the logits for the maximum (and, with top_k, a selection of
// the k + 1 largest keys: a min-heap of k + 1 entries when k < 4096, each logit compared once with
// the heap's minimum and inserted in O(log k) only when larger; else std::nth_element on a copy of
// the row, O(V)); one pass hashing every candidate and bounding its noise from the top 12 bits of
// its hash with a table (exact: an index whose bound cannot beat the running second best is
// skipped, so only a handful of indices per row pay for the two logarithms); and, with truncation,
// one more pass that mostly compares logits with the best cutoff_margin so far. The three passes
// have AVX2 forms for contiguous rows (cpp/src/sampling/sampling_avx2.cpp, also used on AVX-512
// machines) that only decide what to skip and leave every kept index to the scalar arithmetic.
// Rows are independent and run in parallel; a row is never split, so results never depend on the
// batch, the thread count or the SIMD level (and B = 1 uses one thread).
#pragma once

#include <cstdint>
#include <cstring>

#include "margingate/common.h"

#if defined(__CUDACC__)
#define MARGINGATE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MARGINGATE_HOST_DEVICE inline
#endif

namespace margingate {

namespace noise {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

MARGINGATE_HOST_DEVICE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

MARGINGATE_HOST_DEVICE uint64_t row_key(uint64_t seed, uint64_t position) {
  return mix64(mix64(seed + kGolden) ^ position);
}

MARGINGATE_HOST_DEVICE uint64_t bits(uint64_t key, uint64_t index) { return mix64(key + (index + 1) * kGolden); }

// Correctly rounded fp64 operations that no compiler may fuse (see the header comment).
MARGINGATE_HOST_DEVICE double add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
MARGINGATE_HOST_DEVICE double sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
MARGINGATE_HOST_DEVICE double mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
MARGINGATE_HOST_DEVICE double div(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

MARGINGATE_HOST_DEVICE double from_bits(uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(b));
#else
  double d;
  std::memcpy(&d, &b, 8);
  return d;
#endif
}
MARGINGATE_HOST_DEVICE uint64_t to_bits(double d) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(d));
#else
  uint64_t b;
  std::memcpy(&b, &d, 8);
  return b;
#endif
}

// fdlibm's constants (e_log.c).
constexpr double kLn2Hi = 6.93147180369123816490e-01;
constexpr double kLn2Lo = 1.90821492927058770002e-10;
constexpr double kLg1 = 6.666666666666735130e-01;
constexpr double kLg2 = 3.999999999940941908e-01;
constexpr double kLg3 = 2.857142874366239149e-01;
constexpr double kLg4 = 2.222219843214978396e-01;
constexpr double kLg5 = 1.818357216161805012e-01;
constexpr double kLg6 = 1.531383769920937332e-01;
constexpr double kLg7 = 1.479819860511658591e-01;
constexpr uint64_t kMantissaMask = 0x000FFFFFFFFFFFFFull;
constexpr uint64_t kSqrt2Mantissa = 0x0006A09E00000000ull;

// log_mg: natural logarithm of a positive, normal, finite x (the only inputs the noise produces).
MARGINGATE_HOST_DEVICE double log_mg(double x) {
  const uint64_t b = to_bits(x);
  const uint64_t m = b & kMantissaMask;
  int64_t k = static_cast<int64_t>(b >> 52) - 1023;
  const bool big = m >= kSqrt2Mantissa;
  if (big) k += 1;
  const double y = from_bits(m | (big ? 0x3FE0000000000000ull : 0x3FF0000000000000ull));
  const double f = sub(y, 1.0);
  const double hfsq = mul(mul(0.5, f), f);
  const double s = div(f, add(2.0, f));
  const double z = mul(s, s);
  const double w = mul(z, z);
  const double t1 = mul(w, add(kLg2, mul(w, add(kLg4, mul(w, kLg6)))));
  const double t2 = mul(z, add(kLg1, mul(w, add(kLg3, mul(w, add(kLg5, mul(w, kLg7)))))));
  const double r = add(t2, t1);
  const double dk = static_cast<double>(k);
  return sub(mul(dk, kLn2Hi), sub(sub(hfsq, add(mul(s, add(hfsq, r)), mul(dk, kLn2Lo))), f));
}

MARGINGATE_HOST_DEVICE double uniform(uint64_t bits) {
  return mul(add(static_cast<double>(bits >> 12), 0.5), 0x1p-52);
}

MARGINGATE_HOST_DEVICE float gumbel_from_bits(uint64_t bits) {
  const double g = -log_mg(-log_mg(uniform(bits)));
#if defined(__CUDA_ARCH__)
  return __double2float_rn(g);
#else
  return static_cast<float>(g);
#endif
}

// The noise of vocabulary index `index` at `position` for `seed`.
MARGINGATE_HOST_DEVICE float gumbel(uint64_t seed, int64_t position, int64_t index) {
  return gumbel_from_bits(bits(row_key(seed, static_cast<uint64_t>(position)), static_cast<uint64_t>(index)));
}

}  // namespace noise

// Per-row sampling parameters; all arrays have `rows` entries (top_k and min_p may be null = off).
struct SamplingArgs {
  DType dtype = DType::kFloat32;
  const void* logits = nullptr;  // element (r, c) at logits[r * row_stride + c * col_stride]
  int64_t rows = 0, vocab = 0;
  int64_t row_stride = 0, col_stride = 1;
  const int64_t* seed = nullptr;         // any value (used as uint64)
  const int64_t* position = nullptr;     // any value (used as uint64)
  const float* temperature = nullptr;    // finite, >= 0 (0 = greedy)
  const int64_t* top_k = nullptr;        // >= 0 (0 = off)
  const float* min_p = nullptr;          // in [0, 1] (0 = off)
  int64_t* token = nullptr;
  int64_t* runner_up = nullptr;
  float* margin = nullptr;
  float* cutoff_margin = nullptr;
};

// Checks every parameter of every row first (an error names the argument and the row, and nothing
// is written), then fills the four outputs. vocab in [2, 2^31 - 1].
Status sample_margin(const SamplingArgs& args, const Parallel& parallel);

// The same argument checks, for launchers that hold the parameters on the host (cuda/).
Status sample_margin_validate(const SamplingArgs& args);

}  // namespace margingate
