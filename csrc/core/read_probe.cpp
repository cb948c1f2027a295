// The read-bandwidth probe behind pqk_read_probe (pyqkern.h): the ceiling the benchmarks hold
// the kernels to, measured with the kernels' own thread pool. Python threads cannot measure it
// for a weight that sits in L3: starting them costs about what reading 9 MB takes.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>

#include "capi_util.h"
#include "kernel_table.h"
#include "threadpool.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace pqk {
namespace {

// Sum of the 64-bit words of [p, p + n) (n a multiple of 128): eight independent 16-byte
// accumulators, so loads, not the adds' latency, bound the loop. The baseline, where no variant
// has a wider read_sum (Arm, x86 without AVX2): on a Zen 5 core 16-byte loads read a 9 MB
// buffer from L3 ~25% slower than 64-byte ones, so x86 takes the widest loads it can run.
uint64_t sum_words(const uint8_t* p, size_t n) {
#if defined(__SSE2__)
  // named accumulators, not an array: at -O2 GCC kept an array of them in memory (40 GB/s)
  __m128i a0 = _mm_setzero_si128(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (size_t i = 0; i < n; i += 128) {
    const __m128i* q = (const __m128i*)(p + i);
    a0 = _mm_add_epi64(a0, _mm_loadu_si128(q));
    a1 = _mm_add_epi64(a1, _mm_loadu_si128(q + 1));
    a2 = _mm_add_epi64(a2, _mm_loadu_si128(q + 2));
    a3 = _mm_add_epi64(a3, _mm_loadu_si128(q + 3));
    a4 = _mm_add_epi64(a4, _mm_loadu_si128(q + 4));
    a5 = _mm_add_epi64(a5, _mm_loadu_si128(q + 5));
    a6 = _mm_add_epi64(a6, _mm_loadu_si128(q + 6));
    a7 = _mm_add_epi64(a7, _mm_loadu_si128(q + 7));
  }
  a0 = _mm_add_epi64(_mm_add_epi64(_mm_add_epi64(a0, a1), _mm_add_epi64(a2, a3)),
                     _mm_add_epi64(_mm_add_epi64(a4, a5), _mm_add_epi64(a6, a7)));
  uint64_t w[2];
  std::memcpy(w, &a0, 16);
  return w[0] + w[1];
#else
  uint64_t a[8] = {};
  for (size_t i = 0; i < n; i += 128)
    for (int j = 0; j < 8; ++j) {
      uint64_t v[2];
      std::memcpy(v, p + i + 16 * j, 16);
      a[j] += v[0] + v[1];
    }
  for (int j = 1; j < 8; ++j) a[0] += a[j];
  return a[0];
#endif
}

// The widest-load loop this CPU runs, whatever variant is active (PYQKERN_ISA): the probe
// measures the machine, not a variant.
read_sum_fn widest_read_sum() {
  for (int isa : {PQK_ISA_AVX512, PQK_ISA_AVX2})
    if (isa_runnable(isa) && kernel_table(isa).read_sum) return kernel_table(isa).read_sum;
  return sum_words;
}

}  // namespace
}  // namespace pqk

extern "C" pqk_status pqk_read_probe(const void* buf, int64_t nbytes, int32_t reps, double* best_seconds,
                                     uint64_t* checksum) {
  using namespace pqk;
  return guarded([&] {
    if (!buf || !best_seconds) throw Error(PQK_ERR_ARG, "NULL buffer or result");
    if (nbytes < 4096 || nbytes % 128 != 0)
      throw Error(PQK_ERR_ARG, "the probe reads at least 4096 bytes, a multiple of 128");
    if (reps < 1) throw Error(PQK_ERR_ARG, "reps must be at least 1");
    const uint8_t* p = (const uint8_t*)buf;
    const int64_t lines = nbytes / 128;
    const read_sum_fn sum = widest_read_sum();
    double best = 1e30;
    uint64_t total = 0;  // one pass's sum of the words (every pass must agree)
    int64_t passes = 0;
    // each thread's share in one piece (chunks of about lines / threads; min_chunk keeps a
    // thread from taking a sliver), as the GEMV splits its tiles
    const int threads = get_num_threads();
    const int64_t per = std::max<int64_t>(1, lines / (4 * (int64_t)threads));
    const int64_t want = std::min<int64_t>(threads, (lines + per - 1) / per);
    // the best pass of all: a lower bound of what the threads can read either way (a pass the
    // caller ran alone measured one thread; probe_passes waits for reps with all of them)
    probe_passes(reps, want, [&] {
      std::atomic<uint64_t> total_pass{0};
      const auto t0 = std::chrono::steady_clock::now();
      const int joined = parallel_for(lines, per, [&](int64_t b, int64_t e) {
        total_pass.fetch_add(sum(p + b * 128, (size_t)(e - b) * 128), std::memory_order_relaxed);
      });
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      if (passes++ == 0) total = total_pass.load();
      else if (total_pass.load() != total) throw Error(PQK_ERR_INTERNAL, "read probe: passes summed differently");
      return joined;
    });
    *best_seconds = best;
    if (checksum) *checksum = total;
  });
}
