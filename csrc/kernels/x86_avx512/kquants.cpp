// AVX-512 dequantizers of the K-quants, bit-identical to csrc/kernels/ref/kquants.cpp: the same
// float operations per element (a mul and a sub for q4_k, one mul for q6_k), only vectorised.
#include "kernels512.h"
#include "simd512.h"

namespace pqk { namespace avx512 {

// q4_k, 64 elements per pass: the low then the high nibbles of 32 bytes, each half with its own
// (scale, min) pair. d*sc*c - dmin*m for c = 0..15 is a 16-entry table, read with vpermps.
void dequantize_row_q4_k(const uint8_t* q, const uint8_t*, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m128i m4 = _mm_set1_epi8(0x0F);
  for (int64_t b = 0; b < k / 256; ++b, q += Q4_K_BYTES) {
    const float d = load_f16v(q), dmin = load_f16v(q + 2);
    const uint8_t* sc = q + 4;
    const uint8_t* qs = q + 16;
    for (int c = 0; c < 4; ++c, qs += 32, y += 64) {
      __m512 t[2];
      for (int h = 0; h < 2; ++h) {
        int s, m;
        q4k_scale_min(sc, 2 * c + h, &s, &m);
        t[h] = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(d * (float)s), iota), _mm512_set1_ps(dmin * (float)m));
      }
      for (int half = 0; half < 2; ++half) {
        const __m128i v = _mm_loadu_si128((const __m128i*)(qs + 16 * half));
        const __m512i lo = _mm512_cvtepu8_epi32(_mm_and_si128(v, m4));
        const __m512i hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), m4));
        _mm512_storeu_ps(y + 16 * half, _mm512_permutexvar_ps(lo, t[0]));
        _mm512_storeu_ps(y + 32 + 16 * half, _mm512_permutexvar_ps(hi, t[1]));
      }
    }
  }
}

// q6_k: per 128-element half, quarter i = 32 elements from nibble i >> 1 of ql[32 (i & 1) + l]
// and bits 2i of qh[l]; (c - 32) converted exactly, times d * scale (one per 16 elements).
void dequantize_row_q6_k(const uint8_t* q, const uint8_t*, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  const __m128i m4 = _mm_set1_epi8(0x0F), m2 = _mm_set1_epi8(3), k32 = _mm_set1_epi8(32);
  for (int64_t b = 0; b < k / 256; ++b, q += Q6_K_BYTES) {
    const int8_t* sc = (const int8_t*)(q + 192);
    const float d = load_f16v(q + 208);
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = q + 64 * h;
      const uint8_t* qh = q + 128 + 32 * h;
      for (int i = 0; i < 4; ++i) {
        const uint8_t* lo = ql + 32 * (i & 1);
        for (int half = 0; half < 2; ++half, y += 16) {
          const __m128i l = _mm_loadu_si128((const __m128i*)(lo + 16 * half));
          const __m128i hb = _mm_loadu_si128((const __m128i*)(qh + 16 * half));
          const __m128i nib = _mm_and_si128(i >> 1 ? _mm_srli_epi16(l, 4) : l, m4);
          const __m128i top = _mm_and_si128(_mm_srl_epi16(hb, _mm_cvtsi32_si128(2 * i)), m2);
          const __m128i c = _mm_sub_epi8(_mm_or_si128(nib, _mm_slli_epi16(top, 4)), k32);  // -32..31
          const __m512 ds = _mm512_set1_ps(d * (float)sc[8 * h + 2 * i + half]);
          _mm512_storeu_ps(y, _mm512_mul_ps(ds, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c))));
        }
      }
    }
  }
}

}}  // namespace pqk::avx512
