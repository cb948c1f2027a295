// AVX2 q8_0, q4_0, q4_1 (quantize + dequantize) and iq4_nl (dequantize), bit-identical to
// csrc/kernels/ref/ggml_block32.cpp. One ggml block of 32 floats = four ymm per iteration.
#include "kernels256.h"
#include "simd256.h"

namespace pqk { namespace avx2 {

static inline void load32(const float* x, __m256* v) {
  for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(x + 8 * i);
}

void quantize_row_q8_0(const float* x, int64_t k, uint8_t* q, uint8_t*, uint8_t*, const pqk_qparams&) {
  for (int64_t b = 0; b < k / 32; ++b, x += 32, q += Q8_0_BYTES) {
    __m256 v[4];
    load32(x, v);
    const float amax = hmax(_mm256_max_ps(_mm256_max_ps(abs_ps(v[0]), abs_ps(v[1])),
                                          _mm256_max_ps(abs_ps(v[2]), abs_ps(v[3]))));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_f16v(q, d);
    const __m256 vid = _mm256_set1_ps(id);
    __m256i c[4];
    for (int i = 0; i < 4; ++i) c[i] = round_away_epi32(_mm256_mul_ps(v[i], vid));
    _mm256_storeu_si256((__m256i*)(q + 2), low_bytes32(c[0], c[1], c[2], c[3]));
  }
}

void dequantize_row_q8_0(const uint8_t* q, const uint8_t*, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  for (int64_t b = 0; b < k / 32; ++b, q += Q8_0_BYTES, y += 32) {
    const __m256 d = _mm256_set1_ps(load_f16v(q));
    for (int i = 0; i < 4; ++i) {
      const __m256i c = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + 2 + 8 * i)));
      _mm256_storeu_ps(y + 8 * i, _mm256_mul_ps(_mm256_cvtepi32_ps(c), d));
    }
  }
}

void quantize_row_q4_0(const float* x, int64_t k, uint8_t* q, uint8_t*, uint8_t*, const pqk_qparams&) {
  const __m256 k85 = _mm256_set1_ps(8.5f);
  for (int64_t b = 0; b < k / 32; ++b, x += 32, q += Q4_0_BYTES) {
    __m256 v[4], a[4];
    load32(x, v);
    for (int i = 0; i < 4; ++i) a[i] = abs_ps(v[i]);
    const float amax = hmax(_mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3])));
    // the reference keeps the first element of largest magnitude; +0.0f if all are zero
    const float max = amax != 0.0f ? x[first_eq(a, amax)] : 0.0f;
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_f16v(q, d);
    const __m256 vid = _mm256_set1_ps(id);
    for (int i = 0; i < 4; ++i) v[i] = _mm256_add_ps(_mm256_mul_ps(v[i], vid), k85);
    _mm_storeu_si128((__m128i*)(q + 2), q4_pack_codes(v));
  }
}

// 16 bytes of nibbles (byte j = element j low, j + 16 high) -> 32 floats f(code)
template <class F>
static inline void nibbles_block32(const uint8_t* p, float* y, F f) {
  const __m128i b = _mm_loadu_si128((const __m128i*)p);
  const __m128i m = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  _mm256_storeu_ps(y, f(_mm256_cvtepu8_epi32(lo)));
  _mm256_storeu_ps(y + 8, f(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))));
  _mm256_storeu_ps(y + 16, f(_mm256_cvtepu8_epi32(hi)));
  _mm256_storeu_ps(y + 24, f(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))));
}

void dequantize_row_q4_0(const uint8_t* q, const uint8_t*, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  const __m256i k8 = _mm256_set1_epi32(8);
  for (int64_t b = 0; b < k / 32; ++b, q += Q4_0_BYTES, y += 32) {
    const __m256 d = _mm256_set1_ps(load_f16v(q));
    // (float)(c - 8) * d
    nibbles_block32(q + 2, y, [&](__m256i c) { return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c, k8)), d); });
  }
}

void quantize_row_q4_1(const float* x, int64_t k, uint8_t* q, uint8_t*, uint8_t*, const pqk_qparams&) {
  const __m256 khalf = _mm256_set1_ps(0.5f);
  for (int64_t b = 0; b < k / 32; ++b, x += 32, q += Q4_1_BYTES) {
    __m256 v[4];
    load32(x, v);
    float mn = hmin(_mm256_min_ps(_mm256_min_ps(v[0], v[1]), _mm256_min_ps(v[2], v[3])));
    float mx = hmax(_mm256_max_ps(_mm256_max_ps(v[0], v[1]), _mm256_max_ps(v[2], v[3])));
    // The reference keeps the first of equal extremes; that only shows for +-0 (sign).
    if (mn == 0.0f || mx == 0.0f) {
      const float z = x[first_eq(v, 0.0f)];
      if (mn == 0.0f) mn = z;
      if (mx == 0.0f) mx = z;
    }
    const float d = (mx - mn) / 15.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_f16v(q, d);
    store_f16v(q + 2, mn);
    const __m256 vid = _mm256_set1_ps(id), vmn = _mm256_set1_ps(mn);
    for (int i = 0; i < 4; ++i) v[i] = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(v[i], vmn), vid), khalf);
    _mm_storeu_si128((__m128i*)(q + 4), q4_pack_codes(v));
  }
}

void dequantize_row_q4_1(const uint8_t* q, const uint8_t*, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  for (int64_t b = 0; b < k / 32; ++b, q += Q4_1_BYTES, y += 32) {
    const __m256 d = _mm256_set1_ps(load_f16v(q)), m = _mm256_set1_ps(load_f16v(q + 2));
    // d * c + m, two roundings
    nibbles_block32(q + 4, y, [&](__m256i c) { return _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(c)), m); });
  }
}

void dequantize_row_iq4_nl(const uint8_t* q, const uint8_t*, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  const __m128i kv = _mm_loadu_si128((const __m128i*)kIQ4NL);
  for (int64_t b = 0; b < k / 32; ++b, q += IQ4NL_BYTES, y += 32) {
    const __m256 d = _mm256_set1_ps(load_f16v(q));
    const __m128i bytes = _mm_loadu_si128((const __m128i*)(q + 2));
    const __m128i m = _mm_set1_epi8(0x0f);
    // kvalues as int8 by pshufb, then d * (float)value
    const __m128i lo = _mm_shuffle_epi8(kv, _mm_and_si128(bytes, m));
    const __m128i hi = _mm_shuffle_epi8(kv, _mm_and_si128(_mm_srli_epi16(bytes, 4), m));
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; ++i)
      _mm256_storeu_ps(y + 8 * i, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[i]))));
  }
}

}}  // namespace pqk::avx2
