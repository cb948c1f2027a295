// The fp32 FMA instruction ceiling of this variant (KernelTable::fma_peak): vfmadd on 512-bit
// vectors, 16 independent accumulators, each a <- a * m + c (settles at 0.1: no overflow, no
// subnormals). The avx512vnni variant inherits it.
#include "../avx512_gcc12_warnings.h"  // before <immintrin.h>
#include <immintrin.h>

#include "../../core/kernel_table.h"
#include "asm512.h"

namespace pqk { namespace avx512 {

uint64_t fma_peak(int64_t iters) {
  // named accumulators, not an array: an array of them stayed on the stack (see int8_peak)
#define PQK_16(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
#define PQK_DECL(j) __m512 a##j = _mm512_set1_ps(0.01f * (j + 1));
  PQK_16(PQK_DECL)
  __m512 m = _mm512_set1_ps(0.99999f), c = _mm512_set1_ps(1e-6f);
  PQK_IN_ZMM(m);
  PQK_IN_ZMM(c);  // not constants the compiler could fold
  for (int64_t i = 0; i < iters; ++i) {
#define PQK_FMA(j) a##j = _mm512_fmadd_ps(a##j, m, c);
    PQK_16(PQK_FMA)
  }
#define PQK_SUM(j) t = _mm512_add_ps(t, a##j);
  __m512 t = _mm512_setzero_ps();
  PQK_16(PQK_SUM)
#undef PQK_SUM
#undef PQK_FMA
#undef PQK_DECL
#undef PQK_16
  return (uint64_t)((double)_mm512_reduce_add_ps(t) * 1e6);
}

}}  // namespace pqk::avx512
