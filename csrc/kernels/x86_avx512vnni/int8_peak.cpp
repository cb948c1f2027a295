// The int8 instruction ceiling of this variant (KernelTable::int8_peak): vpdpbusd on 512-bit
// vectors, 16 independent accumulators, so throughput and not latency bounds it.
#include "../avx512_gcc12_warnings.h"  // before <immintrin.h>
#include <immintrin.h>

#include "../../core/kernel_table.h"
#include "../x86_avx512/asm512.h"

namespace pqk { namespace avx512vnni {

uint64_t int8_peak(int64_t iters) {
  // named accumulators, not an array: an array of them stayed on the stack
#define PQK_16(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
#define PQK_DECL(j) __m512i a##j = _mm512_set1_epi32(j);
  PQK_16(PQK_DECL)
  __m512i u = _mm512_set1_epi8(3), s = _mm512_set1_epi8(-5);
  PQK_IN_ZMM(u);
  PQK_IN_ZMM(s);  // not constants the compiler could fold the sums of
  for (int64_t i = 0; i < iters; ++i) {
#define PQK_DOT(j) a##j = _mm512_dpbusd_epi32(a##j, u, s);
    PQK_16(PQK_DOT)
#define PQK_KEEP(j) PQK_KEEP_ZMM(a##j);
    PQK_16(PQK_KEEP)  // 16 live chains the compiler cannot merge
  }
#define PQK_SUM(j) t = _mm512_add_epi32(t, a##j);
  __m512i t = _mm512_setzero_si512();
  PQK_16(PQK_SUM)
#undef PQK_SUM
#undef PQK_KEEP
#undef PQK_DOT
#undef PQK_DECL
#undef PQK_16
  return (uint64_t)(uint32_t)_mm512_reduce_add_epi32(t);
}

void register_int8_peak(KernelTable& t) {
  t.int8_peak = int8_peak;
  t.int8_peak_ops = 16 * 64 * 2;  // 16 instructions x 64 multiply-adds
}

}}  // namespace pqk::avx512vnni
