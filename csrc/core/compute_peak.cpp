// pqk_int8_peak and pqk_fma_peak (pyqkern.h): the int8 dot-product and fp32 FMA instruction
// ceilings of a variant on this CPU, with every thread of the library's pool running them, for
// the benchmarks' compute rooflines (the kernels' own best is a lower bound of them, not the
// ceiling).
#include <algorithm>
#include <atomic>
#include <chrono>

#include "capi_util.h"
#include "kernel_table.h"
#include "threadpool.h"

namespace pqk { namespace {

// operations per second of probe(kIters) doing ops_per_iter each, over all threads: 4 chunks per
// thread of ~0.2 ms each at 2 instructions per cycle (100000 iterations), so a pass takes ~1 ms
// per thread; the best pass of all (probe_passes waits for reps passes every thread took part in:
// a pass the caller ran alone measured one thread)
double peak_rate(uint64_t (*probe)(int64_t), int64_t ops_per_iter, int32_t reps) {
  constexpr int64_t kIters = 100000;
  const int threads = get_num_threads();
  const int64_t chunks = 4 * (int64_t)threads;
  double best = 0.0;
  std::atomic<uint64_t> sink{0};
  probe_passes(reps, threads, [&] {
    const auto t0 = std::chrono::steady_clock::now();
    const int joined = parallel_for(chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) sink.fetch_add(probe(kIters), std::memory_order_relaxed);
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, (double)chunks * kIters * ops_per_iter / s);
    return joined;
  });
  return best;
}

// the C functions' checks, then the rate of the probe the variant's table gives (pick) in G/s
template <class Pick>
pqk_status peak_call(int32_t isa, int32_t reps, double* out, const char* none, Pick pick) {
  return guarded([&] {
    if (!out) throw Error(PQK_ERR_ARG, "NULL result");
    if (reps < 1) throw Error(PQK_ERR_ARG, "reps must be at least 1");
    uint64_t (*probe)(int64_t) = nullptr;
    int64_t ops = 0;
    pick(kernel_table(resolve_isa(isa)), probe, ops);
    if (!probe) throw Error(PQK_ERR_UNSUPPORTED, none);
    *out = peak_rate(probe, ops, reps) / 1e9;
  });
}

}}  // namespace pqk::(anon)

extern "C" pqk_status pqk_int8_peak(int32_t isa, int32_t reps, double* gops) {
  return pqk::peak_call(isa, reps, gops, "this variant has no int8 dot-product instruction probe",
                        [](const pqk::KernelTable& t, uint64_t (*&p)(int64_t), int64_t& ops) {
                          p = t.int8_peak;
                          ops = t.int8_peak_ops;
                        });
}

extern "C" pqk_status pqk_fma_peak(int32_t isa, int32_t reps, double* gflops) {
  return pqk::peak_call(isa, reps, gflops, "this variant has no fp32 FMA instruction probe",
                        [](const pqk::KernelTable& t, uint64_t (*&p)(int64_t), int64_t& ops) {
                          p = t.fma_peak;
                          ops = t.fma_peak_flops;
                        });
}
