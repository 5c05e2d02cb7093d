// attention rows of the C++ benchmark: decode (Tq = 1) over a batch cache and causal prefill.
// bytes = the K/V a call must stream (decode is bound by it); flops = 4 D per visible (q, k) pair.
#include <memory>
#include <string>

#include "harness.h"
#include "margingate/attention.h"

namespace margingate::bench {
namespace {

void add_case(const Parallel& parallel, std::vector<Case>& out, DType dtype, int64_t B, int64_t Hq, int64_t Hkv,
              int64_t Tq, int64_t Tk, int64_t D) {
  auto pool = std::make_shared<std::vector<std::vector<char>>>();
  // scratch() buffers stay put for the pool's lifetime.
  char* q = static_cast<char*>(scratch(*pool, dtype, B * Hq * Tq * D));
  char* k = static_cast<char*>(scratch(*pool, dtype, B * Hkv * Tk * D));
  char* v = static_cast<char*>(scratch(*pool, dtype, B * Hkv * Tk * D));
  char* o = static_cast<char*>(scratch(*pool, dtype, B * Hq * Tq * D));
  fill_random(dtype, q, B * Hq * Tq * D, 11, 1.0f);
  fill_random(dtype, k, B * Hkv * Tk * D, 12, 1.0f);
  fill_random(dtype, v, B * Hkv * Tk * D, 13, 1.0f);
  AttentionArgs a;
  a.dtype = dtype;
  a.q = q;
  a.B = B;
  a.Hq = Hq;
  a.Tq = Tq;
  a.D = D;
  a.k = k;
  a.v = v;
  a.Hkv = Hkv;
  a.Tk = Tk;
  a.Bkv = B;
  const int64_t qs[4] = {Hq * Tq * D, Tq * D, D, 1}, ks[4] = {Hkv * Tk * D, Tk * D, D, 1};
  for (int d = 0; d < 4; ++d) {
    a.q_stride[d] = a.o_stride[d] = qs[d];
    a.k_stride[d] = a.v_stride[d] = ks[d];
  }
  a.causal = true;
  a.scale = 0.125f;
  a.o = o;
  const double pairs = static_cast<double>(Tq) * Tk - static_cast<double>(Tq) * (Tq - 1) / 2;
  const std::string shape = "B=" + std::to_string(B) + " H=" + std::to_string(Hq) + "/" + std::to_string(Hkv) +
                            " Tq=" + std::to_string(Tq) + " Tk=" + std::to_string(Tk) + " D=" + std::to_string(D);
  out.push_back({"attention", dtype_name(dtype), shape, static_cast<double>(2 * B * Hkv * Tk * D * dtype_size(dtype)),
                 4.0 * B * Hq * pairs * D, [=, &parallel] {
                   (void)pool;
                   Status s = attention(a, parallel);
                   if (!s.ok()) std::abort();
                 }});
}

const Register attention_cases("attention", [](const Parallel& parallel, std::vector<Case>& out) {
  const DType dtype = DType::kBFloat16;
  for (int64_t B : {1, 8, 32}) {
    for (int64_t Tk : {512, 4096}) {
      for (auto [Hq, Hkv] : {std::pair<int64_t, int64_t>{8, 1}, {32, 8}}) {
        for (int64_t D : {64, 128, 256}) add_case(parallel, out, dtype, B, Hq, Hkv, 1, Tk, D);
      }
    }
  }
  add_case(parallel, out, dtype, 1, 32, 8, 1024, 1024, 128);
  add_case(parallel, out, dtype, 1, 8, 1, 1024, 1024, 64);
  add_case(parallel, out, DType::kFloat32, 1, 32, 8, 1024, 1024, 128);
});

}  // namespace
}  // namespace margingate::bench
