// The core call description for margingate::attention, shared by the CPU and CUDA registrations.
#pragma once

#include <cstdint>

#include "margingate/attention.h"
#include "torch_utils.h"

namespace margingate::binding {

// q [B, Hq, Tq, D], k/v [Bkv, Hkv, Tk, D], out [B, Hq, Tq, D]; all already checked. kv_rows and
// kv_start are int64 pointers on the kernel's device, or nullptr; window <= 0 means none.
inline AttentionArgs attention_args(DType dtype, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& out, const int64_t* kv_rows, const int64_t* kv_start,
                                    bool causal, double scale, int64_t window) {
  AttentionArgs a;
  a.dtype = dtype;
  a.q = q.data_ptr();
  a.B = q.size(0);
  a.Hq = q.size(1);
  a.Tq = q.size(2);
  a.D = q.size(3);
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.Bkv = k.size(0);
  a.Hkv = k.size(1);
  a.Tk = k.size(2);
  for (int d = 0; d < 4; ++d) {
    a.q_stride[d] = q.stride(d);
    a.k_stride[d] = k.stride(d);
    a.v_stride[d] = v.stride(d);
    a.o_stride[d] = out.stride(d);
  }
  a.kv_rows = kv_rows;
  a.kv_start = kv_start;
  a.causal = causal;
  a.scale = static_cast<float>(scale);
  a.window = window;
  a.o = out.data_ptr();
  return a;
}

}  // namespace margingate::binding
