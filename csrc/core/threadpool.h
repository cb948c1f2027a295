// The library's own thread pool. Work is split into contiguous index ranges, one per
// thread; kernels write disjoint outputs per index, so results never depend on the
// thread count.
#pragma once
#include <cstdint>
#include <functional>

namespace pqk {

void set_num_threads(int n);  // n <= 0: hardware concurrency
int get_num_threads();  // takes the pool lock: never call it from inside a parallel_for body

// Calls fn(begin, end) over [0, n) split into at most get_num_threads() chunks of at least
// min_chunk items. Blocks until all are done. Exceptions in fn are rethrown on the caller.
void parallel_for(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace pqk
