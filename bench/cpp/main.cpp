// margingate_bench: times the native kernels on a grid of shapes and prints a table.
//
//   margingate_bench [--threads N] [--repeats R] [--min-ms M] [op ...]
//   margingate_bench --check [--threads N]
//
// Each case is warmed up, then run R times (each timing covers enough calls to last M ms); the
// table shows the median and min per call, GB/s (bytes the kernel must move) and GFLOP/s.
// --check runs the self-check instead (check.cpp): exit status 1 on any wrong result. Both report
// the SIMD level in use; MARGINGATE_SIMD=scalar|avx2|avx512|neon caps it.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>

#include "harness.h"

namespace margingate::bench {

std::vector<std::pair<std::string, CaseFactory>>& registry() {
  static std::vector<std::pair<std::string, CaseFactory>> r;
  return r;
}

Register::Register(const char* op, CaseFactory factory) { registry().emplace_back(op, std::move(factory)); }

void fill_random(DType dtype, void* data, int64_t count, uint64_t seed, float scale) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  for (int64_t i = 0; i < count; ++i) {
    const float x = dist(rng);
    switch (dtype) {
      case DType::kFloat32: static_cast<float*>(data)[i] = x; break;
      case DType::kFloat16: static_cast<uint16_t*>(data)[i] = float_to_fp16(x); break;
      case DType::kBFloat16: static_cast<uint16_t*>(data)[i] = float_to_bf16(x); break;
    }
  }
}

void* scratch(std::vector<std::vector<char>>& pool, DType dtype, int64_t count) {
  pool.emplace_back(static_cast<size_t>(count * dtype_size(dtype)), 0);
  return pool.back().data();
}

namespace {

// A minimal fork-join pool: the caller runs chunk 0, workers the rest, then all join.
class ThreadPool {
 public:
  explicit ThreadPool(int n) : n_(n) {
    for (int i = 1; i < n_; ++i) workers_.emplace_back([this, i] { loop(i); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> g(m_);
      stop_ = true;
      ++generation_;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return n_; }

  void run(int64_t n, int64_t grain, void* ctx, Parallel::Body body) {
    int64_t chunks = std::min<int64_t>(n_, (n + grain - 1) / grain);
    if (chunks <= 1) {
      body(ctx, 0, n);
      return;
    }
    {
      std::lock_guard<std::mutex> g(m_);
      n_items_ = n;
      chunks_ = chunks;
      ctx_ = ctx;
      body_ = body;
      pending_ = static_cast<int>(chunks - 1);
      ++generation_;
    }
    cv_.notify_all();
    do_chunk(0);
    std::unique_lock<std::mutex> lk(m_);
    done_cv_.wait(lk, [this] { return pending_ == 0; });
  }

 private:
  void do_chunk(int64_t c) {
    const int64_t per = (n_items_ + chunks_ - 1) / chunks_;
    const int64_t b = c * per, e = std::min(n_items_, b + per);
    if (b < e) body_(ctx_, b, e);
  }
  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      std::unique_lock<std::mutex> lk(m_);
      cv_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (stop_) return;
      if (id >= chunks_) continue;
      lk.unlock();
      do_chunk(id);
      lk.lock();
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }
  int n_;
  std::vector<std::thread> workers_;
  std::mutex m_;
  std::condition_variable cv_, done_cv_;
  uint64_t generation_ = 0;
  bool stop_ = false;
  int64_t n_items_ = 0, chunks_ = 0;
  void* ctx_ = nullptr;
  Parallel::Body body_ = nullptr;
  int pending_ = 0;
};

Timing time_case(const Case& c, int repeats, double min_ms) {
  using clock = std::chrono::steady_clock;
  c.run();  // warm-up (page faults, caches)
  // Calibrate the number of calls per timing so one timing lasts about min_ms.
  int calls = 1;
  for (;;) {
    auto t0 = clock::now();
    for (int i = 0; i < calls; ++i) c.run();
    double ms = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
    if (ms >= min_ms || calls >= (1 << 20)) break;
    calls *= 2;
  }
  std::vector<double> us;
  for (int r = 0; r < repeats; ++r) {
    auto t0 = clock::now();
    for (int i = 0; i < calls; ++i) c.run();
    us.push_back(std::chrono::duration<double, std::micro>(clock::now() - t0).count() / calls);
  }
  std::sort(us.begin(), us.end());
  return {us[us.size() / 2], us.front()};
}

}  // namespace
}  // namespace margingate::bench

int main(int argc, char** argv) {
  using namespace margingate;
  using namespace margingate::bench;
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int repeats = 7;
  double min_ms = 20;
  bool check = false;
  std::vector<std::string> only;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (a == "--repeats" && i + 1 < argc) repeats = std::atoi(argv[++i]);
    else if (a == "--min-ms" && i + 1 < argc) min_ms = std::atof(argv[++i]);
    else if (a == "--check") check = true;
    else if (a == "-h" || a == "--help") {
      std::printf("usage: margingate_bench [--threads N] [--repeats R] [--min-ms M] [op ...]\n"
                  "       margingate_bench --check [--threads N]   (self-check; exit 1 on a wrong result)\nops:");
      for (auto& [name, f] : registry()) std::printf(" %s", name.c_str());
      std::printf("\n");
      return 0;
    } else if (!a.empty() && a[0] == '-') {
      std::fprintf(stderr, "margingate_bench: unknown option %s (see --help)\n", a.c_str());
      return 2;
    } else only.push_back(a);
  }
  if (threads < 1 || repeats < 1 || min_ms <= 0) {
    std::fprintf(stderr, "margingate_bench: --threads, --repeats and --min-ms must be positive\n");
    return 2;
  }
  for (const auto& name : only) {
    bool known = false;
    for (auto& [op, f] : registry()) known = known || op == name;
    if (!known) {
      std::fprintf(stderr, "margingate_bench: unknown op '%s' (see --help)\n", name.c_str());
      return 2;
    }
  }
  ThreadPool pool(threads);
  Parallel parallel;
  parallel.self = &pool;
  parallel.num_threads = pool.size();
  parallel.run = [](void* self, int64_t n, int64_t grain, void* ctx, Parallel::Body body) {
    static_cast<ThreadPool*>(self)->run(n, grain, ctx, body);
  };
  if (check) return run_checks(parallel);
  std::printf("margingate_bench: threads=%d simd=%s (%s) repeats=%d\n", threads, simd_level_name(simd_level()),
              simd_level_reason(), repeats);
  std::printf("%-12s %-9s %-34s %12s %12s %10s %10s\n", "op", "dtype", "shape", "median_us", "min_us", "GB/s",
              "GFLOP/s");
  for (auto& [op, factory] : registry()) {
    if (!only.empty() && std::find(only.begin(), only.end(), op) == only.end()) continue;
    std::vector<Case> cases;
    factory(parallel, cases);
    for (const Case& c : cases) {
      Timing t = time_case(c, repeats, min_ms);
      std::printf("%-12s %-9s %-34s %12.2f %12.2f %10.2f %10.2f\n", c.op.c_str(), c.dtype.c_str(), c.shape.c_str(),
                  t.median_us, t.min_us, c.bytes / (t.median_us * 1e3), c.flops / (t.median_us * 1e3));
      std::fflush(stdout);
    }
  }
  return 0;
}
