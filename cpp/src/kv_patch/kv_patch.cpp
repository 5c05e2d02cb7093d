// kv_patch: in-place K/V column writes with all-or-nothing validation.
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "margingate/kv_patch.h"

namespace margingate {

namespace {

std::string shape_error(const char* arg, const char* what, int64_t got, int64_t want) {
  return std::string("margingate.kv_patch_: ") + arg + " " + what + " is " + std::to_string(got) +
         ", expected " + std::to_string(want);
}

// Copies one [heads, head_dim] column into the cache (strided on both sides).
void write_column(const CacheView& cache, int64_t row, int64_t pos, const ColumnsView& cols,
                  int64_t i, int64_t esize) {
  char* dst_base = static_cast<char*>(cache.data);
  const char* src_base = static_cast<const char*>(cols.data);
  for (int64_t h = 0; h < cache.heads; ++h) {
    char* dst = dst_base + (row * cache.stride[0] + h * cache.stride[1] + pos * cache.stride[2]) * esize;
    const char* src = src_base + (i * cols.stride[0] + h * cols.stride[1]) * esize;
    if (cache.stride[3] == 1 && cols.stride[2] == 1) {
      std::memcpy(dst, src, static_cast<size_t>(cache.head_dim * esize));
    } else {
      for (int64_t d = 0; d < cache.head_dim; ++d) {
        std::memcpy(dst + d * cache.stride[3] * esize, src + d * cols.stride[2] * esize,
                    static_cast<size_t>(esize));
      }
    }
  }
}

}  // namespace

Status kv_patch_validate(const CacheView& k_cache, const CacheView& v_cache, const int64_t* rows,
                         const int64_t* positions, int64_t n, const ColumnsView& k_new,
                         const ColumnsView& v_new) {
  const int64_t dims_k[4] = {k_cache.batch, k_cache.heads, k_cache.capacity, k_cache.head_dim};
  const int64_t dims_v[4] = {v_cache.batch, v_cache.heads, v_cache.capacity, v_cache.head_dim};
  static const char* dim_names[4] = {"batch", "heads", "capacity", "head_dim"};
  for (int d = 0; d < 4; ++d) {
    if (dims_k[d] != dims_v[d]) return Status::error(shape_error("v_cache", dim_names[d], dims_v[d], dims_k[d]));
  }
  if (n < 0) return Status::error("margingate.kv_patch_: negative number of columns");
  const std::pair<const char*, const ColumnsView*> news[2] = {{"k_new", &k_new}, {"v_new", &v_new}};
  for (const auto& [name, cols] : news) {
    if (cols->n != n) return Status::error(shape_error(name, "size(0)", cols->n, n));
    if (cols->heads != k_cache.heads) return Status::error(shape_error(name, "size(1) (heads)", cols->heads, k_cache.heads));
    if (cols->head_dim != k_cache.head_dim)
      return Status::error(shape_error(name, "size(2) (head_dim)", cols->head_dim, k_cache.head_dim));
  }
  std::vector<std::pair<int64_t, int64_t>> seen;
  seen.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    if (rows[i] < 0 || rows[i] >= k_cache.batch) {
      return Status::error("margingate.kv_patch_: rows[" + std::to_string(i) + "] = " + std::to_string(rows[i]) +
                           " is out of range for a cache of batch " + std::to_string(k_cache.batch));
    }
    if (positions[i] < 0 || positions[i] >= k_cache.capacity) {
      return Status::error("margingate.kv_patch_: positions[" + std::to_string(i) + "] = " +
                           std::to_string(positions[i]) + " is out of range for a cache of capacity " +
                           std::to_string(k_cache.capacity));
    }
    seen.emplace_back(rows[i], positions[i]);
  }
  std::sort(seen.begin(), seen.end());
  auto dup = std::adjacent_find(seen.begin(), seen.end());
  if (dup != seen.end()) {
    return Status::error("margingate.kv_patch_: (row, position) = (" + std::to_string(dup->first) + ", " +
                         std::to_string(dup->second) + ") appears more than once in rows/positions");
  }
  return Status::success();
}

Status kv_patch(DType dtype, const CacheView& k_cache, const CacheView& v_cache,
                const int64_t* rows, const int64_t* positions, int64_t n, const ColumnsView& k_new,
                const ColumnsView& v_new) {
  // Validate everything before the first write.
  Status valid = kv_patch_validate(k_cache, v_cache, rows, positions, n, k_new, v_new);
  if (!valid.ok()) return valid;
  // ---- write ----
  const int64_t esize = dtype_size(dtype);
  for (int64_t i = 0; i < n; ++i) {
    write_column(k_cache, rows[i], positions[i], k_new, i, esize);
    write_column(v_cache, rows[i], positions[i], v_new, i, esize);
  }
  return Status::success();
}

}  // namespace margingate
