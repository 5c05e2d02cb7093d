// margingate_bench --check: every op of the core against a plain scalar reference, plus the
// invariance properties, at the SIMD level this process runs (MARGINGATE_SIMD caps it). Exit
// status non-zero on any wrong result. It needs no torch, so it also runs on a cross-compiled
// aarch64 binary under qemu-user (.ci/run).
//
// What is exact is compared bit for bit: margin and kv_patch_ always; linear's rows against the
// same rows computed alone, at another position of another batch, from transposed copies and on
// one thread; and, at scalar, avx2 and neon (one bit class: 8 interleaved fused multiply-add
// lanes, the canonical bit contract), linear at every dtype against that sequence written out in
// scalar code; sample_margin against its definition
// (sampling.h) evaluated plainly, index by index. Attention and avx512's bf16 linear
// (whose dot-product instruction has its own internal rounding) are held to an error bound against
// a double-precision reference, plus attention's batch/padding invariance, bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "harness.h"
#include "margingate/attention.h"
#include "margingate/kv_patch.h"
#include "margingate/linear.h"
#include "margingate/margin.h"
#include "margingate/sampling.h"

namespace margingate::bench {
namespace {

struct Checker {
  int failures = 0;
  int checks = 0;
  void expect(bool ok, const std::string& what) {
    ++checks;
    if (!ok) {
      ++failures;
      if (failures <= 20) std::printf("FAIL %s\n", what.c_str());
    }
  }
};

// Values of `dtype` stored as raw bits; read back exactly as the kernels read them.
struct Buffer {
  DType dtype;
  std::vector<uint32_t> bits;  // one slot per element, low 16 bits used by the 16-bit types
  Buffer(DType t, int64_t n) : dtype(t), bits(static_cast<size_t>(n), 0) {}
  float get(int64_t i) const {
    switch (dtype) {
      case DType::kFloat32: {
        float f;
        std::memcpy(&f, &bits[i], 4);
        return f;
      }
      case DType::kFloat16: return fp16_to_float(static_cast<uint16_t>(bits[i]));
      case DType::kBFloat16: return bf16_to_float(static_cast<uint16_t>(bits[i]));
    }
    return 0;
  }
  void set(int64_t i, float v) {
    switch (dtype) {
      case DType::kFloat32: std::memcpy(&bits[i], &v, 4); break;
      case DType::kFloat16: bits[i] = float_to_fp16(v); break;
      case DType::kBFloat16: bits[i] = float_to_bf16(v); break;
    }
  }
  // Dense storage in the dtype, as the kernels take it.
  std::vector<char> packed() const {
    std::vector<char> out(bits.size() * dtype_size(dtype));
    for (size_t i = 0; i < bits.size(); ++i) {
      if (dtype == DType::kFloat32) std::memcpy(&out[4 * i], &bits[i], 4);
      else {
        const uint16_t h = static_cast<uint16_t>(bits[i]);
        std::memcpy(&out[2 * i], &h, 2);
      }
    }
    return out;
  }
};

float read(DType dtype, const std::vector<char>& data, int64_t i) {
  switch (dtype) {
    case DType::kFloat32: {
      float f;
      std::memcpy(&f, &data[4 * i], 4);
      return f;
    }
    case DType::kFloat16: {
      uint16_t h;
      std::memcpy(&h, &data[2 * i], 2);
      return fp16_to_float(h);
    }
    case DType::kBFloat16: {
      uint16_t h;
      std::memcpy(&h, &data[2 * i], 2);
      return bf16_to_float(h);
    }
  }
  return 0;
}

bool same_bits(const std::vector<char>& a, const std::vector<char>& b) { return a == b; }

const DType kDtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

// ------------------------------------------------------------------------------------ margin

// The contract, written as plainly as possible: NaN ranks above every number (first NaN is top-1,
// the next NaN or else the best number is top-2, margin NaN); otherwise first index of the
// maximum, then the first index of the maximum of the others; margin exactly 0 on equal values.
void margin_reference(const std::vector<float>& row, int64_t& top1, int64_t& top2, float& margin) {
  const int64_t V = static_cast<int64_t>(row.size());
  std::vector<int64_t> nans;
  for (int64_t c = 0; c < V; ++c)
    if (std::isnan(row[c])) nans.push_back(c);
  auto best_number = [&](int64_t skip) {
    int64_t best = -1;
    for (int64_t c = 0; c < V; ++c) {
      if (c == skip || std::isnan(row[c])) continue;
      if (best < 0 || row[c] > row[best]) best = c;
    }
    return best;
  };
  if (!nans.empty()) {
    top1 = nans[0];
    top2 = nans.size() > 1 ? nans[1] : best_number(top1);
    margin = NAN;
    return;
  }
  top1 = best_number(-1);
  top2 = best_number(top1);
  margin = row[top1] == row[top2] ? 0.0f : row[top1] - row[top2];
}

void check_margin(Checker& ck, const Parallel& parallel) {
  std::mt19937_64 rng(1);
  const int64_t vocabs[] = {2, 3, 17, 31, 33, 100, 2047, 2048, 2049, 4100, 40000, 70001};
  for (DType dtype : kDtypes) {
    for (int64_t V : vocabs) {
      for (int kind = 0; kind < 6; ++kind) {
        const int64_t rows = 1 + static_cast<int64_t>(rng() % 4);
        Buffer buf(dtype, rows * V);
        std::uniform_real_distribution<float> uni(-8.f, 8.f);
        for (int64_t i = 0; i < rows * V; ++i) {
          switch (kind) {
            case 0: buf.set(i, uni(rng)); break;                                          // distinct values
            case 1: buf.set(i, static_cast<float>(rng() % 3)); break;                     // many ties
            case 2: buf.set(i, -INFINITY); break;                                         // all -inf
            case 3: buf.set(i, i % 7 == 0 ? INFINITY : uni(rng)); break;                  // equal infinities
            case 4: buf.set(i, (rng() % 64) == 0 ? uni(rng) : -INFINITY); break;          // sparse numbers
            default: buf.set(i, static_cast<float>(static_cast<int64_t>(i % V) % 5)); break;  // rising ties
          }
        }
        if (kind == 1 && V > 4) buf.set((rows - 1) * V + V / 2, NAN);  // one NaN in the last row
        if (kind == 0 && V > 2050) {
          buf.set(V - 1, 100.f);  // the top two far apart: the blocked scans must still find both
          buf.set(3, 99.f);
        }
        if (kind == 4 && V > 10) {
          buf.set(V - 2, NAN);  // two NaNs in row 0
          buf.set(5, NAN);
        }
        const std::vector<char> data = buf.packed();
        for (int64_t col_stride : {int64_t{1}, int64_t{2}}) {
          // col_stride 2 reads every other element of a row of 2V (the scalar scan's path).
          std::vector<char> strided = data;
          int64_t Vs = V;
          if (col_stride == 2) {
            Buffer wide(dtype, rows * 2 * V);
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t c = 0; c < V; ++c) {
                wide.bits[r * 2 * V + 2 * c] = buf.bits[r * V + c];
                wide.set(r * 2 * V + 2 * c + 1, 1e30f);  // must never be read
              }
            strided = wide.packed();
            Vs = 2 * V;
          }
          std::vector<int64_t> t1(rows), t2(rows);
          std::vector<float> m(rows);
          Status s = margin(dtype, strided.data(), rows, V, Vs, col_stride, t1.data(), t2.data(), m.data(), parallel);
          ck.expect(s.ok(), "margin status " + s.message);
          for (int64_t r = 0; r < rows; ++r) {
            std::vector<float> row(V);
            for (int64_t c = 0; c < V; ++c) row[c] = buf.get(r * V + c);
            int64_t r1, r2;
            float rm;
            margin_reference(row, r1, r2, rm);
            const bool ok = t1[r] == r1 && t2[r] == r2 &&
                            (std::isnan(rm) ? std::isnan(m[r]) : std::memcmp(&rm, &m[r], 4) == 0);
            ck.expect(ok, "margin " + std::string(dtype_name(dtype)) + " V=" + std::to_string(V) + " kind=" +
                              std::to_string(kind) + " stride=" + std::to_string(col_stride) + " row " +
                              std::to_string(r) + ": got (" + std::to_string(t1[r]) + ", " + std::to_string(t2[r]) +
                              ", " + std::to_string(m[r]) + ") want (" + std::to_string(r1) + ", " +
                              std::to_string(r2) + ", " + std::to_string(rm) + ")");
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------ linear

struct LinearCase {
  DType dtype;
  int64_t M, K, N;
  bool bias;
};

// y (dense [M, N], `dtype`) from x [M, K] and w [N, K] (dense, `dtype`), through the core.
std::vector<char> run_linear(const LinearCase& c, const std::vector<char>& x, const std::vector<char>& w,
                             const std::vector<char>& bias, const Parallel& parallel, bool transposed = false) {
  const int64_t es = dtype_size(c.dtype);
  std::vector<char> y(static_cast<size_t>(c.M * c.N * es));
  LinearArgs a;
  a.dtype = c.dtype;
  a.M = c.M;
  a.K = c.K;
  a.N = c.N;
  a.x = x.data();
  a.x_row_stride = c.K;
  a.w = w.data();
  a.w_row_stride = c.K;
  std::vector<char> xt, wt;
  if (transposed) {  // the same values stored column-major: strides change, bits must not
    xt.resize(x.size());
    wt.resize(w.size());
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t k = 0; k < c.K; ++k) std::memcpy(&xt[(k * c.M + m) * es], &x[(m * c.K + k) * es], es);
    for (int64_t n = 0; n < c.N; ++n)
      for (int64_t k = 0; k < c.K; ++k) std::memcpy(&wt[(k * c.N + n) * es], &w[(n * c.K + k) * es], es);
    a.x = xt.data();
    a.x_row_stride = 1;
    a.x_col_stride = c.M;
    a.w = wt.data();
    a.w_row_stride = 1;
    a.w_col_stride = c.N;
  }
  a.bias = c.bias ? bias.data() : nullptr;
  a.y = y.data();
  a.y_row_stride = c.N;
  Status s = linear(a, parallel);
  if (!s.ok()) std::printf("linear error: %s\n", s.message.c_str());
  return y;
}

// The K-reduction of the scalar, avx2 and neon levels, written out: 8 lanes (lane l takes
// k = l mod 8), one fma per lane and chunk (zeros past K), the halving tree 4, 2, 1, + bias, one
// rounding.
std::vector<char> linear_sequence(const LinearCase& c, const std::vector<char>& x, const std::vector<char>& w,
                                  const std::vector<char>& bias) {
  Buffer y(c.dtype, c.M * c.N);
  for (int64_t m = 0; m < c.M; ++m) {
    for (int64_t n = 0; n < c.N; ++n) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      const int64_t chunks = (c.K + 7) / 8;
      for (int64_t ch = 0; ch < chunks; ++ch) {
        for (int l = 0; l < 8; ++l) {
          const int64_t k = ch * 8 + l;
          const float xv = k < c.K ? read(c.dtype, x, m * c.K + k) : 0.f;
          const float wv = k < c.K ? read(c.dtype, w, n * c.K + k) : 0.f;
          acc[l] = std::fma(xv, wv, acc[l]);
        }
      }
      for (int half = 4; half >= 1; half /= 2)
        for (int l = 0; l < half; ++l) acc[l] = acc[l] + acc[l + half];
      const float v = c.bias ? acc[0] + read(c.dtype, bias, n) : acc[0];
      y.set(m * c.N + n, v);
    }
  }
  return y.packed();
}

void check_linear(Checker& ck, const Parallel& parallel) {
  const SimdLevel level = simd_level();
  const LinearCase cases[] = {
      {DType::kFloat32, 1, 640, 37, true},   {DType::kFloat32, 7, 100, 13, false}, {DType::kFloat32, 37, 257, 29, true},
      {DType::kFloat32, 70, 33, 100, true},  {DType::kBFloat16, 1, 640, 70, true}, {DType::kBFloat16, 5, 1000, 19, false},
      {DType::kBFloat16, 37, 77, 31, true},  {DType::kBFloat16, 130, 64, 9, true}, {DType::kFloat16, 1, 300, 23, true},
      {DType::kFloat16, 9, 45, 17, false},   {DType::kFloat16, 40, 129, 12, true}, {DType::kFloat32, 3, 5, 3, false},
      {DType::kBFloat16, 2, 1, 5, true},     {DType::kFloat32, 300, 1100, 40, true},
  };
  std::mt19937_64 rng(2);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (const LinearCase& c : cases) {
    const std::string name = std::string("linear ") + dtype_name(c.dtype) + " M=" + std::to_string(c.M) +
                             " K=" + std::to_string(c.K) + " N=" + std::to_string(c.N);
    const int64_t es = dtype_size(c.dtype);
    Buffer xb(c.dtype, c.M * c.K), wb(c.dtype, c.N * c.K), bb(c.dtype, c.N);
    for (int64_t i = 0; i < c.M * c.K; ++i) xb.set(i, normal(rng));
    for (int64_t i = 0; i < c.N * c.K; ++i) wb.set(i, normal(rng));
    for (int64_t i = 0; i < c.N; ++i) bb.set(i, normal(rng));
    const std::vector<char> x = xb.packed(), w = wb.packed(), bias = bb.packed();
    const std::vector<char> y = run_linear(c, x, w, bias, parallel);

    // Accuracy against double precision: fp32 accumulation error of a length-K dot product
    // (generous: K+8 roundings of the absolute sum) plus one rounding to the output dtype.
    const double out_eps = c.dtype == DType::kFloat32 ? 0x1p-24 : c.dtype == DType::kFloat16 ? 0x1p-11 : 0x1p-8;
    bool accurate = true;
    for (int64_t m = 0; m < c.M && accurate; ++m) {
      for (int64_t n = 0; n < c.N; ++n) {
        double ref = c.bias ? bb.get(n) : 0.0, abs_sum = c.bias ? std::fabs(bb.get(n)) : 0.0;
        for (int64_t k = 0; k < c.K; ++k) {
          const double p = static_cast<double>(xb.get(m * c.K + k)) * wb.get(n * c.K + k);
          ref += p;
          abs_sum += std::fabs(p);
        }
        const double got = read(c.dtype, y, m * c.N + n);
        const double tol = abs_sum * (c.K + 8) * 0x1p-24 + std::fabs(ref) * out_eps + 1e-30;
        if (!(std::fabs(got - ref) <= tol)) {
          accurate = false;
          ck.expect(false, name + ": y[" + std::to_string(m) + ", " + std::to_string(n) + "] = " +
                               std::to_string(got) + ", reference " + std::to_string(ref));
          break;
        }
      }
    }
    if (accurate) ck.expect(true, name);

    // The canonical 8-lane fma sequence, bit for bit, at every level of that bit class.
    if (level == SimdLevel::kScalar || level == SimdLevel::kAvx2 || level == SimdLevel::kNeon) {
      ck.expect(same_bits(y, linear_sequence(c, x, w, bias)),
                name + ": differs from the canonical 8-lane fma sequence at " + simd_level_name(level));
    }

    // Row invariance: each row alone, and at position 2 of a batch of 4 other rows.
    LinearCase one = c;
    one.M = 1;
    LinearCase batch = c;
    batch.M = 5;
    std::vector<char> others(static_cast<size_t>(5 * c.K * es));
    {
      Buffer ob(c.dtype, 5 * c.K);
      for (int64_t i = 0; i < 5 * c.K; ++i) ob.set(i, normal(rng));
      others = ob.packed();
    }
    bool alone_ok = true, moved_ok = true;
    for (int64_t m = 0; m < c.M; ++m) {
      std::vector<char> xr(x.begin() + m * c.K * es, x.begin() + (m + 1) * c.K * es);
      std::vector<char> yr = run_linear(one, xr, w, bias, parallel);
      alone_ok = alone_ok && std::memcmp(yr.data(), y.data() + m * c.N * es, c.N * es) == 0;
      if (m % 7 == 0) {
        std::vector<char> xm = others;
        std::memcpy(xm.data() + 2 * c.K * es, xr.data(), c.K * es);
        std::vector<char> ym = run_linear(batch, xm, w, bias, parallel);
        moved_ok = moved_ok && std::memcmp(ym.data() + 2 * c.N * es, y.data() + m * c.N * es, c.N * es) == 0;
      }
    }
    ck.expect(alone_ok, name + ": a row alone differs from the row in the batch");
    ck.expect(moved_ok, name + ": a row at another position of another batch differs");
    ck.expect(same_bits(run_linear(c, x, w, bias, parallel, /*transposed=*/true), y),
              name + ": transposed x and w (strided, packed) give other bits");
    ck.expect(same_bits(run_linear(c, x, w, bias, serial()), y), name + ": one thread gives other bits");
  }
}

// ------------------------------------------------------------------------------------ attention

// o = softmax(q.k * scale) v over the visible keys, in double.
void check_attention(Checker& ck, const Parallel& parallel) {
  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal(0.f, 1.f);
  struct Shape {
    DType dtype;
    int64_t B, Hq, Hkv, Tq, Tk, D, window;
    bool causal;
  };
  const Shape shapes[] = {
      {DType::kFloat32, 3, 4, 2, 1, 70, 64, 0, true},     {DType::kBFloat16, 2, 8, 1, 5, 300, 128, 0, true},
      {DType::kFloat16, 2, 2, 2, 3, 40, 32, 16, true},    {DType::kFloat32, 1, 2, 1, 17, 17, 8, 0, true},
      {DType::kBFloat16, 2, 4, 4, 2, 129, 256, 0, false},
  };
  for (const Shape& sh : shapes) {
    const std::string name = std::string("attention ") + dtype_name(sh.dtype) + " B=" + std::to_string(sh.B) +
                             " H=" + std::to_string(sh.Hq) + "/" + std::to_string(sh.Hkv) + " Tq=" +
                             std::to_string(sh.Tq) + " Tk=" + std::to_string(sh.Tk) + " D=" + std::to_string(sh.D);
    const int64_t nq = sh.B * sh.Hq * sh.Tq * sh.D, nk = sh.B * sh.Hkv * sh.Tk * sh.D;
    Buffer qb(sh.dtype, nq), kb(sh.dtype, nk), vb(sh.dtype, nk);
    for (int64_t i = 0; i < nq; ++i) qb.set(i, normal(rng));
    for (int64_t i = 0; i < nk; ++i) kb.set(i, normal(rng));
    for (int64_t i = 0; i < nk; ++i) vb.set(i, normal(rng));
    std::vector<int64_t> start(sh.B);
    for (int64_t b = 0; b < sh.B; ++b) start[b] = b == 0 ? 0 : static_cast<int64_t>(rng() % (sh.Tk - sh.Tq + 1));
    const std::vector<char> q = qb.packed(), k = kb.packed(), v = vb.packed();
    const float scale = 1.0f / std::sqrt(static_cast<float>(sh.D));
    // d_stride 2: k and v hold every element twice as far apart along D (the scalar kernel's path).
    auto run = [&](int64_t B, const std::vector<char>& qd, const std::vector<char>& kd, const std::vector<char>& vd,
                   const int64_t* kv_start, const Parallel& par, int64_t d_stride = 1) {
      std::vector<char> o(static_cast<size_t>(B * sh.Hq * sh.Tq * sh.D * dtype_size(sh.dtype)));
      AttentionArgs a;
      a.dtype = sh.dtype;
      a.q = qd.data();
      a.B = B;
      a.Hq = sh.Hq;
      a.Tq = sh.Tq;
      a.D = sh.D;
      a.k = kd.data();
      a.v = vd.data();
      a.Hkv = sh.Hkv;
      a.Tk = sh.Tk;
      a.Bkv = B;
      const int64_t qs[4] = {sh.Hq * sh.Tq * sh.D, sh.Tq * sh.D, sh.D, 1};
      const int64_t ks[4] = {sh.Hkv * sh.Tk * sh.D, sh.Tk * sh.D, sh.D, 1};
      for (int d = 0; d < 4; ++d) {
        a.q_stride[d] = a.o_stride[d] = qs[d];
        a.k_stride[d] = a.v_stride[d] = ks[d] * d_stride;
      }
      a.kv_start = kv_start;
      a.causal = sh.causal;
      a.scale = scale;
      a.window = sh.window;
      a.o = o.data();
      Status s = attention(a, par);
      if (!s.ok()) std::printf("attention error: %s\n", s.message.c_str());
      return o;
    };
    const std::vector<char> o = run(sh.B, q, k, v, start.data(), parallel);
    const double out_eps = sh.dtype == DType::kFloat32 ? 0x1p-24 : sh.dtype == DType::kFloat16 ? 0x1p-11 : 0x1p-8;
    bool accurate = true;
    const int64_t G = sh.Hq / sh.Hkv;
    for (int64_t b = 0; b < sh.B && accurate; ++b) {
      for (int64_t h = 0; h < sh.Hq && accurate; ++h) {
        for (int64_t j = 0; j < sh.Tq && accurate; ++j) {
          const int64_t p = sh.Tk - sh.Tq + j;
          const int64_t kvh = h / G;
          std::vector<double> s;
          std::vector<int64_t> ts;
          for (int64_t t = start[b]; t < sh.Tk; ++t) {
            if (sh.causal && t > p) continue;
            if (sh.window > 0 && t <= p - sh.window) continue;
            double dot = 0;
            for (int64_t d = 0; d < sh.D; ++d)
              dot += static_cast<double>(qb.get(((b * sh.Hq + h) * sh.Tq + j) * sh.D + d)) *
                     kb.get(((b * sh.Hkv + kvh) * sh.Tk + t) * sh.D + d);
            s.push_back(dot * scale);
            ts.push_back(t);
          }
          double mx = -INFINITY, den = 0;
          for (double x : s) mx = std::max(mx, x);
          for (double x : s) den += std::exp(x - mx);
          for (int64_t d = 0; d < sh.D; ++d) {
            double ref = 0, abs_ref = 0;
            for (size_t i = 0; i < s.size(); ++i) {
              const double pv = std::exp(s[i] - mx) / den * vb.get(((b * sh.Hkv + kvh) * sh.Tk + ts[i]) * sh.D + d);
              ref += pv;
              abs_ref += std::fabs(pv);
            }
            const double got = read(sh.dtype, o, ((b * sh.Hq + h) * sh.Tq + j) * sh.D + d);
            // fp32 softmax and accumulation (exp2-based, a few ulps per term), one output rounding.
            const double tol = (abs_ref + 1.0) * 1e-5 * std::sqrt(static_cast<double>(s.size() + sh.D)) +
                               std::fabs(ref) * out_eps;
            if (!(std::fabs(got - ref) <= tol)) {
              accurate = false;
              ck.expect(false, name + ": o[" + std::to_string(b) + "," + std::to_string(h) + "," + std::to_string(j) +
                                   "," + std::to_string(d) + "] = " + std::to_string(got) + ", reference " +
                                   std::to_string(ref));
              break;
            }
          }
        }
      }
    }
    if (accurate) ck.expect(true, name);
    // Batch invariance: the last row alone (its own padding) equals that row in the batch.
    const int64_t b = sh.B - 1, es = dtype_size(sh.dtype);
    const int64_t qrow = sh.Hq * sh.Tq * sh.D * es, krow = sh.Hkv * sh.Tk * sh.D * es;
    std::vector<char> q1(q.begin() + b * qrow, q.end()), k1(k.begin() + b * krow, k.end()),
        v1(v.begin() + b * krow, v.end());
    const std::vector<char> o1 = run(1, q1, k1, v1, &start[b], parallel);
    ck.expect(std::memcmp(o1.data(), o.data() + b * qrow, qrow) == 0, name + ": a row alone differs from the batch");
    ck.expect(same_bits(run(sh.B, q, k, v, start.data(), serial()), o), name + ": one thread gives other bits");
    // Every SIMD level performs the scalar kernel's operations (attention_impl.h): K and V strided
    // along D take the scalar kernel, and must give the same bits as this level's kernel.
    Buffer kw(sh.dtype, 2 * nk), vw(sh.dtype, 2 * nk);
    for (int64_t i = 0; i < nk; ++i) {
      kw.bits[2 * i] = kb.bits[i];
      vw.bits[2 * i] = vb.bits[i];
      kw.set(2 * i + 1, NAN);  // must never be read
      vw.set(2 * i + 1, NAN);
    }
    ck.expect(same_bits(run(sh.B, q, kw.packed(), vw.packed(), start.data(), parallel, 2), o),
              name + ": the scalar kernel (strided K/V) gives other bits");
  }
}

// ------------------------------------------------------------------------------------ sample_margin

struct SampleRow {
  uint64_t seed;
  int64_t position;
  float temperature;
  int64_t top_k;
  float min_p;
};

struct SampleOut {
  std::vector<int64_t> token, runner_up;
  std::vector<float> margin, cutoff;
  Status status = Status::success();
};

SampleOut run_sampling(DType dtype, const void* logits, int64_t row_stride, int64_t col_stride, int64_t V,
                       const std::vector<SampleRow>& rows, const Parallel& parallel) {
  const int64_t B = static_cast<int64_t>(rows.size());
  std::vector<int64_t> seed(B), position(B), top_k(B);
  std::vector<float> temperature(B), min_p(B);
  for (int64_t r = 0; r < B; ++r) {
    seed[r] = static_cast<int64_t>(rows[r].seed);
    position[r] = rows[r].position;
    temperature[r] = rows[r].temperature;
    top_k[r] = rows[r].top_k;
    min_p[r] = rows[r].min_p;
  }
  SampleOut out;
  out.token.assign(B, -7);
  out.runner_up.assign(B, -7);
  out.margin.assign(B, -7.0f);
  out.cutoff.assign(B, -7.0f);
  SamplingArgs a;
  a.dtype = dtype;
  a.logits = logits;
  a.rows = B;
  a.vocab = V;
  a.row_stride = row_stride;
  a.col_stride = col_stride;
  a.seed = seed.data();
  a.position = position.data();
  a.temperature = temperature.data();
  a.top_k = top_k.data();
  a.min_p = min_p.data();
  a.token = out.token.data();
  a.runner_up = out.runner_up.data();
  a.margin = out.margin.data();
  a.cutoff_margin = out.cutoff.data();
  out.status = sample_margin(a, parallel);
  return out;
}

bool same_float(float a, float b) { return std::isnan(a) ? std::isnan(b) : a == b; }

// sampling.h's definition, index by index: candidates from a full sort, every index's noise drawn,
// the cut-off margin as the minimum over every outside index.
void sampling_reference(const std::vector<float>& x, const SampleRow& p, int64_t& token, int64_t& runner_up,
                        float& margin, float& cutoff) {
  const int64_t V = static_cast<int64_t>(x.size());
  const bool has_nan = std::any_of(x.begin(), x.end(), [](float v) { return std::isnan(v); });
  if (p.temperature == 0.0f || has_nan) {
    margin_reference(x, token, runner_up, margin);
    cutoff = std::isnan(margin) ? NAN : INFINITY;
    return;
  }
  const float T = p.temperature;
  std::vector<int64_t> order(V);
  for (int64_t i = 0; i < V; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return x[i] > x[j]; });
  std::vector<int64_t> rank(V);
  for (int64_t i = 0; i < V; ++i) rank[order[i]] = i;
  const bool top_k = p.top_k > 0 && p.top_k < V, min_p = p.min_p > 0.0f;
  const float kth = top_k ? x[order[p.top_k - 1]] : 0.0f, next = top_k ? x[order[p.top_k]] : 0.0f;
  const float xmax = x[order[0]];
  const float L = static_cast<float>(noise::mul(static_cast<double>(T), noise::log_mg(static_cast<double>(p.min_p))));
  auto d = [&](int64_t i) { return x[i] == xmax ? 0.0f : x[i] - xmax; };
  auto gap = [](float a, float b) { return a == b ? 0.0f : a - b; };
  auto in_top_k = [&](int64_t i) { return !top_k || rank[i] < p.top_k; };
  auto in_min_p = [&](int64_t i) { return !min_p || d(i) >= L; };
  std::vector<float> score(V);
  token = runner_up = -1;
  for (int64_t i = 0; i < V; ++i) {
    score[i] = x[i] / T + noise::gumbel(p.seed, p.position, i);
    if (!(in_top_k(i) && in_min_p(i))) continue;
    if (token < 0 || score[i] > score[token]) {
      runner_up = token;
      token = i;
    } else if (runner_up < 0 || score[i] > score[runner_up]) {
      runner_up = i;
    }
  }
  margin = runner_up < 0 ? INFINITY : (score[token] == score[runner_up] ? 0.0f : T * (score[token] - score[runner_up]));
  cutoff = INFINITY;
  if (!top_k && !min_p) return;
  if (top_k) cutoff = std::min(cutoff, gap(x[token], next));
  if (min_p) cutoff = std::min(cutoff, gap(d(token), L));
  for (int64_t i = 0; i < V; ++i) {
    if (in_top_k(i) && in_min_p(i)) continue;
    float D = 0.0f;
    if (!in_top_k(i)) D = std::max(D, gap(kth, x[i]));
    if (!in_min_p(i)) D = std::max(D, gap(L, d(i)));
    const float E = score[i] >= score[token] ? 0.0f : T * (score[token] - score[i]);
    cutoff = std::min(cutoff, std::max(D, E));
  }
}

void check_sampling(Checker& ck, const Parallel& parallel) {
  std::mt19937_64 rng(7);
  // Mixed rows in one batch: no truncation, top-k (heap and selection paths, k = 1, k >= V),
  // min-p (q = 1 keeps only the maxima), both, and greedy.
  const std::vector<SampleRow> kinds = {
      {11, 3, 0.7f, 0, 0.0f},    {12, 4, 0.7f, 50, 0.0f},  {13, 5, 1.3f, 0, 0.05f}, {14, 6, 0.7f, 40, 0.1f},
      {15, 7, 0.0f, 50, 0.1f},   {16, 8, 0.9f, 1, 0.0f},   {17, 9, 0.8f, 5000, 0.0f}, {18, 10, 0.6f, 0, 1.0f},
      {~0ull, -1, 2.0f, 1 << 20, 0.0f},
  };
  for (DType dtype : kDtypes) {
    for (int64_t V : {int64_t{3001}, int64_t{40000}}) {
      for (int kind = 0; kind < 3; ++kind) {
        const int64_t B = static_cast<int64_t>(kinds.size());
        const std::string name = std::string("sample_margin ") + dtype_name(dtype) + " V=" + std::to_string(V) +
                                 " kind=" + std::to_string(kind);
        Buffer buf(dtype, B * V);
        std::uniform_real_distribution<float> uni(-6.f, 6.f);
        for (int64_t i = 0; i < B * V; ++i) {
          // distinct values / many ties / ties plus a NaN row and -inf entries
          buf.set(i, kind == 0 ? uni(rng) : static_cast<float>(rng() % 9) * 0.5f);
          if (kind == 2 && rng() % 50 == 0) buf.set(i, -INFINITY);
        }
        if (kind == 2) buf.set(2 * V + V / 3, NAN);
        const std::vector<char> data = buf.packed();
        const SampleOut got = run_sampling(dtype, data.data(), V, 1, V, kinds, parallel);
        ck.expect(got.status.ok(), name + ": status " + got.status.message);
        for (int64_t r = 0; r < B; ++r) {
          std::vector<float> row(V);
          for (int64_t c = 0; c < V; ++c) row[c] = buf.get(r * V + c);
          int64_t t, u;
          float m, cm;
          sampling_reference(row, kinds[r], t, u, m, cm);
          ck.expect(got.token[r] == t && got.runner_up[r] == u && same_float(got.margin[r], m) &&
                        same_float(got.cutoff[r], cm),
                    name + " row " + std::to_string(r) + ": got (" + std::to_string(got.token[r]) + ", " +
                        std::to_string(got.runner_up[r]) + ", " + std::to_string(got.margin[r]) + ", " +
                        std::to_string(got.cutoff[r]) + ") want (" + std::to_string(t) + ", " + std::to_string(u) +
                        ", " + std::to_string(m) + ", " + std::to_string(cm) + ")");
          // A row alone gives the same answer as in the batch.
          const SampleOut alone = run_sampling(dtype, data.data() + r * V * dtype_size(dtype), V, 1, V, {kinds[r]},
                                               parallel);
          ck.expect(alone.token[0] == got.token[r] && alone.runner_up[0] == got.runner_up[r] &&
                        same_float(alone.margin[0], got.margin[r]) && same_float(alone.cutoff[0], got.cutoff[r]),
                    name + " row " + std::to_string(r) + ": alone differs from the batch");
        }
        // Strided rows take the scalar passes; one thread runs every row in turn: same answers.
        Buffer wide(dtype, B * 2 * V);
        for (int64_t i = 0; i < B * V; ++i) {
          wide.bits[2 * i] = buf.bits[i];
          wide.set(2 * i + 1, 1e30f);  // must never be read
        }
        const std::vector<char> wide_data = wide.packed();
        for (const SampleOut& other : {run_sampling(dtype, wide_data.data(), 2 * V, 2, V, kinds, parallel),
                                       run_sampling(dtype, data.data(), V, 1, V, kinds, serial())}) {
          ck.expect(other.token == got.token && other.runner_up == got.runner_up &&
                        std::equal(other.margin.begin(), other.margin.end(), got.margin.begin(), same_float) &&
                        std::equal(other.cutoff.begin(), other.cutoff.end(), got.cutoff.begin(), same_float),
                    name + ": strided or one-thread answers differ");
        }
      }
    }
  }
  // Bad arguments are refused before anything is written.
  const std::vector<char> data(2 * 8 * 4, 0);
  for (const SampleRow& bad : {SampleRow{1, 0, -1.0f, 0, 0.0f}, SampleRow{1, 0, NAN, 0, 0.0f},
                               SampleRow{1, 0, 0.7f, -3, 0.0f}, SampleRow{1, 0, 0.7f, 0, 1.5f}}) {
    const SampleOut out = run_sampling(DType::kFloat32, data.data(), 8, 1, 8, {SampleRow{1, 0, 0.7f, 0, 0.0f}, bad},
                                       parallel);
    ck.expect(!out.status.ok() && out.token[0] == -7 && out.margin[0] == -7.0f,
              "sample_margin: bad arguments rejected with nothing written");
  }
}

// ------------------------------------------------------------------------------------ kv_patch

void check_kv_patch(Checker& ck) {
  for (DType dtype : kDtypes) {
    const int64_t B = 3, H = 2, T = 9, D = 5, n = 3;
    const int64_t es = dtype_size(dtype);
    std::vector<char> k(B * H * T * D * es), v(k.size()), kn(n * H * D * es), vn(kn.size());
    for (size_t i = 0; i < k.size(); ++i) {
      k[i] = static_cast<char>(i * 7);
      v[i] = static_cast<char>(i * 13);
    }
    for (size_t i = 0; i < kn.size(); ++i) {
      kn[i] = static_cast<char>(100 + i);
      vn[i] = static_cast<char>(50 + i);
    }
    std::vector<char> k_want = k, v_want = v;
    const int64_t rows[n] = {2, 0, 2}, pos[n] = {8, 0, 3};
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t dst = ((rows[i] * H + h) * T + pos[i]) * D * es, src = (i * H + h) * D * es;
        std::memcpy(&k_want[dst], &kn[src], D * es);
        std::memcpy(&v_want[dst], &vn[src], D * es);
      }
    CacheView kc{k.data(), B, H, T, D, {H * T * D, T * D, D, 1}};
    CacheView vc{v.data(), B, H, T, D, {H * T * D, T * D, D, 1}};
    ColumnsView kv{kn.data(), n, H, D, {H * D, D, 1}};
    ColumnsView vv{vn.data(), n, H, D, {H * D, D, 1}};
    Status s = kv_patch(dtype, kc, vc, rows, pos, n, kv, vv);
    ck.expect(s.ok() && k == k_want && v == v_want, std::string("kv_patch ") + dtype_name(dtype));
    // An out-of-range position is refused before anything is written.
    const std::vector<char> before = k;
    const int64_t bad_pos[n] = {1, 9, 2};
    s = kv_patch(dtype, kc, vc, rows, bad_pos, n, kv, vv);
    ck.expect(!s.ok() && k == before, std::string("kv_patch ") + dtype_name(dtype) + ": bad position rejected");
  }
}

}  // namespace

int run_checks(const Parallel& parallel) {
  std::printf("margingate_bench --check: simd=%s (%s), threads=%d\n", simd_level_name(simd_level()),
              simd_level_reason(), parallel.num_threads);
  int failures = 0;
  const std::pair<const char*, std::function<void(Checker&)>> ops[] = {
      {"margin", [&](Checker& ck) { check_margin(ck, parallel); }},
      {"linear", [&](Checker& ck) { check_linear(ck, parallel); }},
      {"attention", [&](Checker& ck) { check_attention(ck, parallel); }},
      {"kv_patch", [&](Checker& ck) { check_kv_patch(ck); }},
      {"sampling", [&](Checker& ck) { check_sampling(ck, parallel); }},
  };
  for (const auto& [op, fn] : ops) {
    Checker ck;
    fn(ck);
    std::printf("%-10s %s: %d checks, %d failed\n", op, ck.failures ? "FAIL" : "ok", ck.checks, ck.failures);
    std::fflush(stdout);
    failures += ck.failures;
  }
  std::printf(failures ? "check FAILED\n" : "check passed\n");
  return failures ? 1 : 0;
}

}  // namespace margingate::bench
