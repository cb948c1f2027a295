// AVX2 int8 (symmetric per row, fp32 scale = amax / 127), bit-identical to
// csrc/kernels/ref/nf4_int.cpp. Any K: the last < 32 (quantize) / < 8 (dequantize) values go
// through the scalar formula.
#include <cmath>

#include "kernels256.h"
#include "simd256.h"

namespace pqk { namespace avx2 {

static inline __m256i int8_codes(__m256 x, __m256 vs) {
  const __m256i c = _mm256_cvtps_epi32(_mm256_div_ps(x, vs));
  return _mm256_min_epi32(_mm256_max_epi32(c, _mm256_set1_epi32(-127)), _mm256_set1_epi32(127));
}

void quantize_row_int8(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t*, const pqk_qparams&) {
  __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    m0 = _mm256_max_ps(m0, abs_ps(_mm256_loadu_ps(x + j)));
    m1 = _mm256_max_ps(m1, abs_ps(_mm256_loadu_ps(x + j + 8)));
  }
  float amax = hmax(_mm256_max_ps(m0, m1));
  for (; j < k; ++j) { const float a = std::fabs(x[j]); amax = amax > a ? amax : a; }
  const float scale = amax / 127.0f;
  std::memcpy(s, &scale, 4);
  if (scale == 0.0f) { std::memset(q, 0, (size_t)k); return; }
  const __m256 vs = _mm256_set1_ps(scale);
  for (j = 0; j + 32 <= k; j += 32) {
    __m256i c[4];
    for (int t = 0; t < 4; ++t) c[t] = int8_codes(_mm256_loadu_ps(x + j + 8 * t), vs);
    _mm256_storeu_si256((__m256i*)(q + j), low_bytes32(c[0], c[1], c[2], c[3]));
  }
  for (; j < k; ++j) {
    int v = round_even_i32(x[j] / scale);
    v = v < -127 ? -127 : (v > 127 ? 127 : v);
    q[j] = (uint8_t)(int8_t)v;
  }
}

void dequantize_row_int8(const uint8_t* q, const uint8_t* s, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  const float scale = load_f32(s);
  const __m256 vs = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    const __m256i i = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + j)));
    _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_cvtepi32_ps(i), vs));
  }
  for (; j < k; ++j) y[j] = (float)(int8_t)q[j] * scale;
}

}}  // namespace pqk::avx2
