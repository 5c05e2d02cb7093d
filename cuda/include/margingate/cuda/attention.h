// attention on CUDA: batch-, padding-, capacity- and query-count-invariant GQA attention.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "margingate/attention.h"  // AttentionArgs
#include "margingate/common.h"

namespace margingate::cuda {

// The same contract as margingate::attention (cpp/include/margingate/attention.h); every pointer
// in `args` (q, k, v, o, kv_rows, kv_start) is device memory. Head dim D <= 256, Hq % Hkv == 0.
// Non-finite inputs: a query whose scores include a NaN or +inf gets NaN in every output element;
// visible keys whose scores are all -inf give NaN (torch's softmax); no visible key gives zeros.
// An out-of-range kv_rows[b] or kv_start[b] (outside [0, Bkv) / [0, Tk]) cannot be reported
// without a device sync, so it stops the kernel with a device-side trap (like torch's
// device-side index asserts) that ends the CUDA context: the torch binding checks the values on
// the host before launching (csrc/cuda/attention.cpp), so only a caller of this raw API, or a
// CUDA-graph capture, can reach the trap.
//
// Bytes of device workspace the call needs (0 when it does not split the keys across blocks;
// depends on the current device's SM count, so ask on the device you launch on).
size_t attention_workspace_bytes(const AttentionArgs& args);

// Enqueues the kernel(s) on `stream`; returns cudaErrorInvalidValue for arguments outside the
// contract or the launch error.
cudaError_t attention(const AttentionArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace margingate::cuda
