#include "threadpool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() {}
#endif

namespace pqk {

namespace {

// Workers spin for a short while after a job before sleeping on the condition variable:
// decode-sized jobs take ~50 us, and a futex wake-up costs about as much.
constexpr auto kSpin = std::chrono::microseconds(200);

class Pool {
 public:
  explicit Pool(int n) { resize(n); }
  ~Pool() { stop(); }

  int size() const { return nthreads_; }

  void resize(int n) {
    if (n <= 0) n = std::max(1u, std::thread::hardware_concurrency());
    if (n == nthreads_) return;
    stop();
    nthreads_ = n;
    quit_.store(false);
    // New workers must not mistake the last finished job for a new one: they start from the
    // current generation.
    const uint64_t gen = generation_.load();
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, i, gen] { loop(i, gen); });
  }

  // Runs job(t) for t in [0, ntasks) with the caller taking task 0.
  void run(int ntasks, const std::function<void(int)>& job) {
    if (ntasks <= 1) { job(0); return; }
    job_ = &job;
    ntasks_ = ntasks;
    error_ = nullptr;
    // Every worker acknowledges every job, even those with no task in it: then no worker can
    // lag into the next job and read its ntasks_ / job_ for this generation.
    pending_.store(nthreads_ - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> g(m_);  // pairs with the sleepers' predicate check
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    try { job(0); } catch (...) { record_error(); }
    // wait for the others: spin, then sleep
    const auto until = std::chrono::steady_clock::now() + kSpin;
    while (pending_.load(std::memory_order_acquire) != 0 && std::chrono::steady_clock::now() < until) cpu_relax();
    if (pending_.load(std::memory_order_acquire) != 0) {
      std::unique_lock<std::mutex> lk(m_);
      done_cv_.wait(lk, [this] { return pending_.load(std::memory_order_acquire) == 0; });
    }
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void record_error() {
    std::lock_guard<std::mutex> g(err_m_);
    if (!error_) error_ = std::current_exception();
  }

  void loop(int id, uint64_t seen) {
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      while (generation_.load(std::memory_order_acquire) == seen && !quit_.load(std::memory_order_relaxed) &&
             std::chrono::steady_clock::now() < until)
        cpu_relax();
      if (generation_.load(std::memory_order_acquire) == seen && !quit_.load()) {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return quit_.load() || generation_.load(std::memory_order_acquire) != seen; });
      }
      if (quit_.load()) return;
      seen = generation_.load(std::memory_order_acquire);
      if (id < ntasks_) {
        try { (*job_)(id); } catch (...) { record_error(); }
      }
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> g(m_);
        done_cv_.notify_one();
      }
    }
  }

  void stop() {
    {
      std::lock_guard<std::mutex> g(m_);
      quit_.store(true);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    nthreads_ = 1;
  }

  int nthreads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex m_, err_m_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int)>* job_ = nullptr;  // published by the generation_ release
  int ntasks_ = 0;
  std::atomic<int> pending_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> quit_{false};
  std::exception_ptr error_;
};

std::mutex g_pool_mutex;  // one parallel region at a time; callers from many threads queue
Pool& pool() {
  static Pool p(0);
  return p;
}

}  // namespace

void set_num_threads(int n) {
  std::lock_guard<std::mutex> g(g_pool_mutex);
  pool().resize(n);
}

int get_num_threads() {
  std::lock_guard<std::mutex> g(g_pool_mutex);
  return pool().size();
}

void parallel_for(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (min_chunk < 1) min_chunk = 1;
  std::lock_guard<std::mutex> g(g_pool_mutex);
  Pool& p = pool();
  int64_t nt = std::min<int64_t>(p.size(), (n + min_chunk - 1) / min_chunk);
  if (nt <= 1) { fn(0, n); return; }
  p.run((int)nt, [&](int t) {
    int64_t b = n * t / nt, e = n * (t + 1) / nt;
    if (b < e) fn(b, e);
  });
}

}  // namespace pqk
