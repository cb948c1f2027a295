// The fp32 FMA instruction ceiling of this variant (KernelTable::fma_peak): vfmadd on 256-bit
// vectors, 12 independent accumulators (latency 4-5 cycles x 2 pipes needs 8-10), each
// a <- a * m + c, which settles at c / (1 - m) = 0.1: no overflow, no subnormals. The avxvnni
// variant inherits it.
#include <immintrin.h>

#include "../../core/kernel_table.h"

namespace pqk { namespace avx2 {

uint64_t fma_peak(int64_t iters) {
  // named accumulators, not an array: an array of them stayed on the stack (see int8_peak)
#define PQK_12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define PQK_DECL(j) __m256 a##j = _mm256_set1_ps(0.01f * (j + 1));
  PQK_12(PQK_DECL)
  __m256 m = _mm256_set1_ps(0.99999f), c = _mm256_set1_ps(1e-6f);
  __asm__("" : "+x"(m), "+x"(c));  // not constants the compiler could fold
  for (int64_t i = 0; i < iters; ++i) {
#define PQK_FMA(j) a##j = _mm256_fmadd_ps(a##j, m, c);
    PQK_12(PQK_FMA)
  }
#define PQK_SUM(j) t = _mm256_add_ps(t, a##j);
  __m256 t = _mm256_setzero_ps();
  PQK_12(PQK_SUM)
#undef PQK_SUM
#undef PQK_FMA
#undef PQK_DECL
#undef PQK_12
  alignas(32) float l[8];
  _mm256_store_ps(l, t);
  double sum = 0;
  for (float v : l) sum += v;
  return (uint64_t)(sum * 1e6);
}

}}  // namespace pqk::avx2
