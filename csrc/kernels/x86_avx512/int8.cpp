// AVX-512 int8 (symmetric per row, fp32 scale = amax / 127), bit-identical to
// csrc/kernels/ref/nf4_int.cpp. Any K: the tail uses masked loads / stores.
#include "kernels512.h"
#include "simd512.h"

namespace pqk { namespace avx512 {

static inline __mmask16 lanes(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u); }

// clamp(round_half_even(x / scale), -127, 127) as bytes
static inline __m128i int8_codes(__m512 x, __m512 vs) {
  const __m512i c = _mm512_cvtps_epi32(_mm512_div_ps(x, vs));
  return _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(c, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127)));
}

void quantize_row_int8(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t*, const pqk_qparams&) {
  __m512 m0 = _mm512_setzero_ps(), m1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= k; j += 32) {
    m0 = _mm512_max_ps(m0, _mm512_abs_ps(_mm512_loadu_ps(x + j)));
    m1 = _mm512_max_ps(m1, _mm512_abs_ps(_mm512_loadu_ps(x + j + 16)));
  }
  for (; j < k; j += 16) m0 = _mm512_max_ps(m0, _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes(k - j), x + j)));
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
  const float scale = amax / 127.0f;
  std::memcpy(s, &scale, 4);
  if (scale == 0.0f) { std::memset(q, 0, (size_t)k); return; }
  const __m512 vs = _mm512_set1_ps(scale);
  for (j = 0; j + 16 <= k; j += 16) _mm_storeu_si128((__m128i*)(q + j), int8_codes(_mm512_loadu_ps(x + j), vs));
  if (j < k) _mm_mask_storeu_epi8(q + j, lanes(k - j), int8_codes(_mm512_maskz_loadu_ps(lanes(k - j), x + j), vs));
}

void dequantize_row_int8(const uint8_t* q, const uint8_t* s, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  const __m512 vs = _mm512_set1_ps(load_f32(s));
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    const __m512i i = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + j)));
    _mm512_storeu_ps(y + j, _mm512_mul_ps(_mm512_cvtepi32_ps(i), vs));
  }
  if (j < k) {
    const __m512i i = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(lanes(k - j), q + j));
    _mm512_mask_storeu_ps(y + j, lanes(k - j), _mm512_mul_ps(_mm512_cvtepi32_ps(i), vs));
  }
}

}}  // namespace pqk::avx512
