// attention: NEON chunk kernel (aarch64; Advanced SIMD is part of the base ISA, so no flag and no
// check).
//
// The same arithmetic as the scalar, AVX2 and AVX-512 kernels (attention_impl.h), lane by lane: a
// key vector holds 4 keys of the transposed chunk, each score is the fma chain over d, and the
// 16-lane sum tree of the weights is kept as four 4-lane registers (register r holds lanes
// 4r .. 4r + 3, so key vector j of a chunk adds into register j % 4), so every level gives the
// same bits. margingate_bench --check compares this kernel with the scalar one bit for bit.
#include <arm_neon.h>

#include <algorithm>
#include <climits>

#include "attention_impl.h"

namespace margingate::attention_impl {

namespace {

constexpr int kTileQueries = 4;  // 4 queries x 4 key vectors = 16 of the 32 q registers
constexpr int kTileKeys = 4;     // key vectors (of 4 keys) per score tile

inline float32x4_t load4(const float* p) { return vld1q_f32(p); }
inline float32x4_t load4(const bf16_t* p) {  // bf16 -> fp32 is a 16-bit shift: exact
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
}
inline float32x4_t load4(const fp16_t* p) { return vcvt_f32_f16(vld1_f16(reinterpret_cast<const float16_t*>(p))); }

// First n (< 4) elements, zeros after.
template <typename T>
inline float32x4_t load4_partial(const T* p, int64_t n) {
  T buf[4] = {};
  for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
  return load4(buf);
}

inline void store4_partial(float* p, float32x4_t x, int64_t n) {
  float buf[4];
  vst1q_f32(buf, x);
  for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
}

// Lanes [0, n) set.
inline uint32x4_t lane_mask(int64_t n) {
  const int32_t iota[4] = {0, 1, 2, 3};
  return vcgtq_s32(vdupq_n_s32(static_cast<int32_t>(std::clamp<int64_t>(n, 0, 4))), vld1q_s32(iota));
}

inline float32x4_t and_mask(uint32x4_t mask, float32x4_t x) {
  return vreinterpretq_f32_u32(vandq_u32(mask, vreinterpretq_u32_f32(x)));
}

// The one vector exp2 of this level, for x <= 0: the lane-wise twin of exp2_nonpositive.
inline float32x4_t exp2v(float32x4_t x) {
  const uint32x4_t keep = vmvnq_u32(vcltq_f32(x, vdupq_n_f32(kExp2Min)));  // !(x < min): NaN kept
  const float32x4_t n = vrndnq_f32(x);  // to nearest, ties to even, as std::nearbyint
  const float32x4_t f = vsubq_f32(x, n);
  float32x4_t y = vdupq_n_f32(kExp2P0);
  y = vfmaq_f32(vdupq_n_f32(kExp2P1), y, f);
  y = vfmaq_f32(vdupq_n_f32(kExp2P2), y, f);
  y = vfmaq_f32(vdupq_n_f32(kExp2P3), y, f);
  y = vfmaq_f32(vdupq_n_f32(kExp2P4), y, f);
  y = vfmaq_f32(vdupq_n_f32(kExp2P5), y, f);
  y = vfmaq_f32(vdupq_n_f32(1.0f), y, f);
  const int32x4_t ni = vcvtq_s32_f32(and_mask(keep, n));
  const float32x4_t two_n = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(ni, vdupq_n_s32(127)), 23));
  return and_mask(keep, vmulq_f32(y, two_n));
}

// The contract's tree over 16 lanes held as r[0..3] (lanes 4r .. 4r + 3):
// (i, i+8), (i, i+4), (i, i+2), (0, 1).
inline float tree_sum(const float32x4_t r[4]) {
  const float32x4_t h8a = vaddq_f32(r[0], r[2]), h8b = vaddq_f32(r[1], r[3]);  // lanes 0-3, 4-7
  const float32x4_t h4 = vaddq_f32(h8a, h8b);
  const float32x2_t h2 = vadd_f32(vget_low_f32(h4), vget_high_f32(h4));
  return vget_lane_f32(h2, 0) + vget_lane_f32(h2, 1);
}

// kt[d][i] = k[t0 + i][d] for i < 4 * nkv (zeros past t1), fp32.
template <typename T>
void transpose_keys(const Group& g, int64_t t0, int64_t t1, int nkv, float* kt) {
  const AttentionArgs& a = *g.args;
  const T* base = static_cast<const T*>(a.k) + g.kv_row * a.k_stride[0] + g.kv_head * a.k_stride[1];
  const int64_t D = a.D;
  for (int tb = 0; tb < nkv; ++tb) {
    for (int64_t d0 = 0; d0 < D; d0 += 4) {
      const int64_t width = std::min<int64_t>(4, D - d0);
      float32x4_t r[4];
      for (int i = 0; i < 4; ++i) {
        const int64_t t = t0 + tb * 4 + i;
        const T* row = base + t * a.k_stride[2] + d0;
        r[i] = t >= t1 ? vdupq_n_f32(0.0f) : width == 4 ? load4(row) : load4_partial(row, width);
      }
      const float32x4x2_t t01 = vtrnq_f32(r[0], r[1]), t23 = vtrnq_f32(r[2], r[3]);
      const float32x4_t c[4] = {vcombine_f32(vget_low_f32(t01.val[0]), vget_low_f32(t23.val[0])),
                                vcombine_f32(vget_low_f32(t01.val[1]), vget_low_f32(t23.val[1])),
                                vcombine_f32(vget_high_f32(t01.val[0]), vget_high_f32(t23.val[0])),
                                vcombine_f32(vget_high_f32(t01.val[1]), vget_high_f32(t23.val[1]))};
      for (int64_t dd = 0; dd < width; ++dd) vst1q_f32(kt + (d0 + dd) * kKtStride + tb * 4, c[dd]);
    }
  }
}

// scores[i][4 k0 .. 4 (k0 + NKV)) = (fma chain over d of q_i[d] * kt[d][.]) * c2.
template <int NQ, int NKV>
void scores_tile(const float* kt, const float* const* q, int64_t D, float c2, float* const* out) {
  float32x4_t acc[NQ][NKV];
  for (int i = 0; i < NQ; ++i)
    for (int j = 0; j < NKV; ++j) acc[i][j] = vdupq_n_f32(0.0f);
  for (int64_t d = 0; d < D; ++d) {
    float32x4_t k[NKV];
    for (int j = 0; j < NKV; ++j) k[j] = vld1q_f32(kt + d * kKtStride + 4 * j);
    for (int i = 0; i < NQ; ++i) {
      const float32x4_t qb = vdupq_n_f32(q[i][d]);
      for (int j = 0; j < NKV; ++j) acc[i][j] = vfmaq_f32(acc[i][j], qb, k[j]);
    }
  }
  const float32x4_t c = vdupq_n_f32(c2);
  for (int i = 0; i < NQ; ++i)
    for (int j = 0; j < NKV; ++j) vst1q_f32(out[i] + 4 * j, vmulq_f32(acc[i][j], c));
}

using ScoresFn = void (*)(const float*, const float* const*, int64_t, float, float* const*);

template <int NQ>
ScoresFn scores_for(int nkv) {
  switch (nkv) {
    case 1: return &scores_tile<NQ, 1>;
    case 2: return &scores_tile<NQ, 2>;
    case 3: return &scores_tile<NQ, 3>;
    default: return &scores_tile<NQ, 4>;
  }
}

ScoresFn scores_kernel(int nq, int nkv) {
  switch (nq) {
    case 1: return scores_for<1>(nkv);
    case 2: return scores_for<2>(nkv);
    case 3: return scores_for<3>(nkv);
    default: return scores_for<4>(nkv);
  }
}

// out[i][0 .. width) = fma chain over union rows u in [begin[i], end[i]) of p_i[u] * v[u][0 .. width),
// width <= 16.
template <typename T, int NQ>
void pv_tile(const T* v, int64_t v_row_stride, int u_begin, int u_end, const float* const* p, const int* begin,
             const int* end, int64_t width, float* const* out) {
  const int ndv = static_cast<int>((width + 3) / 4);
  const int64_t last = width - 4 * (ndv - 1);
  float32x4_t acc[NQ][4];
  for (int i = 0; i < NQ; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = vdupq_n_f32(0.0f);
  for (int u = u_begin; u < u_end; ++u) {
    const T* row = v + u * v_row_stride;
    float32x4_t x[4];
    for (int j = 0; j < 4; ++j) {
      if (j < ndv) x[j] = (j < ndv - 1 || last == 4) ? load4(row + 4 * j) : load4_partial(row + 4 * j, last);
    }
    for (int i = 0; i < NQ; ++i) {
      if (u < begin[i] || u >= end[i]) continue;  // outside this query's chunk
      const float32x4_t pb = vdupq_n_f32(p[i][u]);
      for (int j = 0; j < 4; ++j) {
        if (j < ndv) acc[i][j] = vfmaq_f32(acc[i][j], pb, x[j]);
      }
    }
  }
  for (int i = 0; i < NQ; ++i) {
    for (int j = 0; j < ndv; ++j) {
      if (j < ndv - 1 || last == 4) {
        vst1q_f32(out[i] + 4 * j, acc[i][j]);
      } else {
        store4_partial(out[i] + 4 * j, acc[i][j], last);
      }
    }
  }
}

template <typename T>
void chunk_neon_typed(const Group& g, int64_t c, const Scratch& s, float* m_c, float* l_c, float* a_c) {
  const AttentionArgs& a = *g.args;
  const int64_t D = a.D;

  // Queries that have a chunk c, and the union [u0, u1) of their chunks' keys.
  int* act = s.active;
  int* off = s.offset;
  int* n = s.count;
  int na = 0;
  int64_t u0 = INT64_MAX, u1 = INT64_MIN;
  for (int qi = 0; qi < g.nq; ++qi) {
    if (!g.sees(qi, c)) continue;
    const int64_t start = g.chunk_start(qi, c), end = std::min(start + kChunk, g.hi[qi] + 1);
    act[na] = qi;
    n[na] = static_cast<int>(end - start);
    ++na;
    u0 = std::min(u0, start);
    u1 = std::max(u1, end);
  }
  if (na == 0) return;
  for (int i = 0; i < na; ++i) off[i] = static_cast<int>(g.chunk_start(act[i], c) - u0);
  const int nkv = static_cast<int>((u1 - u0 + 3) / 4);  // 4-key vectors of the union (<= 20)

  transpose_keys<T>(g, u0, u1, nkv, s.kt);

  // Scores: key vectors in groups of up to 4 (16 keys), queries in tiles of up to 4.
  for (int k0 = 0; k0 < nkv; k0 += kTileKeys) {
    const int cnt_k = std::min(kTileKeys, nkv - k0);
    for (int i0 = 0; i0 < na; i0 += kTileQueries) {
      const int cnt = std::min(kTileQueries, na - i0);
      const float* q[kTileQueries];
      float* out[kTileQueries];
      for (int i = 0; i < cnt; ++i) {
        q[i] = g.qf + act[i0 + i] * D;
        out[i] = s.p + act[i0 + i] * kUnion + 4 * k0;
      }
      scores_kernel(cnt, cnt_k)(s.kt + 4 * k0, q, D, g.c2, out);
    }
  }

  // Chunk maximum, weights and their sum, per query, in lanes counted from its chunk's first key.
  for (int i = 0; i < na; ++i) {
    float* p = s.p + act[i] * kUnion + off[i];
    const int nj = (n[i] + 3) / 4;
    const float32x4_t neg_inf = vdupq_n_f32(-INFINITY);
    float32x4_t mx = neg_inf;
    for (int j = 0; j < nj; ++j) {
      mx = vmaxq_f32(mx, vbslq_f32(lane_mask(n[i] - 4 * j), vld1q_f32(p + 4 * j), neg_inf));
    }
    const float m = vmaxvq_f32(mx);  // a max is exact in any order
    const float32x4_t mv = vdupq_n_f32(m);
    float32x4_t lanes[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
    for (int j = 0; j < nj; ++j) {
      const float32x4_t w = and_mask(lane_mask(n[i] - 4 * j), exp2v(vsubq_f32(vld1q_f32(p + 4 * j), mv)));
      vst1q_f32(p + 4 * j, w);
      lanes[j % 4] = j < 4 ? w : vaddq_f32(lanes[j % 4], w);
    }
    m_c[act[i]] = m;
    l_c[act[i]] = tree_sum(lanes);
  }

  // p.v, 16 columns of D at a time; each query's chain runs over its own keys in order.
  const T* vbase = static_cast<const T*>(a.v) + g.kv_row * a.v_stride[0] + g.kv_head * a.v_stride[1] + u0 * a.v_stride[2];
  int begin[kTileQueries], end[kTileQueries];
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    const int64_t width = std::min<int64_t>(16, D - d0);
    for (int i0 = 0; i0 < na; i0 += kTileQueries) {
      const int cnt = std::min(kTileQueries, na - i0);
      const float* p[kTileQueries];
      float* out[kTileQueries];
      int ub = kUnion, ue = 0;
      for (int i = 0; i < cnt; ++i) {
        p[i] = s.p + act[i0 + i] * kUnion;
        out[i] = a_c + act[i0 + i] * D + d0;
        begin[i] = off[i0 + i];
        end[i] = off[i0 + i] + n[i0 + i];
        ub = std::min(ub, begin[i]);
        ue = std::max(ue, end[i]);
      }
      switch (cnt) {
        case 1: pv_tile<T, 1>(vbase + d0, a.v_stride[2], ub, ue, p, begin, end, width, out); break;
        case 2: pv_tile<T, 2>(vbase + d0, a.v_stride[2], ub, ue, p, begin, end, width, out); break;
        case 3: pv_tile<T, 3>(vbase + d0, a.v_stride[2], ub, ue, p, begin, end, width, out); break;
        default: pv_tile<T, 4>(vbase + d0, a.v_stride[2], ub, ue, p, begin, end, width, out); break;
      }
    }
  }
}

void chunk_neon(const Group& g, int64_t t0, const Scratch& s, float* m_c, float* l_c, float* a_c) {
  switch (g.args->dtype) {
    case DType::kFloat32: chunk_neon_typed<float>(g, t0, s, m_c, l_c, a_c); break;
    case DType::kFloat16: chunk_neon_typed<fp16_t>(g, t0, s, m_c, l_c, a_c); break;
    case DType::kBFloat16: chunk_neon_typed<bf16_t>(g, t0, s, m_c, l_c, a_c); break;
  }
}

void combine_neon(int64_t D, float* m, float* l, float* acc, float m_c, float l_c, const float* a_c) {
  const float m_new = std::max(*m, m_c);
  const float alpha = exp2_nonpositive(*m - m_new);
  const float beta = exp2_nonpositive(m_c - m_new);
  *m = m_new;
  *l = std::fma(*l, alpha, l_c * beta);
  const float32x4_t av = vdupq_n_f32(alpha), bv = vdupq_n_f32(beta);
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    const float32x4_t y = vmulq_f32(vld1q_f32(a_c + d), bv);
    vst1q_f32(acc + d, vfmaq_f32(y, vld1q_f32(acc + d), av));
  }
  for (; d < D; ++d) acc[d] = std::fma(acc[d], alpha, a_c[d] * beta);
}

}  // namespace

const Kernels& kernels_neon() {
  static const Kernels k{&chunk_neon, &combine_neon};
  return k;
}

}  // namespace margingate::attention_impl
