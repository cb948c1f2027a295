// AVX-512 q8_0, q4_0, q4_1 (quantize + dequantize) and iq4_nl (dequantize), bit-identical to
// csrc/kernels/ref/ggml_block32.cpp. One ggml block of 32 floats = two zmm per iteration.
#include "kernels512.h"
#include "simd512.h"

namespace pqk { namespace avx512 {

void quantize_row_q8_0(const float* x, int64_t k, uint8_t* q, uint8_t*, uint8_t*, const pqk_qparams&) {
  for (int64_t b = 0; b < k / 32; ++b, x += 32, q += Q8_0_BYTES) {
    const __m512 a = _mm512_loadu_ps(x), c = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_f16v(q, d);
    const __m512 vid = _mm512_set1_ps(id);
    _mm_storeu_si128((__m128i*)(q + 2), _mm512_cvtepi32_epi8(round_away_epi32(_mm512_mul_ps(a, vid))));
    _mm_storeu_si128((__m128i*)(q + 18), _mm512_cvtepi32_epi8(round_away_epi32(_mm512_mul_ps(c, vid))));
  }
}

void dequantize_row_q8_0(const uint8_t* q, const uint8_t*, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  for (int64_t b = 0; b < k / 32; ++b, q += Q8_0_BYTES, y += 32) {
    const __m512 d = _mm512_set1_ps(load_f16v(q));
    const __m512i i0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 2)));
    const __m512i i1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 18)));
    _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_cvtepi32_ps(i0), d));
    _mm512_storeu_ps(y + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(i1), d));
  }
}

void quantize_row_q4_0(const float* x, int64_t k, uint8_t* q, uint8_t*, uint8_t*, const pqk_qparams&) {
  const __m512 k85 = _mm512_set1_ps(8.5f);
  for (int64_t b = 0; b < k / 32; ++b, x += 32, q += Q4_0_BYTES) {
    const __m512 a = _mm512_loadu_ps(x), c = _mm512_loadu_ps(x + 16);
    const __m512 aa = _mm512_abs_ps(a), ac = _mm512_abs_ps(c);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(aa, ac));
    // the reference keeps the first element of largest magnitude; +0.0f if all are zero
    const float max = amax != 0.0f ? x[first_eq(aa, ac, amax)] : 0.0f;
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_f16v(q, d);
    const __m512 vid = _mm512_set1_ps(id);
    const __m512 va = _mm512_add_ps(_mm512_mul_ps(a, vid), k85);
    const __m512 vc = _mm512_add_ps(_mm512_mul_ps(c, vid), k85);
    _mm_storeu_si128((__m128i*)(q + 2), q4_pack_codes(va, vc));
  }
}

// 16 bytes of nibbles (byte j = element j low, j + 16 high) through a 16-entry float table.
static inline void lut_block32(const uint8_t* p, __m512 table, float* y) {
  const __m128i b = _mm_loadu_si128((const __m128i*)p);
  const __m128i m = _mm_set1_epi8(0x0f);
  const __m512i lo = _mm512_cvtepu8_epi32(_mm_and_si128(b, m));
  const __m512i hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m));
  _mm512_storeu_ps(y, _mm512_permutexvar_ps(lo, table));
  _mm512_storeu_ps(y + 16, _mm512_permutexvar_ps(hi, table));
}

void dequantize_row_q4_0(const uint8_t* q, const uint8_t*, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  // table[c] = (float)(c - 8) * d: the same single product the reference computes per element
  const __m512 cm8 = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t b = 0; b < k / 32; ++b, q += Q4_0_BYTES, y += 32)
    lut_block32(q + 2, _mm512_mul_ps(cm8, _mm512_set1_ps(load_f16v(q))), y);
}

void quantize_row_q4_1(const float* x, int64_t k, uint8_t* q, uint8_t*, uint8_t*, const pqk_qparams&) {
  const __m512 khalf = _mm512_set1_ps(0.5f);
  for (int64_t b = 0; b < k / 32; ++b, x += 32, q += Q4_1_BYTES) {
    const __m512 a = _mm512_loadu_ps(x), c = _mm512_loadu_ps(x + 16);
    float mn = _mm512_reduce_min_ps(_mm512_min_ps(a, c));
    float mx = _mm512_reduce_max_ps(_mm512_max_ps(a, c));
    // The reference keeps the first of equal extremes; that only shows for +-0 (sign).
    if (mn == 0.0f || mx == 0.0f) {
      const float z = x[first_eq(a, c, 0.0f)];
      if (mn == 0.0f) mn = z;
      if (mx == 0.0f) mx = z;
    }
    const float d = (mx - mn) / 15.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_f16v(q, d);
    store_f16v(q + 2, mn);
    const __m512 vid = _mm512_set1_ps(id), vmn = _mm512_set1_ps(mn);
    const __m512 va = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(a, vmn), vid), khalf);
    const __m512 vc = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(c, vmn), vid), khalf);
    _mm_storeu_si128((__m128i*)(q + 4), q4_pack_codes(va, vc));
  }
}

void dequantize_row_q4_1(const uint8_t* q, const uint8_t*, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t b = 0; b < k / 32; ++b, q += Q4_1_BYTES, y += 32) {
    // table[c] = d * c + m, rounded twice like the reference
    const __m512 t = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(load_f16v(q)), iota), _mm512_set1_ps(load_f16v(q + 2)));
    lut_block32(q + 4, t, y);
  }
}

void dequantize_row_iq4_nl(const uint8_t* q, const uint8_t*, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  const __m512 kv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)kIQ4NL)));
  for (int64_t b = 0; b < k / 32; ++b, q += IQ4NL_BYTES, y += 32)
    lut_block32(q + 2, _mm512_mul_ps(_mm512_set1_ps(load_f16v(q)), kv), y);
}

}}  // namespace pqk::avx512
