// Activation quantization for compute="int8" (AVX-512): per block of 32, dx = amax/127,
// xq = round_half_even(x / dx) clamped to +-127, sums per 16. Same IEEE operations as
// ref::quantize_act (two correctly rounded divisions; cvtps2dq rounds to nearest even in the
// default MXCSR mode, which pyqkern never changes), so the bytes are identical.
#include "../avx512_gcc12_warnings.h"  // before <immintrin.h>
#include <immintrin.h>

#include "../../core/kernel_table.h"
#include "../../core/packed.h"

namespace pqk { namespace avx512 {

void quantize_act(const float* x, int64_t k, int8_t* xq, float* dx, int32_t* xs) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t b = 0; b < k / QBLK; ++b) {
    const float* xb = x + b * QBLK;
    __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
    __m512 am = _mm512_max_ps(_mm512_and_ps(v0, absmask), _mm512_and_ps(v1, absmask));
    const float amax = _mm512_reduce_max_ps(am);
    const float d = amax / 127.0f;
    dx[b] = d;
    // d == 0 only for an all-zero block: 0 / 1 = 0 gives the same codes as the ref's 0.
    const __m512 vd = _mm512_set1_ps(d != 0.0f ? d : 1.0f);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    __m512i q0 = _mm512_cvtps_epi32(_mm512_div_ps(v0, vd));
    __m512i q1 = _mm512_cvtps_epi32(_mm512_div_ps(v1, vd));
    q0 = _mm512_min_epi32(_mm512_max_epi32(q0, lo), hi);
    q1 = _mm512_min_epi32(_mm512_max_epi32(q1, lo), hi);
    _mm_storeu_si128((__m128i*)(xq + b * QBLK), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128((__m128i*)(xq + b * QBLK + 16), _mm512_cvtepi32_epi8(q1));
    xs[2 * b] = _mm512_reduce_add_epi32(q0);
    xs[2 * b + 1] = _mm512_reduce_add_epi32(q1);
  }
}

}}  // namespace pqk::avx512
