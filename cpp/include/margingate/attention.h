// attention: batch- and query-invariant GQA attention with left padding and sliding windows.
#pragma once

#include "margingate/common.h"

namespace margingate {

// q [B, Hq, Tq, D], k/v [Bkv, Hkv, Tk, D], o [B, Hq, Tq, D]; strides in elements, any layout.
// Query row b reads k/v row kv_rows[b] (kv_rows == nullptr: row b, and then Bkv == B).
// Query j of row b sits at position p = Tk - Tq + j. It attends to keys t with
//   kv_start[b] <= t (left padding before it is ignored; kv_start == nullptr means 0),
//   t <= p when causal, and p - window < t when window > 0 (sliding window).
// Head h of q uses kv head h / (Hq / Hkv). scores are q.k * scale; softmax in fp32.
//
// Invariance (the contract): o[b, h, j] depends only on that query vector and the keys/values it
// attends to, bit for bit: keys are reduced in fixed-size chunks counted from the first key the
// query sees, with an online softmax in fp32, and the chunks are combined in order. A query with
// no visible key gets zeros.
//
// Non-finite inputs propagate as in torch's attention, never as plausible numbers: a query whose
// scores include a NaN or +inf (a NaN in q or in a visible key, an infinite key element) gets NaN
// in every output element; a NaN in a visible value makes the output element of its head_dim
// index NaN (an infinite value: inf or NaN). A -inf score weighs 0 like torch's, except that a
// chunk of 64 keys whose scores are all -inf gives NaN. NaN payloads are unspecified; the SIMD
// levels agree on which outputs are NaN and bit for bit on the others. Keys outside a query's
// window or before kv_start are never read, so their contents cannot matter.
struct AttentionArgs {
  DType dtype = DType::kFloat32;
  const void* q = nullptr;
  int64_t B = 0, Hq = 0, Tq = 0, D = 0;
  int64_t q_stride[4] = {0, 0, 0, 0};
  const void* k = nullptr;
  int64_t Hkv = 0, Tk = 0;
  int64_t k_stride[4] = {0, 0, 0, 0};
  const void* v = nullptr;
  int64_t v_stride[4] = {0, 0, 0, 0};
  int64_t Bkv = 0;                    // rows of k/v
  const int64_t* kv_rows = nullptr;   // optional [B], values in [0, Bkv)
  const int64_t* kv_start = nullptr;  // optional [B], indexed by the query row
  bool causal = true;
  float scale = 1.0f;
  int64_t window = 0;  // <= 0: no sliding window
  void* o = nullptr;
  int64_t o_stride[4] = {0, 0, 0, 0};
};

Status attention(const AttentionArgs& args, const Parallel& parallel);

}  // namespace margingate
