#include "threadpool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace pqk {

namespace {

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
    quit_ = false;
    // New workers must not mistake the last finished job for a new one: they start from the
    // current generation.
    const uint64_t gen = generation_;
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, i, gen] { loop(i, gen); });
  }

  // Runs job(t) for t in [0, ntasks) with the caller taking task 0.
  void run(int ntasks, const std::function<void(int)>& job) {
    if (ntasks <= 1) { job(0); return; }
    {
      std::unique_lock<std::mutex> lk(m_);
      job_ = &job;
      ntasks_ = ntasks;
      pending_ = ntasks - 1;
      error_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    try { job(0); } catch (...) { std::lock_guard<std::mutex> g(m_); if (!error_) error_ = std::current_exception(); }
    std::unique_lock<std::mutex> lk(m_);
    done_cv_.wait(lk, [this] { return pending_ == 0; });
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void loop(int id, uint64_t seen) {
    for (;;) {
      const std::function<void(int)>* job;
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return quit_ || generation_ != seen; });
        if (quit_) return;
        seen = generation_;
        if (id >= ntasks_) continue;
        job = job_;
      }
      try { (*job)(id); } catch (...) { std::lock_guard<std::mutex> g(m_); if (!error_) error_ = std::current_exception(); }
      {
        std::lock_guard<std::mutex> g(m_);
        if (--pending_ == 0) done_cv_.notify_one();
      }
    }
  }

  void stop() {
    {
      std::lock_guard<std::mutex> g(m_);
      quit_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    nthreads_ = 1;
  }

  int nthreads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex m_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int)>* job_ = nullptr;
  int ntasks_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  bool quit_ = false;
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
