// The library's own thread pool. Work is split into contiguous index ranges (about four per
// thread) that the threads claim in turn; kernels write disjoint outputs per index and compute
// each output the same way whatever range holds it, so results never depend on the thread
// count or on which thread ran what.
#pragma once
#include <cstdint>
#include <functional>

#include "pyqkern/pyqkern.h"  // PQK_MAX_THREADS

namespace pqk {

constexpr int kMaxThreads = PQK_MAX_THREADS;
void set_num_threads(int n);  // n <= 0: the CPUs this process may run on (affinity mask); > kMaxThreads: Error
int get_num_threads();

// Calls fn(begin, end) over [0, n) split into at most chunks_per_thread * get_num_threads()
// chunks of at least min_chunk items; one chunk, on the caller, when that is all there is, or
// when the pool is busy with another thread's call (so host threads run side by side; nested
// calls also run inline). Blocks until all are
// done, but not on a worker that has not started yet (the caller takes its chunks instead).
// Exceptions in fn are rethrown on the caller. Returns how many threads ran chunks (the
// benchmarks' probes count only passes every thread took part in).
int parallel_for(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn,
                 int chunks_per_thread = 4);

// The benchmark probes' passes: pass() runs one parallel_for and returns its thread count; passes
// go on until reps of them had `want` threads, or for about 1 s (a pool worker can take tens of
// ms to start on a VM, and until then the caller runs a pass alone). pass() keeps the best.
void probe_passes(int32_t reps, int64_t want, const std::function<int()>& pass);

}  // namespace pqk
