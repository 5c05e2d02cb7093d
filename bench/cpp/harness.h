// The C++ benchmark harness: every op file registers its cases; main.cpp runs and prints them.
// Links only the torch-free core, so it times exactly the kernels the torch ops call.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "margingate/common.h"

namespace margingate::bench {

struct Timing {
  double median_us = 0;
  double min_us = 0;
};

// One row of the table: `run` does the work once; bytes/flops are what one run moves/computes.
struct Case {
  std::string op;
  std::string dtype;
  std::string shape;
  double bytes = 0;
  double flops = 0;
  std::function<void()> run;
};

// Fills `out` with the cases of one op. `parallel` is the benchmark's thread pool.
using CaseFactory = std::function<void(const Parallel& parallel, std::vector<Case>& out)>;

// Registers a factory at static-initialisation time (one per bench_<op>.cpp).
struct Register {
  Register(const char* op, CaseFactory factory);
};

std::vector<std::pair<std::string, CaseFactory>>& registry();

// Deterministic pseudo-random fill (values in [-scale, scale)) in the given dtype.
void fill_random(DType dtype, void* data, int64_t count, uint64_t seed, float scale = 1.0f);
// A zeroed buffer for `count` elements of `dtype`, owned by `pool` (the pointer stays valid for
// the pool's lifetime, whatever else is added to it).
void* scratch(std::vector<std::vector<char>>& pool, DType dtype, int64_t count);

// The self-check (margingate_bench --check, check.cpp): every op against a scalar reference and
// the invariance properties at this process's SIMD level. Returns the exit status (0 = all right).
int run_checks(const Parallel& parallel);

}  // namespace margingate::bench
