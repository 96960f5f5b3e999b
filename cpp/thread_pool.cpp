#include "thread_pool.h"

#include <chrono>

namespace quipc {

namespace {
thread_local const ExternalPool* t_external = nullptr;
}  // namespace

ScopedExternalPool::ScopedExternalPool(const ExternalPool* pool) : saved_(t_external) {
  t_external = pool;
}

ScopedExternalPool::~ScopedExternalPool() { t_external = saved_; }

ThreadPool& ThreadPool::instance() {
  static ThreadPool pool;
  return pool;
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    epoch_.fetch_add(1);
  }
  wake_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::ensure_workers(int count) {
  while (int(workers_.size()) < count) {
    const int index = int(workers_.size()) + 1;
    workers_.emplace_back([this, index] { worker_loop(index); });
  }
}

void ThreadPool::run(int n, const std::function<void(int)>& fn) {
  if (n <= 1) {
    if (n == 1) fn(0);
    return;
  }
  if (t_external != nullptr) {
    t_external->parallel_for(t_external->ctx, n, fn);
    return;
  }
  std::lock_guard<std::mutex> region(run_mu_);
  ensure_workers(n - 1);
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = &fn;
    active_.store(n);
    pending_.store(n - 1);
    epoch_.fetch_add(1);
  }
  wake_.notify_all();
  fn(0);
  while (pending_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
}

void ThreadPool::worker_loop(int index) {
  uint64_t seen = 0;
  for (;;) {
    // Spin (yielding) for up to ~1 ms for the next region, then sleep until one starts:
    // decode calls layers back to back, but an idle pool must not hold a core.
    uint64_t now = epoch_.load(std::memory_order_acquire);
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(1000);
    for (int spin = 0; now == seen; ++spin) {
      if ((spin & 63) == 63 && std::chrono::steady_clock::now() > until) break;
      std::this_thread::yield();
      now = epoch_.load(std::memory_order_acquire);
    }
    if (now == seen) {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return epoch_.load() != seen || stop_; });
      now = epoch_.load();
    }
    const std::function<void(int)>* job;
    int active;
    {
      // Take the region's state together with its epoch: a worker that overslept one
      // region joins the current one and records that one as seen.
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) return;
      seen = epoch_.load();
      job = job_;
      active = active_.load();
    }
    if (index < active) {
      (*job)(index);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }
}

}  // namespace quipc
