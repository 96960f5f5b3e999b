// A small persistent thread pool: run(n, fn) calls fn(0..n-1) in parallel, the caller
// taking part as worker 0. Workers spin briefly before sleeping, so that the many short
// parallel regions of decode (one per layer) do not each pay a futex wake-up.
#pragma once
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace quipc {

// Another pool that run() hands its parallel regions to, on the thread that installed it
// (ScopedExternalPool): e.g. onnxruntime's intra-op pool inside a custom-op kernel, so that
// one pool, sized by its owner, runs everything. parallel_for runs fn(0..n-1), possibly in
// parallel, and returns when all are done.
struct ExternalPool {
  void (*parallel_for)(void* ctx, int n, const std::function<void(int)>& fn);
  void* ctx;
};

class ScopedExternalPool {
 public:
  explicit ScopedExternalPool(const ExternalPool* pool);
  ~ScopedExternalPool();
  ScopedExternalPool(const ScopedExternalPool&) = delete;
  ScopedExternalPool& operator=(const ScopedExternalPool&) = delete;

 private:
  const ExternalPool* saved_;
};

class ThreadPool {
 public:
  static ThreadPool& instance();
  ~ThreadPool();
  // Runs fn(i) for i in [0, n); returns when all are done. n <= 1 runs inline; so does a
  // region on a thread with a ScopedExternalPool, through that pool.
  void run(int n, const std::function<void(int)>& fn);

 private:
  void ensure_workers(int count);
  void worker_loop(int index);

  std::vector<std::thread> workers_;
  std::mutex mu_;             // guards the sleeping handshake and run() callers
  std::mutex run_mu_;         // one parallel region at a time
  std::condition_variable wake_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> active_{0};  // workers that take part in the current epoch
  const std::function<void(int)>* job_ = nullptr;
  bool stop_ = false;
};

// Splits [0, total) into `parts` near-equal ranges aligned to `align`; returns range k.
inline void split_range(int total, int parts, int k, int align, int* lo, int* hi) {
  const int units = (total + align - 1) / align;
  const int base = units / parts, extra = units % parts;
  const int u0 = k * base + (k < extra ? k : extra);
  const int u1 = u0 + base + (k < extra ? 1 : 0);
  *lo = u0 * align < total ? u0 * align : total;
  *hi = u1 * align < total ? u1 * align : total;
}

}  // namespace quipc
