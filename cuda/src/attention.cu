// attention on CUDA: GQA with left padding, kv_rows indirection, causal mask and sliding window.
//
// Invariance argument. For query (b, h, j) at position p = Tk - Tq + j the visible keys are the
// interval [lo, hi] (lo from kv_start[b] and the window, hi from the causal mask). The result is
// defined as one fixed computation over that interval, independent of everything else:
// - The interval is cut into chunks of kChunk = 256 keys counted from lo, and each chunk into 8
//   sub-blocks of 32 keys. A chunk's state (m, l, acc[D]) starts empty and takes its sub-blocks in
//   order with an online softmax in fp32; within a sub-block, lane r of one warp scores key r with
//   a dot product of fixed order (four fmaf chains over d mod 4, then (c0 + c1) + (c2 + c3)),
//   the max is exact, the sum of probabilities is a fixed butterfly broadcast from lane 0, and
//   acc[d] takes the keys in order r = 0, 1, ... with fmaf. The lane that owns dims d is fixed by d.
// - The chunk states are folded in chunk order into the query's state, which is normalised once.
// Nothing in this depends on B, on the amount of left padding (positions enter only as t - lo),
// on the capacity Tk, on Tq, or on the other heads and rows: a decode step, a window replay and a
// prefill run the same instructions on the same values. Two launch shapes exist, for speed only:
// one block folds all chunks of its query, or (few blocks, long keys) one block per chunk writes
// the chunk state to a workspace and a combine kernel folds them in order. Both compute every
// chunk state from scratch with the same device function and fold with the same device function
// in the same order, and states pass through global memory as plain fp32, so they agree bit for
// bit. --fmad=false keeps the compiler from contracting differently in the two kernels; the
// FMAs above are explicit fmaf. Masked keys never enter any arithmetic (the loops stop at the last
// visible key), so what lies beyond hi (future keys, padding, unused capacity) cannot leak in.
//
// Non-finite values propagate as in torch's attention, never as plausible numbers. A NaN score
// (a NaN in q or in a visible key) is ignored by the max but gives exp(NaN) = NaN in the sum l; a
// +inf score makes the max +inf and exp(inf - inf) = NaN. Either way l is NaN, NaN survives every
// later rescale and fold (NaN * 0 = NaN), and the whole query's output is NaN. A -inf score weighs
// 0; visible keys whose scores are all -inf give NaN (torch's softmax of an all--inf row); no
// visible key gives zeros. A NaN in a visible value makes that output dimension NaN.
//
// Layout: a block serves one (row b, kv head, query j) and up to 8 query heads of that kv head's
// group (one warp each), so the group shares each K/V sub-block staged in shared memory by a
// cp.async pipeline (element loads for strided / misaligned K and V, same tile, same arithmetic).
#include <climits>
#include <cmath>

#include "device_utils.cuh"
#include "margingate/cuda/attention.h"

namespace margingate::cuda {
namespace {

using detail::kFullMask;

constexpr int kSub = 32;                // keys per sub-block (one per lane)
constexpr int kSubsPerChunk = 8;        // sub-blocks per chunk
constexpr int kChunk = kSub * kSubsPerChunk;  // keys per chunk: part of the numerical contract
constexpr int kMaxWarps = 8;            // query heads per block

struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  const int64_t* kv_rows;
  const int64_t* kv_start;
  float* workspace;
  int64_t B, Hq, Tq, D, Hkv, Tk, Bkv;
  int64_t qs[4], ks[4], vs[4], os[4];
  int64_t window;
  float scale;
  int causal;
  int group;         // Hq / Hkv
  int warps;         // warps (query heads) per block
  int head_blocks;   // blocks per kv head: ceil(group / warps)
  int splits;        // 1: a block folds all chunks; > 1: blockIdx.z = chunk, states to workspace
};

// The visible key interval [lo, hi] of query (b, j); lo > hi when there is none.
struct KeyRange {
  int64_t lo, hi, kv_row;
};

__device__ __forceinline__ KeyRange key_range(const AttnParams& p, int64_t b, int64_t j) {
  KeyRange r;
  r.kv_row = p.kv_rows != nullptr ? p.kv_rows[b] : b;
  const int64_t start = p.kv_start != nullptr ? p.kv_start[b] : 0;
  if (r.kv_row < 0 || r.kv_row >= p.Bkv || start < 0 || start > p.Tk) {
    if (threadIdx.x == 0) {
      printf("margingate.attention: row %lld has kv_rows = %lld (must be in [0, %lld)) / kv_start = %lld "
             "(must be in [0, %lld])\n",
             static_cast<long long>(b), static_cast<long long>(r.kv_row), static_cast<long long>(p.Bkv),
             static_cast<long long>(start), static_cast<long long>(p.Tk));
    }
    __trap();
  }
  const int64_t pos = p.Tk - p.Tq + j;
  r.lo = start;
  if (p.window > 0 && pos - p.window + 1 > r.lo) r.lo = pos - p.window + 1;
  r.hi = p.causal ? (pos < p.Tk - 1 ? pos : p.Tk - 1) : p.Tk - 1;
  return r;
}

// Online-softmax state of one query head, spread over a warp: lane owns dims lane * DPL + i.
template <int DPL> struct State {
  float m, l, acc[DPL];
  __device__ __forceinline__ void clear() {
    m = -INFINITY;
    l = 0.0f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[i] = 0.0f;
  }
};

// state <- fold(state, chunk), the in-order combine of two chunk states.
template <int DPL>
__device__ __forceinline__ void fold(State<DPL>& s, float mc, float lc, const float (&accc)[DPL]) {
  const float m_new = fmaxf(s.m, mc);
  const float a = s.m == -INFINITY ? 0.0f : expf(s.m - m_new);
  const float c = mc == -INFINITY ? 0.0f : expf(mc - m_new);
  s.l = s.l * a + lc * c;
#pragma unroll
  for (int i = 0; i < DPL; ++i) s.acc[i] = s.acc[i] * a + accc[i] * c;
  s.m = m_new;
}

// o = acc / l. No visible key: zeros (the contract). Visible keys whose scores are all -inf: NaN, as
// torch's softmax gives. A NaN or +inf score has already made l NaN (see the top of the file).
template <typename T, int DMAX>
__device__ __forceinline__ void write_output(const AttnParams& p, const State<DMAX / 32>& s, int64_t nkeys,
                                             int64_t b, int64_t h, int64_t j, int lane) {
  constexpr int DPL = DMAX / 32;
  T* o = static_cast<T*>(p.o) + b * p.os[0] + h * p.os[1] + j * p.os[2];
#pragma unroll
  for (int i = 0; i < DPL; ++i) {
    const int d = lane * DPL + i;
    if (d < p.D) {
      const float v = s.l == 0.0f ? (nkeys == 0 ? 0.0f : NAN) : s.acc[i] / s.l;
      o[d * p.os[3]] = detail::from_float<T>(v);
    }
  }
}

// Loads DPL consecutive elements of a shared-memory row as floats.
template <typename T, int DPL> __device__ __forceinline__ void load_row_part(const T* src, float (&out)[DPL]) {
  constexpr int kBytes = DPL * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int c = 0; c < kBytes / 16; ++c) {
      const uint4 raw = reinterpret_cast<const uint4*>(src)[c];
      detail::unpack16<T>(raw, out + c * (16 / sizeof(T)));
    }
  } else if constexpr (kBytes == 8) {
    const uint2 raw = *reinterpret_cast<const uint2*>(src);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < DPL; ++i) out[i] = detail::to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < DPL; ++i) out[i] = detail::to_float(src[i]);
  }
}

template <typename T, int DMAX> struct Smem {
  static constexpr int kVecElems = 16 / sizeof(T);
  static constexpr int kPitch = DMAX + kVecElems;  // +16 bytes: lane-per-row reads hit distinct banks
  static constexpr int kStageElems = 2 * kSub * kPitch;  // K then V
  static constexpr int kStageBytes = kStageElems * static_cast<int>(sizeof(T));
  // Enough stages to keep ~2 sub-blocks in flight per block while 4 blocks fit on an SM (decode
  // is bandwidth-bound: resident blocks matter more than pipeline depth).
  static constexpr int kStages = kStageBytes <= 10 * 1024 ? 4 : (kStageBytes <= 36 * 1024 ? 3 : 2);
  __host__ __device__ static constexpr int qbytes(int warps) { return warps * DMAX * 4; }
  __host__ __device__ static constexpr int bytes(int warps) { return qbytes(warps) + kStages * kStageBytes; }
};

template <typename T, int DMAX, bool VEC>
__global__ void __launch_bounds__(kMaxWarps * 32) attention_kernel(AttnParams p) {
  using S = Smem<T, DMAX>;
  constexpr int DPL = DMAX / 32;
  constexpr int VE = S::kVecElems;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sq = reinterpret_cast<float*>(smem_raw);
  T* skv = reinterpret_cast<T*>(smem_raw + S::qbytes(p.warps));

  // blockIdx.x = ((b * Hkv + hk) * head_blocks + hb) * Tq + j: consecutive queries share K/V in L2.
  int64_t bx = blockIdx.x;
  const int64_t j = bx % p.Tq;
  bx /= p.Tq;
  const int hb = static_cast<int>(bx % p.head_blocks);
  bx /= p.head_blocks;
  const int64_t hk = bx % p.Hkv;
  const int64_t b = bx / p.Hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nthreads = p.warps * 32;
  const int g = hb * p.warps + warp;  // index of this warp's head in the group
  const bool active = g < p.group;
  const int64_t h = hk * p.group + g;

  const KeyRange kr = key_range(p, b, j);
  const int64_t nkeys = kr.hi >= kr.lo ? kr.hi - kr.lo + 1 : 0;
  const int64_t nsub = (nkeys + kSub - 1) / kSub;
  const int64_t nchunks = (nkeys + kChunk - 1) / kChunk;
  int64_t s_begin = 0, s_end = nsub;
  if (p.splits > 1) {
    const int64_t c = blockIdx.z;
    if (c >= nchunks) return;  // the whole block: this query has fewer chunks
    s_begin = c * kSubsPerChunk;
    s_end = s_begin + kSubsPerChunk < nsub ? s_begin + kSubsPerChunk : nsub;
  }

  const int Dceil = static_cast<int>((p.D + VE - 1) / VE * VE);
  float* my_q = sq + warp * DMAX;
  if (active) {
    const T* q = static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1] + j * p.qs[2];
    for (int d = lane; d < Dceil; d += 32) my_q[d] = d < p.D ? detail::to_float(q[d * p.qs[3]]) : 0.0f;
  }

  const T* kbase = static_cast<const T*>(p.k) + kr.kv_row * p.ks[0] + hk * p.ks[1];
  const T* vbase = static_cast<const T*>(p.v) + kr.kv_row * p.vs[0] + hk * p.vs[1];
  // Stages sub-block s (keys lo + 32 s ...) into stage buffer `st`; rows past hi are zeros.
  auto load_sub = [&](int st, int64_t s) {
    T* sk = skv + st * S::kStageElems;
    T* sv = sk + kSub * S::kPitch;
    const int64_t key0 = kr.lo + s * kSub;
    if constexpr (VEC) {
      const int cpr = Dceil / VE;  // 16-byte chunks per row (D * sizeof(T) % 16 == 0 here)
      for (int c = threadIdx.x; c < kSub * cpr; c += nthreads) {
        const int r = c / cpr, cc = c % cpr;
        const int64_t key = key0 + r;
        const bool pred = key <= kr.hi;
        detail::cp_async16(sk + r * S::kPitch + cc * VE, pred ? kbase + key * p.ks[2] + cc * VE : kbase, pred);
        detail::cp_async16(sv + r * S::kPitch + cc * VE, pred ? vbase + key * p.vs[2] + cc * VE : vbase, pred);
      }
    } else {
      const T zero = detail::from_float<T>(0.0f);
      for (int e = threadIdx.x; e < kSub * Dceil; e += nthreads) {
        const int r = e / Dceil, d = e % Dceil;
        const int64_t key = key0 + r;
        const bool pred = key <= kr.hi && d < p.D;
        sk[r * S::kPitch + d] = pred ? kbase[key * p.ks[2] + d * p.ks[3]] : zero;
        sv[r * S::kPitch + d] = pred ? vbase[key * p.vs[2] + d * p.vs[3]] : zero;
      }
    }
  };

  State<DPL> run;  // the query's state (folds chunk states in order)
  run.clear();
  State<DPL> chunk;  // the current chunk's state
  chunk.clear();

  constexpr int STAGES = S::kStages;
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {
    if (s_begin + i < s_end) load_sub(i, s_begin + i);
    detail::cp_async_commit();
  }
  for (int64_t s = s_begin; s < s_end; ++s) {
    const int64_t idx = s - s_begin;
    detail::cp_async_wait<STAGES - 2>();
    __syncthreads();  // sub-block s visible to all; the buffer of s - 1 is free again
    if (s + STAGES - 1 < s_end) load_sub(static_cast<int>((idx + STAGES - 1) % STAGES), s + STAGES - 1);
    detail::cp_async_commit();
    if (!active) continue;

    const T* sk = skv + static_cast<int>(idx % STAGES) * S::kStageElems;
    const T* sv = sk + kSub * S::kPitch;
    const int64_t key0 = kr.lo + s * kSub;
    const int nvalid = kr.hi - key0 + 1 < kSub ? static_cast<int>(kr.hi - key0 + 1) : kSub;

    // Scores: lane r takes key r; fixed-order dot product.
    float score = -INFINITY;
    if (lane < nvalid) {
      float c4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const T* krow = sk + lane * S::kPitch;
      for (int d0 = 0; d0 < Dceil; d0 += VE) {
        float kv[VE];
        detail::unpack16<T>(*reinterpret_cast<const uint4*>(krow + d0), kv);
#pragma unroll
        for (int e = 0; e < VE; ++e) c4[e % 4] = fmaf(my_q[d0 + e], kv[e], c4[e % 4]);
      }
      score = ((c4[0] + c4[1]) + (c4[2] + c4[3])) * p.scale;
    }
    const float smax = detail::warp_max(score);
    const float m_new = fmaxf(chunk.m, smax);
    const float alpha = m_new == -INFINITY ? 1.0f : expf(chunk.m - m_new);
    const float prob = score == -INFINITY ? 0.0f : expf(score - m_new);
    chunk.l = chunk.l * alpha + detail::warp_sum_fixed(prob);
#pragma unroll
    for (int i = 0; i < DPL; ++i) chunk.acc[i] = chunk.acc[i] * alpha;
    for (int r = 0; r < nvalid; ++r) {
      const float pr = __shfl_sync(kFullMask, prob, r);
      float vv[DPL];
      load_row_part<T, DPL>(sv + r * S::kPitch + lane * DPL, vv);
#pragma unroll
      for (int i = 0; i < DPL; ++i) chunk.acc[i] = fmaf(pr, vv[i], chunk.acc[i]);
    }
    chunk.m = m_new;

    const bool chunk_done = (s + 1) % kSubsPerChunk == 0 || s + 1 == s_end;
    if (chunk_done) {
      if (p.splits > 1) {
        const int64_t c = s / kSubsPerChunk;
        float* ws = p.workspace + (((b * p.Hq + h) * p.Tq + j) * p.splits + c) * (p.D + 2);
        if (lane == 0) {
          ws[0] = chunk.m;
          ws[1] = chunk.l;
        }
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
          const int d = lane * DPL + i;
          if (d < p.D) ws[2 + d] = chunk.acc[i];
        }
      } else {
        fold(run, chunk.m, chunk.l, chunk.acc);
      }
      chunk.clear();
    }
  }
  detail::cp_async_wait<0>();
  if (active && p.splits == 1) write_output<T, DMAX>(p, run, nkeys, b, h, j, lane);
}

// Folds the chunk states of one query (one warp) in chunk order and writes o.
template <typename T, int DMAX> __global__ void __launch_bounds__(128) attention_combine_kernel(AttnParams p) {
  constexpr int DPL = DMAX / 32;
  const int64_t query = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (query >= p.B * p.Hq * p.Tq) return;
  const int64_t j = query % p.Tq;
  const int64_t h = (query / p.Tq) % p.Hq;
  const int64_t b = query / (p.Tq * p.Hq);
  const KeyRange kr = key_range(p, b, j);
  const int64_t nkeys = kr.hi >= kr.lo ? kr.hi - kr.lo + 1 : 0;
  const int64_t nchunks = (nkeys + kChunk - 1) / kChunk;
  State<DPL> run;
  run.clear();
  for (int64_t c = 0; c < nchunks; ++c) {
    const float* ws = p.workspace + (((b * p.Hq + h) * p.Tq + j) * p.splits + c) * (p.D + 2);
    float accc[DPL];
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      const int d = lane * DPL + i;
      accc[i] = d < p.D ? ws[2 + d] : 0.0f;
    }
    fold(run, ws[0], ws[1], accc);
  }
  write_output<T, DMAX>(p, run, nkeys, b, h, j, lane);
}

struct Plan {
  int warps = 1, head_blocks = 1, splits = 1;
  int64_t blocks = 0;
};

Plan make_plan(const AttentionArgs& a) {
  Plan pl;
  const int64_t group = a.Hq / a.Hkv;
  pl.warps = static_cast<int>(group < kMaxWarps ? group : kMaxWarps);
  pl.head_blocks = static_cast<int>((group + pl.warps - 1) / pl.warps);
  pl.blocks = a.B * a.Hkv * pl.head_blocks * a.Tq;
  const int64_t chunks = (a.Tk + kChunk - 1) / kChunk;
  // Split the keys across blocks when the queries alone cannot fill the GPU (decode at small
  // batch, long context). Speed only: both shapes give the same bits (see the top of the file).
  const int64_t sms = detail::current_device_sms();
  // Below ~4 blocks per SM the last wave would leave SMs idle for a whole query's key range.
  if (chunks > 1 && pl.blocks < 4 * sms && chunks <= 65535) {
    const int64_t ws = a.B * a.Hq * a.Tq * chunks * (a.D + 2) * 4;
    if (ws <= (int64_t{256} << 20)) pl.splits = static_cast<int>(chunks);
  }
  return pl;
}

bool valid(const AttentionArgs& a) {
  return a.B >= 0 && a.Hq > 0 && a.Hkv > 0 && a.Hq % a.Hkv == 0 && a.Tq >= 0 && a.Tk >= 0 && a.D > 0 &&
         a.D <= 256 && a.Bkv >= 0 && (a.kv_rows != nullptr || a.Bkv == a.B);
}

template <typename T, int DMAX> cudaError_t launch(const AttentionArgs& a, const Plan& pl, float* workspace,
                                                  cudaStream_t stream) {
  using S = Smem<T, DMAX>;
  constexpr int VE = S::kVecElems;
  AttnParams p{};
  p.q = a.q;
  p.k = a.k;
  p.v = a.v;
  p.o = a.o;
  p.kv_rows = a.kv_rows;
  p.kv_start = a.kv_start;
  p.workspace = workspace;
  p.B = a.B;
  p.Hq = a.Hq;
  p.Tq = a.Tq;
  p.D = a.D;
  p.Hkv = a.Hkv;
  p.Tk = a.Tk;
  p.Bkv = a.Bkv;
  for (int d = 0; d < 4; ++d) {
    p.qs[d] = a.q_stride[d];
    p.ks[d] = a.k_stride[d];
    p.vs[d] = a.v_stride[d];
    p.os[d] = a.o_stride[d];
  }
  p.window = a.window;
  p.scale = a.scale;
  p.causal = a.causal ? 1 : 0;
  p.group = static_cast<int>(a.Hq / a.Hkv);
  p.warps = pl.warps;
  p.head_blocks = pl.head_blocks;
  p.splits = pl.splits;

  auto strides_ok = [](const int64_t* s) { return s[0] % VE == 0 && s[1] % VE == 0 && s[2] % VE == 0 && s[3] == 1; };
  const bool vec = a.D % VE == 0 && detail::aligned16(a.k) && detail::aligned16(a.v) && strides_ok(a.k_stride) &&
                   strides_ok(a.v_stride);
  if (pl.blocks > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(pl.blocks), 1, static_cast<unsigned>(pl.splits));
  const int threads = pl.warps * 32;
  const int smem = S::bytes(pl.warps);
  cudaError_t err = vec ? detail::allow_smem<attention_kernel<T, DMAX, true>>(S::bytes(kMaxWarps))
                        : detail::allow_smem<attention_kernel<T, DMAX, false>>(S::bytes(kMaxWarps));
  if (err != cudaSuccess) return err;
  if (vec) {
    attention_kernel<T, DMAX, true><<<grid, threads, smem, stream>>>(p);
  } else {
    attention_kernel<T, DMAX, false><<<grid, threads, smem, stream>>>(p);
  }
  if (pl.splits > 1) {
    const int64_t queries = a.B * a.Hq * a.Tq;
    const int64_t blocks = (queries + 3) / 4;
    if (blocks > INT32_MAX) return cudaErrorInvalidValue;
    attention_combine_kernel<T, DMAX><<<static_cast<unsigned>(blocks), 128, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T> cudaError_t launch_by_dim(const AttentionArgs& a, const Plan& pl, float* ws, cudaStream_t stream) {
  if (a.D <= 64) return launch<T, 64>(a, pl, ws, stream);
  if (a.D <= 128) return launch<T, 128>(a, pl, ws, stream);
  return launch<T, 256>(a, pl, ws, stream);
}

}  // namespace

size_t attention_workspace_bytes(const AttentionArgs& a) {
  if (!valid(a) || a.B == 0 || a.Tq == 0) return 0;
  const Plan pl = make_plan(a);
  if (pl.splits <= 1) return 0;
  return static_cast<size_t>(a.B * a.Hq * a.Tq * pl.splits * (a.D + 2)) * sizeof(float);
}

cudaError_t attention(const AttentionArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!valid(a)) return cudaErrorInvalidValue;
  if (a.B == 0 || a.Tq == 0) return cudaSuccess;
  const Plan pl = make_plan(a);
  if (pl.splits > 1) {
    const size_t need = static_cast<size_t>(a.B * a.Hq * a.Tq * pl.splits * (a.D + 2)) * sizeof(float);
    if (workspace == nullptr || workspace_bytes < need) return cudaErrorInvalidValue;
  }
  float* ws = static_cast<float*>(workspace);
  switch (a.dtype) {
    case DType::kBFloat16: return launch_by_dim<__nv_bfloat16>(a, pl, ws, stream);
    case DType::kFloat16: return launch_by_dim<__half>(a, pl, ws, stream);
    case DType::kFloat32: break;
  }
  return launch_by_dim<float>(a, pl, ws, stream);
}

}  // namespace margingate::cuda
