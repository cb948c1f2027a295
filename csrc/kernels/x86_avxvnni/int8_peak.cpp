// The int8 instruction ceiling of this variant (KernelTable::int8_peak): VEX vpdpbusd on
// 256-bit vectors, 12 independent accumulators (VEX encodes 16 registers: 12 + the 2 operands
// fit, 16 spilled), so throughput and not latency bounds it.
#include <immintrin.h>

#include "../../core/kernel_table.h"

namespace pqk { namespace avxvnni {

uint64_t int8_peak(int64_t iters) {
  // named accumulators, not an array: an array of them stayed on the stack
#define PQK_12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define PQK_DECL(j) __m256i a##j = _mm256_set1_epi32(j);
  PQK_12(PQK_DECL)
  __m256i u = _mm256_set1_epi8(3), s = _mm256_set1_epi8(-5);
  __asm__("" : "+x"(u), "+x"(s));  // not constants the compiler could fold the sums of
  for (int64_t i = 0; i < iters; ++i) {
#define PQK_DOT(j) a##j = _mm256_dpbusd_avx_epi32(a##j, u, s);
    PQK_12(PQK_DOT)
#define PQK_KEEP(j) __asm__ volatile("" : "+x"(a##j));
    PQK_12(PQK_KEEP)  // 12 live chains the compiler cannot merge
  }
#define PQK_SUM(j) t = _mm256_add_epi32(t, a##j);
  __m256i t = _mm256_setzero_si256();
  PQK_12(PQK_SUM)
#undef PQK_SUM
#undef PQK_KEEP
#undef PQK_DOT
#undef PQK_DECL
#undef PQK_12
  alignas(32) uint32_t l[8];
  _mm256_store_si256((__m256i*)l, t);
  uint64_t sum = 0;
  for (uint32_t v : l) sum += v;
  return sum;
}

void register_int8_peak(KernelTable& t) {
  t.int8_peak = int8_peak;
  t.int8_peak_ops = 12 * 32 * 2;  // 12 instructions x 32 multiply-adds
}

}}  // namespace pqk::avxvnni
