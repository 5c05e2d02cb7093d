// kv_patch: overwrite single K/V columns of a cache in place.
#pragma once

#include "margingate/common.h"

namespace margingate {

// A cache in the Hugging Face layout [batch, heads, capacity, head_dim]; strides in elements.
struct CacheView {
  void* data = nullptr;
  int64_t batch = 0, heads = 0, capacity = 0, head_dim = 0;
  int64_t stride[4] = {0, 0, 0, 0};
};

// A [n, heads, head_dim] block of new columns; strides in elements.
struct ColumnsView {
  const void* data = nullptr;
  int64_t n = 0, heads = 0, head_dim = 0;
  int64_t stride[3] = {0, 0, 0};
};

// For i in [0, n): k_cache[rows[i], :, positions[i], :] = k_new[i] and the same for v.
// Every index is validated first (range, duplicates of a (row, position) pair, shapes); on any
// error nothing is written and the Status names the argument. Costs O(n * heads * head_dim):
// the cache is never copied. The memory rules of kv_patch_check_memory are checked too.
// The validation alone (shapes, index ranges, duplicate pairs), with the same messages; kv_patch
// runs it first, and the CUDA launcher runs it on host copies of the indices before any launch.
Status kv_patch_validate(const CacheView& k_cache, const CacheView& v_cache, const int64_t* rows,
                         const int64_t* positions, int64_t n, const ColumnsView& k_new,
                         const ColumnsView& v_new);

// The memory rules, checked by kv_patch before any write (and by the CUDA registration before
// any launch): neither cache may overlap itself (an expanded or zero-stride view would put several
// columns in one place), k_cache and v_cache may not overlap each other (else v_new could land in
// k), and k_new/v_new may not share memory with either cache (a write could change a column before
// it is read). `element_size` is the bytes per element of all four views. The test depends on the
// layouts alone, never on the indices, and is conservative: a layout it cannot prove free of
// overlap is refused. Layouts made by allocating, slicing, transposing, or stacking k and v along a
// new dimension (interleaved or not) always pass. Views with no data (nullptr) or no elements
// hold no memory and pass.
Status kv_patch_check_memory(int64_t element_size, const CacheView& k_cache, const CacheView& v_cache,
                             const ColumnsView& k_new, const ColumnsView& v_new);

Status kv_patch(DType dtype, const CacheView& k_cache, const CacheView& v_cache,
                const int64_t* rows, const int64_t* positions, int64_t n, const ColumnsView& k_new,
                const ColumnsView& v_new);

}  // namespace margingate
