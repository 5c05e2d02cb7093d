// attention: AVX-512 chunk kernel. Compiled with -mavx512*; called only when the CPU has AVX-512.
//
// Same arithmetic as the scalar kernel (attention_impl.h), lane by lane: the keys of a step (the
// union of the group's chunk c, at most kUnion = 80 keys, since under a sliding window the chunks
// of neighbouring positions are offset by a key per position) are transposed to fp32 kt[d][key]
// so that one vector holds 16 keys, and each score is the fma chain over d of
// broadcast(q[d]) * kt[d][keys] (exactly the scalar chain, 16 keys at a time). A query then reads
// its own chunk's scores at its offset in the union. The transposed keys are reused by every query
// of the group (G heads x a block of positions), and so is each loaded V row in the p.v
// accumulation, which is what makes decode stream K/V once per GQA group. Short chunks mask lanes
// instead of changing the order of anything.
#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "attention_impl.h"

namespace margingate::attention_impl {

namespace {

constexpr int kMaxTileQueries = 6;  // queries per register tile (x 4 vectors = 24 accumulators)

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const bf16_t* p, __mmask16 m) {
  const __m256i w = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16));
}
inline __m512 load16(const fp16_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
// Full-width loads: masked loads are much slower on some cores (AMD), so use them only for tails.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16_t* p) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16));
}
inline __m512 load16(const fp16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << std::max<int64_t>(n, 0)) - 1u);
}

// The one vector exp2, for x <= 0: the lane-wise twin of exp2_nonpositive.
inline __m512 exp2v(__m512 x) {
  // "not less than" keeps NaN lanes (NaN in, NaN out, like the scalar version).
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExp2Min), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 y = _mm512_set1_ps(kExp2P0);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kExp2P1));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kExp2P2));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kExp2P3));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kExp2P4));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kExp2P5));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
  const __m512i ni = _mm512_cvttps_epi32(_mm512_maskz_mov_ps(keep, n));
  const __m512 two_n = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(ni, _mm512_set1_epi32(127)), 23));
  return _mm512_maskz_mov_ps(keep, _mm512_mul_ps(y, two_n));
}

// The fixed lane tree of the contract: (i, i+8), (i, i+4), (i, i+2), (0, 1).
inline float tree_sum(__m512 v) {
  const __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
  const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
  const __m128 h1 = _mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1));
  return _mm_cvtss_f32(h1);
}

// In-register 16x16 transpose: r[i][j] -> r[j][i].
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xee);
    u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  // After the in-lane steps, u[4a + c] holds 4x4 blocks of rows 4a..4a+3; two rounds of 128-bit
  // lane shuffles move the blocks to their transposed places.
  for (int i = 0; i < 16; i += 8) {
    for (int c = 0; c < 4; ++c) {
      t[i + c] = _mm512_shuffle_f32x4(u[i + c], u[i + 4 + c], 0x88);
      t[i + 4 + c] = _mm512_shuffle_f32x4(u[i + c], u[i + 4 + c], 0xdd);
    }
  }
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd);
  }
}

// The two fp32 values packed in each 32-bit lane of `pairs` (element 2c in the low half, 2c + 1
// in the high half), for bf16 and fp16 storage. Exact, like every 16-bit -> fp32 conversion.
inline __m512 low_half(__m512 pairs, bf16_t) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(pairs), 16));
}
inline __m512 high_half(__m512 pairs, bf16_t) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(pairs), _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
inline __m512 low_half(__m512 pairs, fp16_t) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_castps_si512(pairs))); }
inline __m512 high_half(__m512 pairs, fp16_t) {
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(pairs), 16)));
}

// 16-bit keys: transpose 16 keys x 32 elements of D as 16 x 16 32-bit pairs (half the shuffles of
// converting first), then split each pair into two fp32 rows of kt. Shuffles only move bits.
template <typename T>
void transpose_keys_16bit(const Group& g, int64_t t0, int64_t t1, int nkv, float* kt) {
  const AttentionArgs& a = *g.args;
  const T* base = static_cast<const T*>(a.k) + g.kv_row * a.k_stride[0] + g.kv_head * a.k_stride[1];
  const int64_t D = a.D;
  for (int tb = 0; tb < nkv; ++tb) {
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      const int64_t width = std::min<int64_t>(32, D - d0);
      const __mmask32 dm = width == 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << width) - 1u);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t t = t0 + tb * 16 + i;
        const T* row = base + t * a.k_stride[2] + d0;
        if (t >= t1) {
          r[i] = _mm512_setzero_ps();
        } else if (width == 32) {
          r[i] = _mm512_castsi512_ps(_mm512_loadu_si512(row));
        } else {
          r[i] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(dm, row));
        }
      }
      transpose16(r);
      for (int64_t c = 0; 2 * c < width; ++c) {
        float* out = kt + (d0 + 2 * c) * kKtStride + tb * 16;
        _mm512_storeu_ps(out, low_half(r[c], T{}));
        if (2 * c + 1 < width) _mm512_storeu_ps(out + kKtStride, high_half(r[c], T{}));
      }
    }
  }
}

// kt[d][i] = k[t0 + i][d] for i < 16 * nkv (zeros past t1), fp32.
template <typename T>
void transpose_keys(const Group& g, int64_t t0, int64_t t1, int nkv, float* kt) {
  const AttentionArgs& a = *g.args;
  if constexpr (!std::is_same_v<T, float>) {
    transpose_keys_16bit<T>(g, t0, t1, nkv, kt);
    return;
  }
  const T* base = static_cast<const T*>(a.k) + g.kv_row * a.k_stride[0] + g.kv_head * a.k_stride[1];
  const int64_t D = a.D;
  for (int tb = 0; tb < nkv; ++tb) {
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const __mmask16 dm = first_lanes(D - d0);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t t = t0 + tb * 16 + i;
        if (t >= t1) {
          r[i] = _mm512_setzero_ps();
        } else {
          r[i] = dm == 0xffff ? load16(base + t * a.k_stride[2] + d0) : load16(base + t * a.k_stride[2] + d0, dm);
        }
      }
      transpose16(r);
      const int64_t rows = std::min<int64_t>(16, D - d0);
      for (int64_t dd = 0; dd < rows; ++dd) _mm512_storeu_ps(kt + (d0 + dd) * kKtStride + tb * 16, r[dd]);
    }
  }
}

// scores[i][0 .. 16 NKV) = (fma chain over d of q_i[d] * kt[d][.]) * c2.
template <int NQ, int NKV>
void scores_tile(const float* kt, const float* const* q, int64_t D, float c2, float* const* out) {
  __m512 acc[NQ][NKV];
  for (int i = 0; i < NQ; ++i)
    for (int j = 0; j < NKV; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 k[NKV];
    for (int j = 0; j < NKV; ++j) k[j] = _mm512_loadu_ps(kt + d * kKtStride + 16 * j);
    for (int i = 0; i < NQ; ++i) {
      const __m512 qb = _mm512_set1_ps(q[i][d]);
      for (int j = 0; j < NKV; ++j) acc[i][j] = _mm512_fmadd_ps(qb, k[j], acc[i][j]);
    }
  }
  const __m512 c = _mm512_set1_ps(c2);
  for (int i = 0; i < NQ; ++i)
    for (int j = 0; j < NKV; ++j) _mm512_storeu_ps(out[i] + 16 * j, _mm512_mul_ps(acc[i][j], c));
}

using ScoresFn = void (*)(const float*, const float* const*, int64_t, float, float* const*);

template <int NQ>
constexpr ScoresFn scores_for(int nkv) {
  return nkv == 1 ? &scores_tile<NQ, 1> : nkv == 2 ? &scores_tile<NQ, 2> : nkv == 3 ? &scores_tile<NQ, 3> : &scores_tile<NQ, 4>;
}

ScoresFn scores_kernel(int nq, int nkv) {
  switch (nq) {
    case 1: return scores_for<1>(nkv);
    case 2: return scores_for<2>(nkv);
    case 3: return scores_for<3>(nkv);
    case 4: return scores_for<4>(nkv);
    case 5: return scores_for<5>(nkv);
    default: return scores_for<6>(nkv);
  }
}

// out[i][d0 .. d0 + 16 NDV) = fma chain over t < n[i] of p_i[t] * v[t][d0 ..]: each query's chain
// only sees its own keys (masked fma leaves the accumulator untouched, bit for bit).
template <typename T, int NQ, int NDV>
void pv_tile(const T* v, int64_t v_row_stride, int u_begin, int u_end, const float* const* p, const int* begin,
             const int* end, __mmask16 last, float* const* out) {
  // Local copies so the compiler keeps all NQ x NDV accumulators in registers.
  const float* pq[NQ];
  int bq[NQ], eq[NQ];
  for (int i = 0; i < NQ; ++i) {
    pq[i] = p[i];
    bq[i] = begin[i];
    eq[i] = end[i];
  }
  __m512 acc[NQ][NDV];
#pragma GCC unroll 8
  for (int i = 0; i < NQ; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NDV; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int u = u_begin; u < u_end; ++u) {
    const T* row = v + u * v_row_stride;
    __m512 x[NDV];
#pragma GCC unroll 4
    for (int j = 0; j < NDV; ++j) x[j] = (j < NDV - 1 || last == 0xffff) ? load16(row + 16 * j) : load16(row + 16 * j, last);
#pragma GCC unroll 8
    for (int i = 0; i < NQ; ++i) {
      const __mmask16 on = static_cast<__mmask16>(-static_cast<int>(u >= bq[i] && u < eq[i]));
      const __m512 pb = _mm512_set1_ps(pq[i][u]);
#pragma GCC unroll 4
      for (int j = 0; j < NDV; ++j) acc[i][j] = _mm512_mask3_fmadd_ps(pb, x[j], acc[i][j], on);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < NQ; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NDV; ++j)
      _mm512_mask_storeu_ps(out[i] + 16 * j, j == NDV - 1 ? last : static_cast<__mmask16>(0xffff), acc[i][j]);
}

template <typename T>
using PvFn = void (*)(const T*, int64_t, int, int, const float* const*, const int*, const int*, __mmask16,
                      float* const*);

template <typename T, int NQ>
constexpr PvFn<T> pv_for(int ndv) {
  return ndv == 1 ? &pv_tile<T, NQ, 1> : ndv == 2 ? &pv_tile<T, NQ, 2> : ndv == 3 ? &pv_tile<T, NQ, 3> : &pv_tile<T, NQ, 4>;
}

template <typename T>
PvFn<T> pv_kernel(int nq, int ndv) {
  switch (nq) {
    case 1: return pv_for<T, 1>(ndv);
    case 2: return pv_for<T, 2>(ndv);
    case 3: return pv_for<T, 3>(ndv);
    case 4: return pv_for<T, 4>(ndv);
    case 5: return pv_for<T, 5>(ndv);
    default: return pv_for<T, 6>(ndv);
  }
}

// Decode streams K/V from memory: ask for this chunk's V rows (used after the scores) and the next
// chunk's K rows (used by the next call) while the current chunk computes.
template <typename T>
void prefetch_rows(const T* base, int64_t row_stride, int64_t rows, int64_t D) {
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  for (int64_t r = 0; r < rows; ++r) {
    const char* row = reinterpret_cast<const char*>(base + r * row_stride);
    for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(row + off, _MM_HINT_T0);
  }
}

template <typename T>
void chunk_avx512_typed(const Group& g, int64_t c, const Scratch& s, float* m_c, float* l_c, float* a_c) {
  const AttentionArgs& a = *g.args;
  const int64_t D = a.D;

  // Queries that have a chunk c, and the union [u0, u1) of their chunks' keys.
  int* act = s.active;
  int* off = s.offset;
  int* n = s.count;
  int na = 0;
  int64_t u0 = INT64_MAX, u1 = INT64_MIN, max_hi = INT64_MIN;
  for (int qi = 0; qi < g.nq; ++qi) {
    if (!g.sees(qi, c)) continue;
    const int64_t start = g.chunk_start(qi, c), end = std::min(start + kChunk, g.hi[qi] + 1);
    act[na] = qi;
    n[na] = static_cast<int>(end - start);
    ++na;
    u0 = std::min(u0, start);
    u1 = std::max(u1, end);
    max_hi = std::max(max_hi, g.hi[qi]);
  }
  if (na == 0) return;
  for (int i = 0; i < na; ++i) off[i] = static_cast<int>(g.chunk_start(act[i], c) - u0);
  const int width = static_cast<int>(u1 - u0);  // <= kUnion
  const int nkv = (width + 15) / 16;

  const T* kbase = static_cast<const T*>(a.k) + g.kv_row * a.k_stride[0] + g.kv_head * a.k_stride[1];
  const T* vbase = static_cast<const T*>(a.v) + g.kv_row * a.v_stride[0] + g.kv_head * a.v_stride[1] + u0 * a.v_stride[2];
  {
    const int64_t next = std::min(u1 + kChunk, max_hi + 1);
    prefetch_rows(vbase, a.v_stride[2], width, D);
    if (next > u1) prefetch_rows(kbase + u1 * a.k_stride[2], a.k_stride[2], next - u1, D);
  }

  transpose_keys<T>(g, u0, u1, nkv, s.kt);

  const int tiles = (na + kMaxTileQueries - 1) / kMaxTileQueries;
  const int per_tile = (na + tiles - 1) / tiles;

  // Scores over the whole union (a score does not depend on where its key sits in the union).
  for (int k0 = 0; k0 < nkv; k0 += 4) {
    const int cnt_k = std::min(4, nkv - k0);
    for (int i0 = 0; i0 < na; i0 += per_tile) {
      const int cnt = std::min(per_tile, na - i0);
      const float* q[kMaxTileQueries];
      float* out[kMaxTileQueries];
      for (int i = 0; i < cnt; ++i) {
        q[i] = g.qf + act[i0 + i] * D;
        out[i] = s.p + act[i0 + i] * kUnion + 16 * k0;
      }
      scores_kernel(cnt, cnt_k)(s.kt + 16 * k0, q, D, g.c2, out);
    }
  }

  // Chunk maximum, weights and their sum, per query, in lanes counted from its chunk's first key.
  for (int i = 0; i < na; ++i) {
    float* p = s.p + act[i] * kUnion + off[i];
    const int nj = (n[i] + 15) / 16;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < nj; ++j) mx = _mm512_mask_max_ps(mx, first_lanes(n[i] - 16 * j), mx, _mm512_loadu_ps(p + 16 * j));
    const float m = _mm512_reduce_max_ps(mx);  // a max is exact in any order
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < nj; ++j) {
      const __m512 w = _mm512_maskz_mov_ps(first_lanes(n[i] - 16 * j), exp2v(_mm512_sub_ps(_mm512_loadu_ps(p + 16 * j), mv)));
      _mm512_storeu_ps(p + 16 * j, w);
      sum = j == 0 ? w : _mm512_add_ps(sum, w);  // missing vectors would add exact zeros
    }
    m_c[act[i]] = m;
    l_c[act[i]] = tree_sum(sum);
  }

  // p.v, 64 columns of D at a time; each query's chain runs over its own keys in order.
  int begin[kMaxTileQueries], end[kMaxTileQueries];
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int64_t cols = std::min<int64_t>(64, D - d0);
    const int ndv = static_cast<int>((cols + 15) / 16);
    const __mmask16 last = first_lanes(cols - 16 * (ndv - 1));
    for (int i0 = 0; i0 < na; i0 += per_tile) {
      const int cnt = std::min(per_tile, na - i0);
      const float* p[kMaxTileQueries];
      float* out[kMaxTileQueries];
      int ub = kUnion, ue = 0;
      for (int i = 0; i < cnt; ++i) {
        p[i] = s.p + act[i0 + i] * kUnion;
        out[i] = a_c + act[i0 + i] * D + d0;
        begin[i] = off[i0 + i];
        end[i] = off[i0 + i] + n[i0 + i];
        ub = std::min(ub, begin[i]);
        ue = std::max(ue, end[i]);
      }
      pv_kernel<T>(cnt, ndv)(vbase + d0, a.v_stride[2], ub, ue, p, begin, end, last, out);
    }
  }
}

void chunk_avx512(const Group& g, int64_t t0, const Scratch& s, float* m_c, float* l_c, float* a_c) {
  switch (g.args->dtype) {
    case DType::kFloat32: chunk_avx512_typed<float>(g, t0, s, m_c, l_c, a_c); break;
    case DType::kFloat16: chunk_avx512_typed<fp16_t>(g, t0, s, m_c, l_c, a_c); break;
    case DType::kBFloat16: chunk_avx512_typed<bf16_t>(g, t0, s, m_c, l_c, a_c); break;
  }
}

void combine_avx512(int64_t D, float* m, float* l, float* acc, float m_c, float l_c, const float* a_c) {
  const float m_new = std::max(*m, m_c);
  const float alpha = exp2_nonpositive(*m - m_new);
  const float beta = exp2_nonpositive(m_c - m_new);
  *m = m_new;
  *l = std::fma(*l, alpha, l_c * beta);
  const __m512 av = _mm512_set1_ps(alpha), bv = _mm512_set1_ps(beta);
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 k = first_lanes(D - d);
    const __m512 x = _mm512_maskz_loadu_ps(k, acc + d);
    const __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, a_c + d), bv);
    _mm512_mask_storeu_ps(acc + d, k, _mm512_fmadd_ps(x, av, y));
  }
}

}  // namespace

const Kernels& kernels_avx512() {
  static const Kernels k{&chunk_avx512, &combine_avx512};
  return k;
}

}  // namespace margingate::attention_impl
