// kv_patch: in-place K/V column writes with all-or-nothing validation.
#include <algorithm>
#include <cstdint>
#include <cstring>
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

// A strided block of elements: up to 5 dimensions (a cache, plus one for "k or v").
struct Layout {
  int dims = 0;
  int64_t size[5] = {0, 0, 0, 0, 0};
  int64_t stride[5] = {0, 0, 0, 0, 0};

  bool empty() const {
    for (int d = 0; d < dims; ++d) {
      if (size[d] == 0) return true;
    }
    return false;
  }
  // The lowest and highest element offset it touches (strides may be negative in a raw view).
  void offsets(int64_t* lo, int64_t* hi) const {
    *lo = 0;
    *hi = 0;
    for (int d = 0; d < dims; ++d) {
      (stride[d] < 0 ? *lo : *hi) += (size[d] - 1) * stride[d];
    }
  }
  // True when no two index tuples can share an element: with the dimensions sorted by stride,
  // each stride must step past everything the smaller ones span. Sufficient, not necessary, so
  // a false answer means "could not prove it" (an expanded, zero-stride view always fails).
  bool provably_disjoint_elements() const {
    int64_t step[5], len[5];
    int n = 0;
    for (int d = 0; d < dims; ++d) {
      if (size[d] <= 1) continue;
      step[n] = stride[d] < 0 ? -stride[d] : stride[d];
      len[n] = size[d];
      ++n;
    }
    for (int i = 1; i < n; ++i) {  // insertion sort by step; at most 5 entries
      for (int j = i; j > 0 && step[j] < step[j - 1]; --j) {
        std::swap(step[j], step[j - 1]);
        std::swap(len[j], len[j - 1]);
      }
    }
    int64_t span = 0;  // the largest offset reachable with the dimensions so far
    for (int i = 0; i < n; ++i) {
      if (step[i] <= span) return false;
      span += (len[i] - 1) * step[i];
    }
    return true;
  }
};

Layout layout_of(const CacheView& c) {
  Layout l;
  l.dims = 4;
  const int64_t sizes[4] = {c.batch, c.heads, c.capacity, c.head_dim};
  for (int d = 0; d < 4; ++d) {
    l.size[d] = sizes[d];
    l.stride[d] = c.stride[d];
  }
  return l;
}

Layout layout_of(const ColumnsView& c) {
  Layout l;
  l.dims = 3;
  const int64_t sizes[3] = {c.n, c.heads, c.head_dim};
  for (int d = 0; d < 3; ++d) {
    l.size[d] = sizes[d];
    l.stride[d] = c.stride[d];
  }
  return l;
}

// The bytes [begin, end) a view touches; empty when it holds no memory.
struct ByteRange {
  uintptr_t begin = 0, end = 0;
  bool empty() const { return begin == end; }
  bool overlaps(const ByteRange& o) const { return !empty() && !o.empty() && begin < o.end && o.begin < end; }
};

ByteRange byte_range(const void* data, const Layout& l, int64_t element_size) {
  if (data == nullptr || l.empty()) return {};
  int64_t lo, hi;
  l.offsets(&lo, &hi);
  const uintptr_t base = reinterpret_cast<uintptr_t>(data);
  return {base + static_cast<uintptr_t>(lo * element_size), base + static_cast<uintptr_t>((hi + 1) * element_size)};
}

}  // namespace

Status kv_patch_check_memory(int64_t element_size, const CacheView& k_cache, const CacheView& v_cache,
                             const ColumnsView& k_new, const ColumnsView& v_new) {
  const Layout lk = layout_of(k_cache), lv = layout_of(v_cache);
  const ByteRange rk = byte_range(k_cache.data, lk, element_size), rv = byte_range(v_cache.data, lv, element_size);
  const std::pair<const char*, std::pair<const Layout*, const ByteRange*>> caches[2] = {{"k_cache", {&lk, &rk}},
                                                                                        {"v_cache", {&lv, &rv}}};
  for (const auto& [name, cache] : caches) {
    if (!cache.second->empty() && !cache.first->provably_disjoint_elements()) {
      return Status::error(std::string("margingate.kv_patch_: ") + name +
                           " has overlapping memory (an expanded or zero-stride view maps several elements to "
                           "one place, so a patch would write several columns at once); pass a cache that owns "
                           "its elements");
    }
  }
  if (rk.overlaps(rv)) {
    // Sharing bytes is fine when k and v interleave without touching: same shape and strides, and
    // the pair read as one [..., 2] block ("k or v" as an extra dimension) never repeats an element.
    bool disjoint = false;
    const intptr_t delta = static_cast<intptr_t>(reinterpret_cast<uintptr_t>(v_cache.data) -
                                                 reinterpret_cast<uintptr_t>(k_cache.data));
    bool same_geometry = delta % element_size == 0;
    for (int d = 0; d < 4; ++d) same_geometry = same_geometry && lk.size[d] == lv.size[d] && lk.stride[d] == lv.stride[d];
    if (same_geometry) {
      Layout both = lk;
      both.dims = 5;
      both.size[4] = 2;
      both.stride[4] = static_cast<int64_t>(delta / element_size);
      disjoint = both.provably_disjoint_elements();
    }
    if (!disjoint) {
      return Status::error(
          "margingate.kv_patch_: k_cache and v_cache overlap in memory (views of one storage that share "
          "elements), so v_new would overwrite k; pass caches that do not overlap");
    }
  }
  const std::pair<const char*, const ColumnsView*> news[2] = {{"k_new", &k_new}, {"v_new", &v_new}};
  for (const auto& [name, cols] : news) {
    const ByteRange rn = byte_range(cols->data, layout_of(*cols), element_size);
    const char* cache = rn.overlaps(rk) ? "k_cache" : rn.overlaps(rv) ? "v_cache" : nullptr;
    if (cache != nullptr) {
      return Status::error(std::string("margingate.kv_patch_: ") + name + " shares memory with " + cache +
                           ", so the patch could overwrite columns before reading them; pass a copy (" + name +
                           ".clone())");
    }
  }
  return Status::success();
}

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
  const int64_t esize = dtype_size(dtype);
  valid = kv_patch_check_memory(esize, k_cache, v_cache, k_new, v_new);
  if (!valid.ok()) return valid;
  // ---- write ----
  for (int64_t i = 0; i < n; ++i) {
    write_column(k_cache, rows[i], positions[i], k_new, i, esize);
    write_column(v_cache, rows[i], positions[i], v_new, i, esize);
  }
  return Status::success();
}

}  // namespace margingate
