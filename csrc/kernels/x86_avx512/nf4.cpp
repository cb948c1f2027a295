// AVX-512 nf4 (bitsandbytes order, fp32 absmax per block), bit-identical to
// csrc/kernels/ref/nf4_int.cpp. Code = number of the 15 fp32 midpoints strictly below
// x / absmax (found by a 4-step branch-free binary search over the sorted midpoints).
#include "kernels512.h"
#include "simd512.h"

namespace pqk { namespace avx512 {

static inline __m512 nf4_midpoints() {
  alignas(64) float m[16];
  for (int i = 0; i < 15; ++i) m[i] = (kNF4[i] + kNF4[i + 1]) * 0.5f;  // as nf4_index computes them
  m[15] = m[14];  // never indexed
  return _mm512_load_ps(m);
}

// count of midpoints < v, for v in [-1, 1] (never NaN)
static inline __m512i nf4_code(__m512 v, __m512 mids) {
  const __m512 mid7 = _mm512_permutexvar_ps(_mm512_set1_epi32(7), mids);
  __m512i c = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(v, mid7, _CMP_GT_OQ), _mm512_set1_epi32(8));
  for (int step = 4; step >= 1; step >>= 1) {
    const __m512 thr = _mm512_permutexvar_ps(_mm512_add_epi32(c, _mm512_set1_epi32(step - 1)), mids);
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(v, thr, _CMP_GT_OQ), c, _mm512_set1_epi32(step));
  }
  return c;
}

void quantize_row_nf4(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t*, const pqk_qparams& p) {
  const int64_t bs = p.group;  // power of two, 32..4096
  const __m512 mids = nf4_midpoints();
  for (int64_t b = 0; b < k / bs; ++b) {
    const float* xb = x + b * bs;
    __m512 m0 = _mm512_setzero_ps(), m1 = _mm512_setzero_ps();
    for (int64_t j = 0; j < bs; j += 32) {
      m0 = _mm512_max_ps(m0, _mm512_abs_ps(_mm512_loadu_ps(xb + j)));
      m1 = _mm512_max_ps(m1, _mm512_abs_ps(_mm512_loadu_ps(xb + j + 16)));
    }
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
    std::memcpy(s + 4 * b, &amax, 4);
    uint8_t* qb = q + b * bs / 2;
    if (amax == 0.0f) { std::memset(qb, 0x77, (size_t)(bs / 2)); continue; }
    const __m512 vr = _mm512_set1_ps(bnb_recip(amax));
    for (int64_t j = 0; j < bs; j += 32) {
      const __m512i c0 = nf4_code(_mm512_mul_ps(_mm512_loadu_ps(xb + j), vr), mids);
      const __m512i c1 = nf4_code(_mm512_mul_ps(_mm512_loadu_ps(xb + j + 16), vr), mids);
      _mm_storeu_si128((__m128i*)(qb + j / 2), pack_pairs(c0, c1, kHighFirst));
    }
  }
}

// bitsandbytes 4-bit dequantization through a 16-entry code book (nf4 or fp4)
static void dequantize_row_bnb4(const float* book, const uint8_t* q, const uint8_t* s, int64_t k, float* y,
                                int64_t bs) {
  const __m512 code = _mm512_loadu_ps(book);
  for (int64_t b = 0; b < k / bs; ++b) {
    // table[c] = book[c] * absmax: the reference's product, computed once per block
    const __m512 t = _mm512_mul_ps(code, _mm512_set1_ps(load_f32(s + 4 * b)));
    const uint8_t* qb = q + b * bs / 2;
    float* yb = y + b * bs;
    for (int64_t j = 0; j < bs; j += 32) {
      __m512i e0, e1;
      unpack_nibbles(_mm_loadu_si128((const __m128i*)(qb + j / 2)), true, &e0, &e1);
      _mm512_storeu_ps(yb + j, _mm512_permutexvar_ps(e0, t));
      _mm512_storeu_ps(yb + j + 16, _mm512_permutexvar_ps(e1, t));
    }
  }
}

void dequantize_row_nf4(const uint8_t* q, const uint8_t* s, const uint8_t*, int64_t k, float* y, const pqk_qparams& p) {
  dequantize_row_bnb4(kNF4, q, s, k, y, p.group);
}

void dequantize_row_fp4(const uint8_t* q, const uint8_t* s, const uint8_t*, int64_t k, float* y, const pqk_qparams& p) {
  dequantize_row_bnb4(kFP4, q, s, k, y, p.group);
}

}}  // namespace pqk::avx512
