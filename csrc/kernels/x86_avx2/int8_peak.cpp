// The int8 instruction ceiling of this variant (KernelTable::int8_peak) without VNNI: vpmaddubsw
// (32 u8 x s8 products, added in pairs to int16) and vpaddw into an int16 accumulator, the step
// the nibble kernels (int8_kernels256.h) take per 32 multiply-adds, on 7 independent chains. Each
// chain has its own u8 operand, made opaque every iteration: maddubs does not read its
// accumulator, so with shared or constant operands the compiler computes one product for all
// chains, or hoists it out of the loop. The avx512 variant without VNNI inherits this probe (its
// 512-bit maddubs would go further on CPUs with 512-bit datapaths).
#include <immintrin.h>

#include "../../core/kernel_table.h"

namespace pqk { namespace avx2 {

uint64_t int8_peak(int64_t iters) {
  // named accumulators, not an array: an array of them stayed on the stack
#define PQK_7(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6)
#define PQK_DECL(j) __m256i a##j = _mm256_set1_epi16(j), u##j = _mm256_set1_epi8(3 + j);
  PQK_7(PQK_DECL)
  __m256i s = _mm256_set1_epi8(-5);
  __asm__("" : "+x"(s));
  for (int64_t i = 0; i < iters; ++i) {
#define PQK_DOT(j) a##j = _mm256_add_epi16(a##j, _mm256_maddubs_epi16(u##j, s));
    PQK_7(PQK_DOT)
#define PQK_KEEP(j) __asm__ volatile("" : "+x"(a##j), "+x"(u##j));
    PQK_7(PQK_KEEP)  // 7 live chains, 7 fresh products per iteration
  }
#define PQK_SUM(j) t = _mm256_add_epi32(t, _mm256_madd_epi16(a##j, _mm256_set1_epi16(1)));
  __m256i t = _mm256_setzero_si256();
  PQK_7(PQK_SUM)
#undef PQK_SUM
#undef PQK_KEEP
#undef PQK_DOT
#undef PQK_DECL
#undef PQK_7
  alignas(32) uint32_t l[8];
  _mm256_store_si256((__m256i*)l, t);
  uint64_t sum = 0;
  for (uint32_t v : l) sum += v;
  return sum;
}

}}  // namespace pqk::avx2
