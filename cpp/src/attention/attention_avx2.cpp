// attention: AVX2 chunk kernel (8 lanes). Compiled with -mavx2 -mfma -mf16c; called only when the
// CPU has them and AVX-512 is not in use.
//
// The same arithmetic as the scalar and AVX-512 kernels (attention_impl.h), lane by lane: a key
// vector holds 8 keys of the transposed chunk, each score is the fma chain over d, and the 16-lane
// sum tree of the weights is rebuilt from two 8-lane halves (lanes 0-7 = key vectors 0, 2, 4, 6;
// lanes 8-15 = key vectors 1, 3, 5, 7), so all three levels give the same bits.
#include <immintrin.h>

#include <algorithm>
#include <climits>

#include "attention_impl.h"

namespace margingate::attention_impl {

namespace {

constexpr int kTileQueries = 3;  // 3 queries x 4 vectors = 12 of the 16 ymm registers

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16_t* p) {
  const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(w), 16));
}
inline __m256 load8(const fp16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// First n (< 8) elements, zeros after: through a small buffer (AVX2 has no 16-bit masked load).
template <typename T>
inline __m256 load8_partial(const T* p, int64_t n) {
  T buf[8] = {};
  for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
  return load8(buf);
}

inline void store8_partial(float* p, __m256 x, int64_t n) {
  alignas(32) float buf[8];
  _mm256_store_ps(buf, x);
  for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
}

// Lanes [0, n) set.
inline __m256 lane_mask(int64_t n) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, 8))), iota));
}

// The one vector exp2 of this level, for x <= 0: the lane-wise twin of exp2_nonpositive.
inline __m256 exp2v(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(kExp2Min), _CMP_NLT_UQ);
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 y = _mm256_set1_ps(kExp2P0);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kExp2P1));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kExp2P2));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kExp2P3));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kExp2P4));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kExp2P5));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.0f));
  const __m256i ni = _mm256_cvttps_epi32(_mm256_and_ps(keep, n));
  const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23));
  return _mm256_and_ps(keep, _mm256_mul_ps(y, two_n));
}

// The contract's tree from the two halves of the 16 lanes: (i, i+8), (i, i+4), (i, i+2), (0, 1).
inline float tree_sum(__m256 low, __m256 high) {
  const __m256 h8 = _mm256_add_ps(low, high);
  const __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
  const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
  const __m128 h1 = _mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1));
  return _mm_cvtss_f32(h1);
}

inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xee);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xee);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// kt[d][i] = k[t0 + i][d] for i < 8 * nkv (zeros past t1), fp32.
template <typename T>
void transpose_keys(const Group& g, int64_t t0, int64_t t1, int nkv, float* kt) {
  const AttentionArgs& a = *g.args;
  const T* base = static_cast<const T*>(a.k) + g.kv_row * a.k_stride[0] + g.kv_head * a.k_stride[1];
  const int64_t D = a.D;
  for (int tb = 0; tb < nkv; ++tb) {
    for (int64_t d0 = 0; d0 < D; d0 += 8) {
      const int64_t width = std::min<int64_t>(8, D - d0);
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t t = t0 + tb * 8 + i;
        const T* row = base + t * a.k_stride[2] + d0;
        r[i] = t >= t1 ? _mm256_setzero_ps() : width == 8 ? load8(row) : load8_partial(row, width);
      }
      transpose8(r);
      for (int64_t dd = 0; dd < width; ++dd) _mm256_storeu_ps(kt + (d0 + dd) * kKtStride + tb * 8, r[dd]);
    }
  }
}

// scores[i][8 k0 .. 8 (k0 + NKV)) = (fma chain over d of q_i[d] * kt[d][.]) * c2.
template <int NQ, int NKV>
void scores_tile(const float* kt, const float* const* q, int64_t D, float c2, float* const* out) {
  __m256 acc[NQ][NKV];
  for (int i = 0; i < NQ; ++i)
    for (int j = 0; j < NKV; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m256 k[NKV];
    for (int j = 0; j < NKV; ++j) k[j] = _mm256_loadu_ps(kt + d * kKtStride + 8 * j);
    for (int i = 0; i < NQ; ++i) {
      const __m256 qb = _mm256_broadcast_ss(q[i] + d);
      for (int j = 0; j < NKV; ++j) acc[i][j] = _mm256_fmadd_ps(qb, k[j], acc[i][j]);
    }
  }
  const __m256 c = _mm256_set1_ps(c2);
  for (int i = 0; i < NQ; ++i)
    for (int j = 0; j < NKV; ++j) _mm256_storeu_ps(out[i] + 8 * j, _mm256_mul_ps(acc[i][j], c));
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
    default: return scores_for<3>(nkv);
  }
}

// out[i][0 .. width) = fma chain over union rows u in [begin[i], end[i]) of p_i[u] * v[u][0 .. width),
// width <= 32.
template <typename T, int NQ>
void pv_tile(const T* v, int64_t v_row_stride, int u_begin, int u_end, const float* const* p, const int* begin,
             const int* end, int64_t width, float* const* out) {
  const int ndv = static_cast<int>((width + 7) / 8);
  const int64_t last = width - 8 * (ndv - 1);
  __m256 acc[NQ][4];
  for (int i = 0; i < NQ; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int u = u_begin; u < u_end; ++u) {
    const T* row = v + u * v_row_stride;
    __m256 x[4];
    for (int j = 0; j < 4; ++j) {
      if (j < ndv) x[j] = (j < ndv - 1 || last == 8) ? load8(row + 8 * j) : load8_partial(row + 8 * j, last);
    }
    for (int i = 0; i < NQ; ++i) {
      if (u < begin[i] || u >= end[i]) continue;  // outside this query's chunk
      const __m256 pb = _mm256_broadcast_ss(p[i] + u);
      for (int j = 0; j < 4; ++j) {
        if (j < ndv) acc[i][j] = _mm256_fmadd_ps(pb, x[j], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < NQ; ++i) {
    for (int j = 0; j < ndv; ++j) {
      if (j < ndv - 1 || last == 8) {
        _mm256_storeu_ps(out[i] + 8 * j, acc[i][j]);
      } else {
        store8_partial(out[i] + 8 * j, acc[i][j], last);
      }
    }
  }
}

template <typename T>
void chunk_avx2_typed(const Group& g, int64_t c, const Scratch& s, float* m_c, float* l_c, float* a_c) {
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
  const int nkv = static_cast<int>((u1 - u0 + 7) / 8);  // 8-key vectors of the union (<= 10)

  transpose_keys<T>(g, u0, u1, nkv, s.kt);

  // Scores: key vectors in groups of up to 4 (32 keys), queries in tiles of up to 3.
  for (int k0 = 0; k0 < nkv; k0 += 4) {
    const int cnt_k = std::min(4, nkv - k0);
    for (int i0 = 0; i0 < na; i0 += kTileQueries) {
      const int cnt = std::min(kTileQueries, na - i0);
      const float* q[kTileQueries];
      float* out[kTileQueries];
      for (int i = 0; i < cnt; ++i) {
        q[i] = g.qf + act[i0 + i] * D;
        out[i] = s.p + act[i0 + i] * kUnion + 8 * k0;
      }
      scores_kernel(cnt, cnt_k)(s.kt + 8 * k0, q, D, g.c2, out);
    }
  }

  // Chunk maximum, weights and their sum, per query, in lanes counted from its chunk's first key.
  for (int i = 0; i < na; ++i) {
    float* p = s.p + act[i] * kUnion + off[i];
    const int nj = (n[i] + 7) / 8;
    const __m256 neg_inf = _mm256_set1_ps(-INFINITY);
    __m256 mx = neg_inf;
    for (int j = 0; j < nj; ++j) {
      mx = _mm256_max_ps(mx, _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(p + 8 * j), lane_mask(n[i] - 8 * j)));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mx);
    float m = lanes[0];
    for (int l = 1; l < 8; ++l) m = std::max(m, lanes[l]);  // a max is exact in any order
    const __m256 mv = _mm256_set1_ps(m);
    __m256 low = _mm256_setzero_ps(), high = _mm256_setzero_ps();
    for (int j = 0; j < nj; ++j) {
      const __m256 w = _mm256_and_ps(lane_mask(n[i] - 8 * j), exp2v(_mm256_sub_ps(_mm256_loadu_ps(p + 8 * j), mv)));
      _mm256_storeu_ps(p + 8 * j, w);
      __m256& half = (j % 2 == 0) ? low : high;
      half = j < 2 ? w : _mm256_add_ps(half, w);
    }
    m_c[act[i]] = m;
    l_c[act[i]] = tree_sum(low, high);
  }

  // p.v, 32 columns of D at a time; each query's chain runs over its own keys in order.
  const T* vbase = static_cast<const T*>(a.v) + g.kv_row * a.v_stride[0] + g.kv_head * a.v_stride[1] + u0 * a.v_stride[2];
  int begin[kTileQueries], end[kTileQueries];
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    const int64_t width = std::min<int64_t>(32, D - d0);
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
        default: pv_tile<T, 3>(vbase + d0, a.v_stride[2], ub, ue, p, begin, end, width, out); break;
      }
    }
  }
}

void chunk_avx2(const Group& g, int64_t t0, const Scratch& s, float* m_c, float* l_c, float* a_c) {
  switch (g.args->dtype) {
    case DType::kFloat32: chunk_avx2_typed<float>(g, t0, s, m_c, l_c, a_c); break;
    case DType::kFloat16: chunk_avx2_typed<fp16_t>(g, t0, s, m_c, l_c, a_c); break;
    case DType::kBFloat16: chunk_avx2_typed<bf16_t>(g, t0, s, m_c, l_c, a_c); break;
  }
}

void combine_avx2(int64_t D, float* m, float* l, float* acc, float m_c, float l_c, const float* a_c) {
  const float m_new = std::max(*m, m_c);
  const float alpha = exp2_nonpositive(*m - m_new);
  const float beta = exp2_nonpositive(m_c - m_new);
  *m = m_new;
  *l = std::fma(*l, alpha, l_c * beta);
  const __m256 av = _mm256_set1_ps(alpha), bv = _mm256_set1_ps(beta);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 y = _mm256_mul_ps(_mm256_loadu_ps(a_c + d), bv);
    _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(_mm256_loadu_ps(acc + d), av, y));
  }
  for (; d < D; ++d) acc[d] = std::fma(acc[d], alpha, a_c[d] * beta);
}

}  // namespace

const Kernels& kernels_avx2() {
  static const Kernels k{&chunk_avx2, &combine_avx2};
  return k;
}

}  // namespace margingate::attention_impl
