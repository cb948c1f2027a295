// The read-bandwidth probe's loop (KernelTable::read_sum) with 32-byte loads, the widest AVX2
// has (see x86_avx512/read_sum.cpp for why the width matters).
#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../../core/kernel_table.h"

namespace pqk { namespace avx2 {

uint64_t read_sum(const uint8_t* p, size_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i < n; i += 128) {  // n is a multiple of 128
    a0 = _mm256_add_epi64(a0, _mm256_loadu_si256((const __m256i*)(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_loadu_si256((const __m256i*)(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_loadu_si256((const __m256i*)(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_loadu_si256((const __m256i*)(p + i + 96)));
  }
  const __m256i s = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  uint64_t w[4];
  std::memcpy(w, &s, sizeof w);
  return w[0] + w[1] + w[2] + w[3];
}

}}  // namespace pqk::avx2
