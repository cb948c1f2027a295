// AVX2 nf4 (bitsandbytes order, fp32 absmax per block), bit-identical to
// csrc/kernels/ref/nf4_int.cpp. Code = number of the 15 fp32 midpoints strictly below
// x * (1 / max(absmax, 1e-38)) (15 compares per vector).
#include "kernels256.h"
#include "simd256.h"

namespace pqk { namespace avx2 {

void quantize_row_nf4(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t*, const pqk_qparams& p) {
  const int64_t bs = p.group;  // power of two, 32..4096
  __m256 mids[15];
  for (int i = 0; i < 15; ++i) mids[i] = _mm256_set1_ps((kNF4[i] + kNF4[i + 1]) * 0.5f);  // as nf4_index
  for (int64_t b = 0; b < k / bs; ++b) {
    const float* xb = x + b * bs;
    __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
    for (int64_t j = 0; j < bs; j += 16) {
      m0 = _mm256_max_ps(m0, abs_ps(_mm256_loadu_ps(xb + j)));
      m1 = _mm256_max_ps(m1, abs_ps(_mm256_loadu_ps(xb + j + 8)));
    }
    const float amax = hmax(_mm256_max_ps(m0, m1));
    std::memcpy(s + 4 * b, &amax, 4);
    uint8_t* qb = q + b * bs / 2;
    if (amax == 0.0f) { std::memset(qb, 0x77, (size_t)(bs / 2)); continue; }
    const __m256 vr = _mm256_set1_ps(bnb_recip(amax));
    for (int64_t j = 0; j < bs; j += 32) {
      __m256i c[4];
      for (int t = 0; t < 4; ++t) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xb + j + 8 * t), vr);
        __m256i n = _mm256_setzero_si256();
        for (int i = 0; i < 15; ++i) n = _mm256_sub_epi32(n, _mm256_castps_si256(_mm256_cmp_ps(v, mids[i], _CMP_GT_OQ)));
        c[t] = n;
      }
      _mm_storeu_si128((__m128i*)(qb + j / 2), pack_pairs(low_bytes32(c[0], c[1], c[2], c[3]), kHighFirst));
    }
  }
}

void dequantize_row_nf4(const uint8_t* q, const uint8_t* s, const uint8_t*, int64_t k, float* y, const pqk_qparams& p) {
  const int64_t bs = p.group;
  const __m256 code_lo = _mm256_loadu_ps(kNF4), code_hi = _mm256_loadu_ps(kNF4 + 8);
  for (int64_t b = 0; b < k / bs; ++b) {
    // table[c] = kNF4[c] * absmax: the reference's product, computed once per block
    const __m256 am = _mm256_set1_ps(load_f32(s + 4 * b));
    const __m256 tlo = _mm256_mul_ps(code_lo, am), thi = _mm256_mul_ps(code_hi, am);
    const uint8_t* qb = q + b * bs / 2;
    float* yb = y + b * bs;
    for (int64_t j = 0; j < bs; j += 32) {
      __m256i e[4];
      unpack_nibbles(_mm_loadu_si128((const __m128i*)(qb + j / 2)), true, e);
      for (int t = 0; t < 4; ++t) _mm256_storeu_ps(yb + j + 8 * t, lut16(tlo, thi, e[t]));
    }
  }
}

}}  // namespace pqk::avx2
