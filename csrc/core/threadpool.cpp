#include "threadpool.h"

#include "capi_util.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <pthread.h>
#include <thread>
#include <vector>
#if defined(__linux__)
#include <sched.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() {}
#endif

namespace pqk {

namespace {

// CPUs this process may run on (its affinity mask: taskset, cgroup cpusets), else the machine's
int default_threads() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  return (int)std::max(1u, std::thread::hardware_concurrency());
}

// the pool's size, readable without the lock (0 until the pool exists)
std::atomic<int> g_size{0};

// Workers spin for a short while after a job before sleeping on the condition variable:
// decode-sized jobs take ~50 us, and a futex wake-up costs about as much.
constexpr auto kSpin = std::chrono::microseconds(200);

// One parallel_for: [0, n) cut into nchunks fixed ranges that whoever is running takes in turn.
// The caller works too and returns once every chunk is done; it never waits for a worker that
// has not started (descheduled, still asleep, or busy in another process's time slice) — such
// a worker later finds no chunk left. Shared ownership keeps the job alive for late workers;
// fn is only called for claimed chunks, all of which finish before the caller returns.
struct Job {
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t n = 0, nchunks = 0;
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<int> threads{0};  // that ran at least one chunk
  std::mutex m;
  std::condition_variable cv;
  std::exception_ptr error;

  void work() {
    for (bool joined = false;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= nchunks) return;
      if (!joined) {
        joined = true;
        threads.fetch_add(1, std::memory_order_relaxed);
      }
      try {
        (*fn)(n * c / nchunks, n * (c + 1) / nchunks);
      } catch (...) {
        std::lock_guard<std::mutex> g(m);
        if (!error) error = std::current_exception();
      }
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == nchunks) {
        std::lock_guard<std::mutex> g(m);  // pairs with the caller's predicate check
        cv.notify_all();
      }
    }
  }
  bool finished() const { return done.load(std::memory_order_acquire) == nchunks; }
};

class Pool {
 public:
  explicit Pool(int n) { resize(n); }
  ~Pool() { stop(); }

  int size() const { return nthreads_; }

  void resize(int n) {
    if (n <= 0) n = default_threads();
    if (n == nthreads_) return;
    stop();  // nthreads_ = 1
    quit_.store(false);
    try {
      for (int i = 1; i < n; ++i) workers_.emplace_back([this] { loop(); });
    } catch (const std::exception& e) {
      // the OS refused a thread (limits, memory): join the ones that started and stay at one
      // thread, so size() tells the truth and a retry of the same n starts them again
      stop();
      throw Error(PQK_ERR_NOMEM, "could not start " + std::to_string(n) + " threads (" + e.what() +
                                     "); running on 1 thread");
    }
    nthreads_ = n;
    g_size.store(n, std::memory_order_relaxed);
  }

  int run(const std::shared_ptr<Job>& job) {
    {
      std::lock_guard<std::mutex> g(m_);  // pairs with the sleepers' predicate check
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    job->work();
    // chunks other threads still run: spin, then sleep
    const auto until = std::chrono::steady_clock::now() + kSpin;
    while (!job->finished() && std::chrono::steady_clock::now() < until) cpu_relax();
    if (!job->finished()) {
      std::unique_lock<std::mutex> lk(job->m);
      job->cv.wait(lk, [&] { return job->finished(); });
    }
    {
      std::lock_guard<std::mutex> g(m_);
      if (job_ == job) job_.reset();
    }
    if (job->error) std::rethrow_exception(job->error);
    return job->threads.load(std::memory_order_relaxed);  // every chunk done: no thread joins now
  }

 private:
  void loop() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      while (generation_.load(std::memory_order_acquire) == seen && !quit_.load(std::memory_order_relaxed) &&
             std::chrono::steady_clock::now() < until)
        cpu_relax();
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return quit_.load() || generation_.load(std::memory_order_acquire) != seen; });
        if (quit_.load()) return;
        seen = generation_.load(std::memory_order_acquire);
        job = job_;  // null if the caller already finished it
      }
      if (job) job->work();
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
    g_size.store(1, std::memory_order_relaxed);
  }

  int nthreads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex m_;
  std::condition_variable cv_;
  std::shared_ptr<Job> job_;  // the current job, published with generation_ under m_
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> quit_{false};
};

// One parallel region at a time. A call that finds it taken by another thread runs its range
// on its own thread instead of queueing (results do not depend on the thread count), so a host
// with several threads of its own gets them all working, not one call at a time.
std::mutex g_pool_mutex;

// The pool is never destroyed (its workers just stop with the process), and fork() is handled:
// the parent holds g_pool_mutex across the fork, so no parallel step is half done in the child,
// and the child, which has none of the parent's worker threads, starts a new pool (the old one
// is left alone: destroying it would join threads that do not exist there) of the same size on
// first use. Before, a child of a multi-threaded parent hung at exit in ~Pool, or on its first
// matmul when the fork came during one.
Pool* g_pool = nullptr;
int g_child_threads = 0;  // > 0 in a forked child until its pool is started

void before_fork() { g_pool_mutex.lock(); }
void after_fork_parent() { g_pool_mutex.unlock(); }
void after_fork_child() {
  if (g_pool) g_child_threads = g_pool->size();  // else a child that never started its pool: keep its count
  g_pool = nullptr;  // leaked on purpose (see above)
  g_size.store(0, std::memory_order_relaxed);
  g_pool_mutex.unlock();  // locked by this same thread in before_fork
}

Pool& pool() {  // callers hold g_pool_mutex
  if (!g_pool) {
    static const bool hooked = [] {
      pthread_atfork(before_fork, after_fork_parent, after_fork_child);
      return true;
    }();
    (void)hooked;
    g_pool = new Pool(1);
    const int n = g_child_threads;  // a forked child: the parent's count, else one per CPU
    g_child_threads = 0;
    try {
      g_pool->resize(n);
    } catch (const Error&) {  // the OS refused threads: one thread (set_num_threads reports it)
    }
  }
  return *g_pool;
}

}  // namespace

void set_num_threads(int n) {
  // a bound before any thread starts: 100000 made the pool start threads (under its lock) until
  // the OS refused, minutes later (a review)
  if (n > kMaxThreads)
    throw Error(PQK_ERR_ARG, "thread count " + std::to_string(n) + " is above " + std::to_string(kMaxThreads));
  std::lock_guard<std::mutex> g(g_pool_mutex);
  pool().resize(n);
}

int get_num_threads() {
  if (const int n = g_size.load(std::memory_order_relaxed)) return n;
  std::lock_guard<std::mutex> g(g_pool_mutex);
  return pool().size();
}

int parallel_for(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn,
                 int chunks_per_thread) {
  if (n <= 0) return 0;
  if (min_chunk < 1) min_chunk = 1;
  const int64_t max_chunks = (n + min_chunk - 1) / min_chunk;
  // one chunk, one thread, or the pool busy with another thread's call: run here, unlocked
  if (max_chunks <= 1 || g_size.load(std::memory_order_relaxed) == 1) {
    fn(0, n);
    return 1;
  }
  std::unique_lock<std::mutex> g(g_pool_mutex, std::try_to_lock);
  if (!g.owns_lock()) {
    fn(0, n);
    return 1;
  }
  Pool& p = pool();
  const int64_t nt = std::min<int64_t>(p.size(), max_chunks);
  if (nt <= 1) {
    fn(0, n);
    return 1;
  }
  auto job = std::make_shared<Job>();
  job->fn = &fn;
  job->n = n;
  job->nchunks = std::min<int64_t>(max_chunks, (int64_t)chunks_per_thread * nt);
  return p.run(job);
}

void probe_passes(int32_t reps, int64_t want, const std::function<int()>& pass) {
  const auto start = std::chrono::steady_clock::now();
  for (int32_t full = 0; full < reps;) {
    if (pass() >= want) ++full;
    else if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > 1.0) break;
  }
}

}  // namespace pqk
