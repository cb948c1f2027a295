// all_finite (AVX-512): 32 floats per step, exponent field compared with all ones into mask
// registers OR-ed together; the tail through a masked load (masked-off lanes read as 0).
#include "../avx512_gcc12_warnings.h"  // before <immintrin.h>
#include <immintrin.h>

#include "../../core/kernel_table.h"

namespace pqk { namespace avx512 {

bool all_finite(const float* x, int64_t k) {
  const __m512i e = _mm512_set1_epi32(0x7f800000);
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    const __m512i a = _mm512_and_si512(_mm512_loadu_si512((const void*)(x + i)), e);
    const __m512i b = _mm512_and_si512(_mm512_loadu_si512((const void*)(x + i + 16)), e);
    bad = _kor_mask16(bad, _kor_mask16(_mm512_cmpeq_epi32_mask(a, e), _mm512_cmpeq_epi32_mask(b, e)));
  }
  for (; i < k; i += 16) {
    const __mmask16 m = k - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - i)) - 1);
    const __m512i a = _mm512_and_si512(_mm512_maskz_loadu_epi32(m, (const void*)(x + i)), e);
    bad = _kor_mask16(bad, _mm512_cmpeq_epi32_mask(a, e));
  }
  return bad == 0;
}

}}  // namespace pqk::avx512
