// attention: the driver (validation, grouping, threads, conversions), the scalar chunk kernel and
// the dispatcher.
//
// Why the result is batch-, padding-, capacity- and Tq-invariant
// ---------------------------------------------------------------
// Query (b, h, j) sits at p = Tk - Tq + j and sees keys [lo, hi] with
//   lo = max(kv_start[b], p - window + 1)  (the window term only with a window),
//   hi = p when causal, else Tk - 1.
// Its keys are cut into chunks of kChunk = 64 counted from lo, and every number that enters its
// output is produced by the fixed sequence of fp32 operations written in attention_impl.h: each
// score is one fma chain over d, each chunk's weights/sums/p.v products follow a fixed order over
// the chunk's keys (missing keys of a short last chunk contribute exact zeros, which leave every
// sum unchanged), and the chunk partials are folded into the running state in chunk order. None
// of these operations depends on B, on Tq, on the capacity Tk beyond hi, on where the valid keys
// sit (only key offsets from lo are used), on kv_rows, on which other queries are processed
// alongside (groups only share loaded K/V tiles, never accumulators) or on the thread split: with
// few groups the chunks of one query are spread over threads, but every chunk partial is then
// stored and folded in the same order by the same combine function. The SIMD levels perform the
// same IEEE operations lane by lane, so the scalar, AVX2 and AVX-512 paths agree bit for bit too.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "attention_impl.h"

namespace margingate {
namespace attention_impl {

namespace {

float key_element(const Group& g, const void* base, const int64_t* stride, int64_t t, int64_t d) {
  return load_element(g.args->dtype, base, g.kv_row * stride[0] + g.kv_head * stride[1] + t * stride[2] + d * stride[3]);
}

void chunk_scalar(const Group& g, int64_t c, const Scratch& s, float* m_c, float* l_c, float* a_c) {
  const AttentionArgs& a = *g.args;
  const int64_t D = a.D;
  for (int qi = 0; qi < g.nq; ++qi) {
    if (!g.sees(qi, c)) continue;
    const int64_t t0 = g.chunk_start(qi, c);
    const int64_t n = std::min(t0 + kChunk, g.hi[qi] + 1) - t0;
    const float* q = g.qf + qi * D;
    float* p = s.p + qi * kUnion;
    float m = -INFINITY;
    for (int64_t t = 0; t < n; ++t) {
      float dot = 0.0f;
      for (int64_t d = 0; d < D; ++d) dot = std::fma(q[d], key_element(g, a.k, a.k_stride, t0 + t, d), dot);
      p[t] = dot * g.c2;
      m = std::max(m, p[t]);
    }
    for (int64_t t = 0; t < kChunk; ++t) p[t] = t < n ? exp2_nonpositive(p[t] - m) : 0.0f;
    float lanes[16];
    for (int i = 0; i < 16; ++i) lanes[i] = ((p[i] + p[16 + i]) + p[32 + i]) + p[48 + i];
    for (int width = 8; width >= 1; width /= 2) {
      for (int i = 0; i < width; ++i) lanes[i] = lanes[i] + lanes[i + width];
    }
    m_c[qi] = m;
    l_c[qi] = lanes[0];
    float* acc = a_c + qi * D;
    for (int64_t d = 0; d < D; ++d) {
      float x = 0.0f;
      for (int64_t t = 0; t < n; ++t) x = std::fma(p[t], key_element(g, a.v, a.v_stride, t0 + t, d), x);
      acc[d] = x;
    }
  }
}

void combine_scalar(int64_t D, float* m, float* l, float* acc, float m_c, float l_c, const float* a_c) {
  const float m_new = std::max(*m, m_c);
  const float alpha = exp2_nonpositive(*m - m_new);
  const float beta = exp2_nonpositive(m_c - m_new);
  *m = m_new;
  *l = std::fma(*l, alpha, l_c * beta);
  for (int64_t d = 0; d < D; ++d) acc[d] = std::fma(acc[d], alpha, a_c[d] * beta);
}

template <typename T>
void store_row(void* base, int64_t offset, int64_t stride, const float* x, int64_t D) {
  T* out = static_cast<T*>(base) + offset;
  for (int64_t d = 0; d < D; ++d) out[d * stride] = from_float<T>(x[d]);
}

template <typename T>
void load_row(const void* base, int64_t offset, int64_t stride, float* x, int64_t D) {
  const T* in = static_cast<const T*>(base) + offset;
  for (int64_t d = 0; d < D; ++d) x[d] = to_float(in[d * stride]);
}

// Writes acc / l in the output dtype. l == 0 exactly when no key was visible (a visible key's
// chunk maximum has weight 1): zeros. Any other l is divided through, so a NaN that entered the
// sums (a NaN score, an infinite score, a NaN or infinite value) reaches the output as NaN the way
// it does in torch's attention; testing `l > 0` would turn such a query into plausible zeros.
void finish(const AttentionArgs& a, float l, const float* acc, int64_t b, int64_t h, int64_t j) {
  float row[kMaxHeadDim];
  const bool no_key = l == 0.0f;
  for (int64_t d = 0; d < a.D; ++d) row[d] = no_key ? 0.0f : acc[d] / l;
  const int64_t base = b * a.o_stride[0] + h * a.o_stride[1] + j * a.o_stride[2];
  switch (a.dtype) {
    case DType::kFloat32: store_row<float>(a.o, base, a.o_stride[3], row, a.D); break;
    case DType::kFloat16: store_row<fp16_t>(a.o, base, a.o_stride[3], row, a.D); break;
    case DType::kBFloat16: store_row<bf16_t>(a.o, base, a.o_stride[3], row, a.D); break;
  }
}

// How the queries are grouped: a group is one (query row, kv head, block of query positions), so
// each loaded K/V tile serves G heads x `positions` queries. Without a window every query of a row
// has lo = kv_start; with one, lo moves by at most one key per position, so a block of at most
// kMaxSpread + 1 positions keeps its lo's within kMaxSpread.
struct Plan {
  const AttentionArgs* args = nullptr;
  int64_t G = 1;             // query heads per kv head
  int64_t positions = 1;     // query positions per group
  int64_t blocks = 1;        // groups per (row, kv head)
  int64_t groups = 0;
  int nq_max = 0;
  float c2 = 0.0f;

  int64_t kv_start(int64_t b) const { return args->kv_start ? args->kv_start[b] : 0; }
  int64_t kv_row(int64_t b) const { return args->kv_rows ? args->kv_rows[b] : b; }

  // Fills the group's queries (qf, lo, hi) and geometry; returns the number of chunks.
  int64_t describe(int64_t gi, Group& g, float* qf, int64_t* lo, int64_t* hi, int64_t* b_out, int64_t* j0_out) const {
    const AttentionArgs& a = *args;
    const int64_t blk = gi % blocks;
    const int64_t kvh = (gi / blocks) % a.Hkv;
    const int64_t b = gi / (blocks * a.Hkv);
    const int64_t j0 = blk * positions, j1 = std::min(a.Tq, j0 + positions);
    const int64_t start = kv_start(b);
    int nq = 0;
    int64_t chunks = 0;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t p = a.Tk - a.Tq + j;
      const int64_t first = a.window > 0 ? std::max(start, p - a.window + 1) : start;
      const int64_t last = a.causal ? std::min(p, a.Tk - 1) : a.Tk - 1;
      if (last >= first) chunks = std::max(chunks, (last - first) / kChunk + 1);
      for (int64_t hl = 0; hl < G; ++hl) {
        const int64_t h = kvh * G + hl;
        const int64_t qbase = b * a.q_stride[0] + h * a.q_stride[1] + j * a.q_stride[2];
        switch (a.dtype) {
          case DType::kFloat32: load_row<float>(a.q, qbase, a.q_stride[3], qf + nq * a.D, a.D); break;
          case DType::kFloat16: load_row<fp16_t>(a.q, qbase, a.q_stride[3], qf + nq * a.D, a.D); break;
          case DType::kBFloat16: load_row<bf16_t>(a.q, qbase, a.q_stride[3], qf + nq * a.D, a.D); break;
        }
        lo[nq] = first;
        hi[nq] = last;
        ++nq;
      }
    }
    g.args = args;
    g.kv_row = kv_row(b);
    g.kv_head = kvh;
    g.nq = nq;
    g.qf = qf;
    g.lo = lo;
    g.hi = hi;
    g.c2 = c2;
    *b_out = b;
    *j0_out = j0;
    return chunks;
  }

  // Query index within a group -> (head, position).
  void query_of(const Group& g, int qi, int64_t j0, int64_t* h, int64_t* j) const {
    *h = g.kv_head * G + qi % G;
    *j = j0 + qi / G;
  }
};

struct ThreadBuffers {
  std::vector<float> qf, kt, p, m, l, acc, m_c, l_c, a_c;
  std::vector<int64_t> lo, hi;
  std::vector<int> active, offset, count;
  explicit ThreadBuffers(const Plan& plan) {
    const int64_t D = plan.args->D, nq = plan.nq_max;
    qf.resize(nq * D);
    kt.resize(D * kKtStride);
    p.resize(nq * kUnion);
    m.resize(nq);
    l.resize(nq);
    acc.resize(nq * D);
    m_c.resize(nq);
    l_c.resize(nq);
    a_c.resize(nq * D);
    lo.resize(nq);
    hi.resize(nq);
    active.resize(nq);
    offset.resize(nq);
    count.resize(nq);
  }
  Scratch scratch() { return Scratch{kt.data(), p.data(), active.data(), offset.data(), count.data()}; }
};

Status validate(const AttentionArgs& a) {
  if (a.B < 0 || a.Hq < 0 || a.Tq < 0 || a.Tk < 0 || a.Bkv < 0) {
    return Status::error("margingate.attention: sizes must be non-negative");
  }
  if (a.Hkv < 1 || a.Hq % a.Hkv != 0) {
    return Status::error("margingate.attention: the number of query heads (" + std::to_string(a.Hq) +
                         ") must be a multiple of the number of kv heads (" + std::to_string(a.Hkv) + ")");
  }
  if (a.D < 1 || a.D > kMaxHeadDim) {
    return Status::error("margingate.attention: head_dim must be in [1, 256], got " + std::to_string(a.D));
  }
  if (a.kv_rows == nullptr && a.Bkv != a.B) {
    return Status::error("margingate.attention: k/v have " + std::to_string(a.Bkv) + " rows but q has " +
                         std::to_string(a.B) + " (pass kv_rows to read other rows)");
  }
  if (a.window > 0 && !a.causal) {
    return Status::error("margingate.attention: a sliding window requires causal=True");
  }
  for (int64_t b = 0; b < a.B; ++b) {
    if (a.kv_rows && (a.kv_rows[b] < 0 || a.kv_rows[b] >= a.Bkv)) {
      return Status::error("margingate.attention: kv_rows[" + std::to_string(b) + "] = " + std::to_string(a.kv_rows[b]) +
                           " is out of range [0, " + std::to_string(a.Bkv) + ")");
    }
    if (a.kv_start && (a.kv_start[b] < 0 || a.kv_start[b] > a.Tk)) {
      return Status::error("margingate.attention: kv_start[" + std::to_string(b) + "] = " +
                           std::to_string(a.kv_start[b]) + " is out of range [0, " + std::to_string(a.Tk) + "]");
    }
  }
  if ((a.B > 0 && a.Hq > 0 && a.Tq > 0) && (a.q == nullptr || a.o == nullptr || (a.Tk > 0 && (a.k == nullptr || a.v == nullptr)))) {
    return Status::error("margingate.attention: null data pointer");
  }
  return Status::success();
}

}  // namespace

const Kernels& kernels_scalar() {
  static const Kernels k{&chunk_scalar, &combine_scalar};
  return k;
}

}  // namespace attention_impl

Status attention(const AttentionArgs& args, const Parallel& parallel) {
  using namespace attention_impl;
  Status st = validate(args);
  if (!st.ok()) return st;
  if (args.B == 0 || args.Hq == 0 || args.Tq == 0) return Status::success();

  // The SIMD kernels want unit stride along D; the scalar kernel computes the same bits, so any
  // other layout simply takes the scalar path.
  const bool unit_d = args.k_stride[3] == 1 && args.v_stride[3] == 1;
  const SimdLevel level = unit_d ? simd_level() : SimdLevel::kScalar;
#if MARGINGATE_ARCH_X86
  const Kernels& kern = level == SimdLevel::kAvx512 ? kernels_avx512()
                        : level == SimdLevel::kAvx2 ? kernels_avx2()
                                                    : kernels_scalar();
#elif MARGINGATE_ARCH_ARM64
  const Kernels& kern = level == SimdLevel::kNeon ? kernels_neon() : kernels_scalar();
#else
  const Kernels& kern = kernels_scalar();  // no SIMD attention kernels for this architecture
  (void)level;
#endif

  Plan plan;
  plan.args = &args;
  plan.G = args.Hq / args.Hkv;
  plan.positions = std::max<int64_t>(1, std::min<int64_t>(args.Tq, 24 / plan.G));
  if (args.window > 0) plan.positions = std::min<int64_t>(plan.positions, kMaxSpread + 1);
  plan.blocks = (args.Tq + plan.positions - 1) / plan.positions;
  plan.groups = args.B * args.Hkv * plan.blocks;
  plan.nq_max = static_cast<int>(plan.positions * plan.G);
  plan.c2 = static_cast<float>(static_cast<double>(args.scale) * kLog2e);
  const int64_t D = args.D;

  // Few groups (decode with a small batch): spread each group's chunks over the threads. Every
  // chunk's partial is stored and folded afterwards in chunk order, exactly as the direct path
  // folds them, so the split never shows in the result.
  const int64_t threads = std::max(1, parallel.num_threads);
  const int64_t max_chunks = args.Tk / kChunk + 1;
  int64_t splits = 1;
  if (threads > 1 && plan.groups < 4 * threads) {
    splits = std::min((4 * threads + plan.groups - 1) / plan.groups, max_chunks / 4);
    splits = std::max<int64_t>(splits, 1);
  }

  if (splits == 1) {
    parallel.for_range(plan.groups, 1, [&](int64_t begin, int64_t end) {
      ThreadBuffers buf(plan);
      const Scratch scratch = buf.scratch();
      for (int64_t gi = begin; gi < end; ++gi) {
        Group g;
        int64_t b, j0;
        const int64_t chunks = plan.describe(gi, g, buf.qf.data(), buf.lo.data(), buf.hi.data(), &b, &j0);
        std::fill(buf.m.begin(), buf.m.end(), -INFINITY);
        std::fill(buf.l.begin(), buf.l.end(), 0.0f);
        std::fill(buf.acc.begin(), buf.acc.end(), 0.0f);
        for (int64_t c = 0; c < chunks; ++c) {
          kern.chunk(g, c, scratch, buf.m_c.data(), buf.l_c.data(), buf.a_c.data());
          for (int qi = 0; qi < g.nq; ++qi) {
            if (!g.sees(qi, c)) continue;
            kern.combine(D, &buf.m[qi], &buf.l[qi], buf.acc.data() + qi * D, buf.m_c[qi], buf.l_c[qi],
                         buf.a_c.data() + qi * D);
          }
        }
        for (int qi = 0; qi < g.nq; ++qi) {
          int64_t h, j;
          plan.query_of(g, qi, j0, &h, &j);
          finish(args, buf.l[qi], buf.acc.data() + qi * D, b, h, j);
        }
      }
    });
    return Status::success();
  }

  // Split path: partial (m_c, l_c, a_c[D]) of chunk c, query qi of group gi at
  // ((gi * max_chunks + c) * nq_max + qi) * (D + 2).
  const int64_t nq = plan.nq_max, stride = D + 2;
  std::vector<float> partials(static_cast<size_t>(plan.groups * max_chunks * nq * stride));
  const int64_t per_split = (max_chunks + splits - 1) / splits;
  parallel.for_range(plan.groups * splits, 1, [&](int64_t begin, int64_t end) {
    ThreadBuffers buf(plan);
    const Scratch scratch = buf.scratch();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t gi = item / splits, sp = item % splits;
      Group g;
      int64_t b, j0;
      const int64_t chunks = plan.describe(gi, g, buf.qf.data(), buf.lo.data(), buf.hi.data(), &b, &j0);
      for (int64_t c = sp * per_split; c < std::min(chunks, (sp + 1) * per_split); ++c) {
        kern.chunk(g, c, scratch, buf.m_c.data(), buf.l_c.data(), buf.a_c.data());
        float* out = partials.data() + (gi * max_chunks + c) * nq * stride;
        for (int qi = 0; qi < g.nq; ++qi) {
          if (!g.sees(qi, c)) continue;
          out[qi * stride] = buf.m_c[qi];
          out[qi * stride + 1] = buf.l_c[qi];
          std::memcpy(out + qi * stride + 2, buf.a_c.data() + qi * D, sizeof(float) * D);
        }
      }
    }
  });
  parallel.for_range(plan.groups, 1, [&](int64_t begin, int64_t end) {
    ThreadBuffers buf(plan);
    for (int64_t gi = begin; gi < end; ++gi) {
      Group g;
      int64_t b, j0;
      const int64_t chunks = plan.describe(gi, g, buf.qf.data(), buf.lo.data(), buf.hi.data(), &b, &j0);
      for (int qi = 0; qi < g.nq; ++qi) {
        float m = -INFINITY, l = 0.0f;
        float* acc = buf.acc.data();
        std::fill(acc, acc + D, 0.0f);
        for (int64_t c = 0; c < chunks; ++c) {
          if (!g.sees(qi, c)) break;
          const float* in = partials.data() + ((gi * max_chunks + c) * nq + qi) * stride;
          kern.combine(D, &m, &l, acc, in[0], in[1], in + 2);
        }
        int64_t h, j;
        plan.query_of(g, qi, j0, &h, &j);
        finish(args, l, acc, b, h, j);
      }
    }
  });
  return Status::success();
}

}  // namespace margingate
