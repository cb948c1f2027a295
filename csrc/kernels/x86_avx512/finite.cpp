// all_finite (AVX-512): 32 floats per step, exponent field compared with the limit into mask
// registers OR-ed together; the tail through a masked load (masked-off lanes read as 0).
#include "../avx512_gcc12_warnings.h"  // before <immintrin.h>
#include <immintrin.h>

#include "../../core/kernel_table.h"

namespace pqk { namespace avx512 {

bool all_finite(const float* x, int64_t k, uint32_t e) {
  const __m512i ef = _mm512_set1_epi32(0x7f800000), lim = _mm512_set1_epi32((int)(e << 23));
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    const __m512i a = _mm512_and_si512(_mm512_loadu_si512((const void*)(x + i)), ef);
    const __m512i b = _mm512_and_si512(_mm512_loadu_si512((const void*)(x + i + 16)), ef);
    bad = _kor_mask16(bad, _kor_mask16(_mm512_cmpge_epu32_mask(a, lim), _mm512_cmpge_epu32_mask(b, lim)));
  }
  for (; i < k; i += 16) {
    const __mmask16 m = k - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - i)) - 1);
    const __m512i a = _mm512_and_si512(_mm512_maskz_loadu_epi32(m, (const void*)(x + i)), ef);
    bad = _kor_mask16(bad, _mm512_mask_cmpge_epu32_mask(m, a, lim));
  }
  return bad == 0;
}

}}  // namespace pqk::avx512
