// all_finite (AVX2): 16 floats per step, exponent field compared with the limit (fields and
// limit are non-negative as int32, so the signed compare is the unsigned one), the verdicts of
// a row OR-ed together and read once at the end (no branch per vector); the tail by ref.
#include <immintrin.h>

#include "../../core/kernel_table.h"
#include "../ref/ref_kernels.h"

namespace pqk { namespace avx2 {

bool all_finite(const float* x, int64_t k, uint32_t e) {
  const __m256i ef = _mm256_set1_epi32(0x7f800000), lim = _mm256_set1_epi32((int)(e << 23) - 1);
  __m256i bad0 = _mm256_setzero_si256(), bad1 = bad0;
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m256i a = _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(x + i)), ef);
    const __m256i b = _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(x + i + 8)), ef);
    bad0 = _mm256_or_si256(bad0, _mm256_cmpgt_epi32(a, lim));
    bad1 = _mm256_or_si256(bad1, _mm256_cmpgt_epi32(b, lim));
  }
  return _mm256_movemask_epi8(_mm256_or_si256(bad0, bad1)) == 0 && ref::all_finite(x + i, k - i, e);
}

}}  // namespace pqk::avx2
