// linear on CUDA: y = x @ w^T (+ bias) with one fixed K-reduction order per output element.
//
// Invariance argument (bf16 / fp16). Every output element y[m, n] is produced by the same chain of
// tensor-core instructions, whatever M, the tile shape or the row's position:
//   acc = 0; for c = 0, 1, ..., ceil(K / 16) - 1 (the last chunk zero-padded past K):
//     acc = mma.m16n8k16(x[m, 16c : 16c + 16], w[n, 16c : 16c + 16], acc)      (fp32 accumulate)
//   y = round(acc (+ bias[n]))
// - One instruction shape (mma.sync m16n8k16, fp32 accumulators) for every tile configuration; the
//   K tile (64 or 128) only groups consecutive chunks, so the chain is the same for any tiling. A
//   K tile reaching past K stops at the last chunk that holds a column of K, so the number of MMAs
//   is ceil(K / 16) for every tiling (BK = 128 and BK = 64 would otherwise pad different amounts).
// - No split-K, inside or across blocks: one thread's accumulator register carries the whole chain.
// - The tile configurations (chosen from M) differ only in how many (m, n) pairs a block or warp
//   covers. Rows past M are zero-filled; a row of an MMA only ever meets its own x row, so padding
//   and neighbours never enter y[m, n]. We rely on the tensor core computing every element of its
//   16x8 output the same way regardless of its position in the fragment (the assumption every
//   batch-invariant GEMM makes); tests/test_cuda_linear.py checks it bitwise on the GPU.
// - Strides: a strided or misaligned operand is loaded element by element instead of with
//   cp.async, into the same shared-memory tile, so the arithmetic is identical.
// - Compiled with --fmad=false; the epilogue's bias add is a plain fp32 add in every instantiation.
// fp32 operands use a SIMT kernel whose chain is acc = fmaf(x[m, k], w[n, k], acc) for k = 0..K-1,
// one thread per output element, the same kernel for every M.
//
// Speed: cp.async multi-stage pipeline (BK = 64 or 128), 4 or 8 warps, small N tiles (32 columns) at
// decode sizes so that even N = 4096 gives ~128 blocks, larger tiles as M grows. mma.sync runs on
// Hopper at a fraction of wgmma's peak; wgmma would have to be used for every M (it is a different
// instruction), which is future work.
#include "device_utils.cuh"
#include "margingate/cuda/linear.h"

namespace margingate::cuda {
namespace {

// A pipeline stage holds BK elements of K (BK / 16 consecutive MMA chunks, in order; BK varies
// by tile configuration, the chunk chain does not). Shared rows have a pitch of BK + 8 elements
// (BK = 64: 144 bytes, BK = 128: 272 bytes): 16-byte aligned for cp.async, and the fragment loads of
// a warp (8 rows x 4 words) hit 32 distinct banks.
template <int BK> __host__ __device__ constexpr int pitch() { return BK + 8; }

struct Params {
  const void* x;
  const void* w;
  const void* bias;
  void* y;
  int64_t M, N, K;
  int64_t x_rs, x_cs, w_rs, w_cs, b_s, y_rs, y_cs;
};

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
template <> struct Mma<__half> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// Loads rows [row0, row0 + ROWS) x columns [k0, k0 + BK) of a [rows_total, K] operand into a
// shared tile (pitch BK + 8), zero outside the operand. VEC: 16-byte cp.async (contiguous K,
// K % 8 == 0, 16-byte aligned rows); otherwise element loads with any strides.
template <typename T, int ROWS, int THREADS, int BK, bool VEC>
__device__ __forceinline__ void load_tile(T* __restrict__ tile, const T* __restrict__ src, int64_t rows_total,
                                          int64_t K, int64_t rs, int64_t cs, int64_t row0, int64_t k0) {
  if constexpr (VEC) {
    constexpr int kChunks = ROWS * (BK / 8);
#pragma unroll
    for (int c = threadIdx.x; c < kChunks; c += THREADS) {
      const int r = c / (BK / 8), cc = c % (BK / 8);
      const int64_t row = row0 + r, k = k0 + cc * 8;
      const bool pred = row < rows_total && k < K;
      const T* g = pred ? src + row * rs + k : src;
      detail::cp_async16(tile + r * pitch<BK>() + cc * 8, g, pred);
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * BK; e += THREADS) {
      const int r = e / BK, kk = e % BK;
      const int64_t row = row0 + r, k = k0 + kk;
      tile[r * pitch<BK>() + kk] = (row < rows_total && k < K) ? src[row * rs + k * cs] : detail::from_float<T>(0.0f);
    }
  }
}

template <typename T, int WARPS_M, int WARPS_N, int MT, int NT, int BK, int STAGES>
struct MmaConfig {
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int kBM = WARPS_M * MT * 16;
  static constexpr int kBN = WARPS_N * NT * 8;
  static constexpr int kPitch = pitch<BK>();
  static constexpr int kStageElems = (kBM + kBN) * kPitch;
  static constexpr int kSmemBytes = STAGES * kStageElems * static_cast<int>(sizeof(T));
};

template <typename T, int WARPS_M, int WARPS_N, int MT, int NT, int BK, int STAGES, bool VEC>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32)
    linear_mma_kernel(Params p) {
  using C = MmaConfig<T, WARPS_M, WARPS_N, MT, NT, BK, STAGES>;
  constexpr int kPitch = C::kPitch;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * C::kBN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * C::kBM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp % WARPS_M, warp_n = warp / WARPS_M;
  const int g = lane / 4, t = lane % 4;
  const int64_t KT = (p.K + BK - 1) / BK;

  auto stage_a = [&](int s) { return smem + s * C::kStageElems; };
  auto stage_w = [&](int s) { return smem + s * C::kStageElems + C::kBM * kPitch; };
  auto load_stage = [&](int s, int64_t kt) {
    load_tile<T, C::kBM, C::kThreads, BK, VEC>(stage_a(s), x, p.M, p.K, p.x_rs, p.x_cs, m0, kt * BK);
    load_tile<T, C::kBN, C::kThreads, BK, VEC>(stage_w(s), w, p.N, p.K, p.w_rs, p.w_cs, n0, kt * BK);
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    detail::cp_async_commit();
  }
  for (int64_t kt = 0; kt < KT; ++kt) {
    detail::cp_async_wait<STAGES - 2>();  // tile kt has landed (for this thread's copies) ...
    __syncthreads();                      // ... and for every thread's; stage (kt - 1) is free
    const int64_t next = kt + STAGES - 1;
    if (next < KT) load_stage(static_cast<int>(next % STAGES), next);
    detail::cp_async_commit();

    const T* sa = stage_a(static_cast<int>(kt % STAGES));
    const T* sw = stage_w(static_cast<int>(kt % STAGES));
    // The chunks in K order: the fixed chain. Chunks past K are skipped, not multiplied by zero
    // padding: every tiling then runs exactly ceil(K / 16) MMAs per output element (adding a zero
    // product is not guaranteed to leave the accumulator's bits alone, e.g. -0 + 0 = +0).
    const int64_t k_left = p.K - kt * BK;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      if (kk >= k_left) break;  // block-uniform: the same for every warp
      uint32_t a[MT][4], b[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const T* base = sa + (warp_m * MT * 16 + i * 16 + g) * kPitch + kk + t * 2;
        a[i][0] = *reinterpret_cast<const uint32_t*>(base);
        a[i][1] = *reinterpret_cast<const uint32_t*>(base + 8 * kPitch);
        a[i][2] = *reinterpret_cast<const uint32_t*>(base + 8);
        a[i][3] = *reinterpret_cast<const uint32_t*>(base + 8 * kPitch + 8);
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const T* base = sw + (warp_n * NT * 8 + j * 8 + g) * kPitch + kk + t * 2;
        b[j][0] = *reinterpret_cast<const uint32_t*>(base);
        b[j][1] = *reinterpret_cast<const uint32_t*>(base + 8);
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) Mma<T>::run(acc[i][j], a[i], b[j]);
    }
  }
  detail::cp_async_wait<0>();

  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = m0 + warp_m * MT * 16 + i * 16 + g + (e >= 2 ? 8 : 0);
        const int64_t n = n0 + warp_n * NT * 8 + j * 8 + t * 2 + (e & 1);
        if (m < p.M && n < p.N) {
          float v = acc[i][j][e];
          if (bias != nullptr) v = v + detail::to_float(bias[n * p.b_s]);
          y[m * p.y_rs + n * p.y_cs] = detail::from_float<T>(v);
        }
      }
    }
  }
}

// fp32: one thread per output element, acc = fmaf(x[m, k], w[n, k], acc) for k = 0..K-1.
constexpr int kF32Tile = 64, kF32BK = 16;
__global__ void __launch_bounds__(256) linear_f32_kernel(Params p) {
  __shared__ float sx[kF32BK][kF32Tile + 4];
  __shared__ float sw[kF32BK][kF32Tile + 4];
  const float* x = static_cast<const float*>(p.x);
  const float* w = static_cast<const float*>(p.w);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kF32Tile;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kF32Tile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < p.K; k0 += kF32BK) {
    for (int e = threadIdx.x; e < kF32Tile * kF32BK; e += 256) {
      const int r = e / kF32BK, kk = e % kF32BK;
      const int64_t k = k0 + kk;
      sx[kk][r] = (m0 + r < p.M && k < p.K) ? x[(m0 + r) * p.x_rs + k * p.x_cs] : 0.0f;
      sw[kk][r] = (n0 + r < p.N && k < p.K) ? w[(n0 + r) * p.w_rs + k * p.w_cs] : 0.0f;
    }
    __syncthreads();
    const int kmax = p.K - k0 < kF32BK ? static_cast<int>(p.K - k0) : kF32BK;
    for (int kk = 0; kk < kmax; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sx[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sw[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  const float* bias = static_cast<const float*>(p.bias);
  float* y = static_cast<float*>(p.y);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + ty * 4 + i, n = n0 + tx * 4 + j;
      if (m < p.M && n < p.N) {
        float v = acc[i][j];
        if (bias != nullptr) v = v + bias[n * p.b_s];
        y[m * p.y_rs + n * p.y_cs] = v;
      }
    }
  }
}

template <typename T, int WARPS_M, int WARPS_N, int MT, int NT, int BK, int STAGES>
cudaError_t launch_mma(const Params& p, bool vec, cudaStream_t stream) {
  using C = MmaConfig<T, WARPS_M, WARPS_N, MT, NT, BK, STAGES>;
  const int64_t grid_n = (p.N + C::kBN - 1) / C::kBN;
  const int64_t grid_m = (p.M + C::kBM - 1) / C::kBM;
  if (grid_n > INT32_MAX || grid_m > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(grid_n), static_cast<unsigned>(grid_m));
  auto kernel = vec ? linear_mma_kernel<T, WARPS_M, WARPS_N, MT, NT, BK, STAGES, true>
                    : linear_mma_kernel<T, WARPS_M, WARPS_N, MT, NT, BK, STAGES, false>;
  const cudaError_t err =
      vec ? detail::allow_smem<linear_mma_kernel<T, WARPS_M, WARPS_N, MT, NT, BK, STAGES, true>>(C::kSmemBytes)
          : detail::allow_smem<linear_mma_kernel<T, WARPS_M, WARPS_N, MT, NT, BK, STAGES, false>>(C::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// Tile shape by M (speed only; the per-element chain is the same in all of them):
//   M <= 16: 16 x 32 tiles, BK = 128, 6 stages: decode streams w once from N / 32 blocks with
//            ~64 KiB of w in flight per block (bandwidth-bound: bytes in flight are what count)
//   M <= 32: 32 x 32, BK = 128, 5 stages; M <= 256: 64 x 32, BK = 64, 4 stages (N = 4096 at
//            M = 128 still gives 256 blocks); larger: 128 x 128 (8 warps), BK = 64, 3 stages.
template <typename T> cudaError_t launch_mma_by_m(const Params& p, bool vec, cudaStream_t stream) {
  if (p.M <= 16) return launch_mma<T, 1, 4, 1, 1, 128, 6>(p, vec, stream);
  if (p.M <= 32) return launch_mma<T, 1, 4, 2, 1, 128, 5>(p, vec, stream);
  if (p.M <= 256) return launch_mma<T, 2, 2, 2, 2, 64, 4>(p, vec, stream);
  return launch_mma<T, 2, 4, 4, 4, 64, 3>(p, vec, stream);
}

}  // namespace

cudaError_t linear(const LinearArgs& a, cudaStream_t stream) {
  if (a.M < 0 || a.N < 0 || a.K < 0) return cudaErrorInvalidValue;
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  const Params p{a.x, a.w, a.bias, a.y, a.M, a.N, a.K, a.x_row_stride, a.x_col_stride, a.w_row_stride,
                 a.w_col_stride, a.bias_stride, a.y_row_stride, a.y_col_stride};
  if (a.dtype == DType::kFloat32) {
    const int64_t grid_n = (a.N + kF32Tile - 1) / kF32Tile, grid_m = (a.M + kF32Tile - 1) / kF32Tile;
    if (grid_n > INT32_MAX || grid_m > 65535) return cudaErrorInvalidValue;
    linear_f32_kernel<<<dim3(static_cast<unsigned>(grid_n), static_cast<unsigned>(grid_m)), 256, 0, stream>>>(p);
    return cudaGetLastError();
  }
  // cp.async needs contiguous K, whole 16-byte chunks and 16-byte aligned rows.
  const bool vec = a.x_col_stride == 1 && a.w_col_stride == 1 && a.K % 8 == 0 && detail::aligned16(a.x) &&
                   detail::aligned16(a.w) && (a.M == 1 || a.x_row_stride % 8 == 0) &&
                   (a.N == 1 || a.w_row_stride % 8 == 0);
  if (a.dtype == DType::kBFloat16) return launch_mma_by_m<__nv_bfloat16>(p, vec, stream);
  return launch_mma_by_m<__half>(p, vec, stream);
}

}  // namespace margingate::cuda
