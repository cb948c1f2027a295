// all_finite (AVX2): 32 floats per step, exponent field compared with all ones, the verdicts
// of a row OR-ed together and read once at the end (no branch per vector).
#include <immintrin.h>

#include <cstring>

#include "../../core/kernel_table.h"

namespace pqk { namespace avx2 {

bool all_finite(const float* x, int64_t k) {
  const __m256i e = _mm256_set1_epi32(0x7f800000);
  __m256i bad0 = _mm256_setzero_si256(), bad1 = bad0;
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m256i a = _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(x + i)), e);
    const __m256i b = _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(x + i + 8)), e);
    bad0 = _mm256_or_si256(bad0, _mm256_cmpeq_epi32(a, e));
    bad1 = _mm256_or_si256(bad1, _mm256_cmpeq_epi32(b, e));
  }
  uint32_t bad = (uint32_t)_mm256_movemask_epi8(_mm256_or_si256(bad0, bad1));
  for (; i < k; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    bad |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

}}  // namespace pqk::avx2
