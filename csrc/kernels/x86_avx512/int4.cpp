// AVX-512 int4 (GPTQ-style group quantization, fp16 scales, optional uint8 zero points),
// bit-identical to csrc/kernels/ref/nf4_int.cpp. Any group >= 16 and per-channel (group -1,
// any even K): partial vectors use masked loads / stores.
#include "../ref/ref_kernels.h"  // int4_group_params: the one scalar per-group computation
#include "kernels512.h"
#include "simd512.h"

namespace pqk { namespace avx512 {

static inline __mmask16 lanes(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u); }

// clamp(round_half_even(x / sf) + zero, 0, 15)
static inline __m512i int4_codes(__m512 x, __m512 vsf, __m512i vz) {
  const __m512i c = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_div_ps(x, vsf)), vz);
  return _mm512_min_epi32(_mm512_max_epi32(c, _mm512_setzero_si512()), _mm512_set1_epi32(15));
}

void quantize_row_int4(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t* z, const pqk_qparams& p) {
  const int64_t g = p.group == -1 ? k : p.group;
  const bool sym = p.sym != 0;
  for (int64_t b = 0; b < k / g; ++b) {
    const float* xg = x + b * g;
    // range including 0 (the sign of a zero extreme does not matter in int4_group_params)
    __m512 vmn = _mm512_setzero_ps(), vmx = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= g; j += 16) {
      const __m512 v = _mm512_loadu_ps(xg + j);
      vmn = _mm512_min_ps(vmn, v);
      vmx = _mm512_max_ps(vmx, v);
    }
    if (j < g) {  // masked-off lanes load 0.0, which the range already includes
      const __m512 v = _mm512_maskz_loadu_ps(lanes(g - j), xg + j);
      vmn = _mm512_min_ps(vmn, v);
      vmx = _mm512_max_ps(vmx, v);
    }
    // {min, max} as a 2-element "group": int4_group_params finds the same range from it
    const float range[2] = {_mm512_reduce_min_ps(vmn), _mm512_reduce_max_ps(vmx)};
    float sf; uint16_t s16; int zero;
    ref::int4_group_params(range, 2, sym, &sf, &s16, &zero);
    std::memcpy(s + 2 * b, &s16, 2);
    if (!sym) z[b] = (uint8_t)zero;

    uint8_t* qg = q + b * g / 2;
    if (sf == 0.0f) { std::memset(qg, zero | (zero << 4), (size_t)(g / 2)); continue; }
    const __m512 vsf = _mm512_set1_ps(sf);
    const __m512i vz = _mm512_set1_epi32(zero);
    for (j = 0; j + 32 <= g; j += 32) {
      const __m512i c0 = int4_codes(_mm512_loadu_ps(xg + j), vsf, vz);
      const __m512i c1 = int4_codes(_mm512_loadu_ps(xg + j + 16), vsf, vz);
      _mm_storeu_si128((__m128i*)(qg + j / 2), pack_pairs(c0, c1, kLowFirst));
    }
    if (j < g) {  // n = g - j is even, < 32
      const int64_t n = g - j;
      const __m512i c0 = int4_codes(_mm512_maskz_loadu_ps(lanes(n), xg + j), vsf, vz);
      const __m512i c1 = int4_codes(_mm512_maskz_loadu_ps(lanes(n - 16 > 0 ? n - 16 : 0), xg + j + 16), vsf, vz);
      _mm_mask_storeu_epi8(qg + j / 2, lanes(n / 2), pack_pairs(c0, c1, kLowFirst));
    }
  }
}

void dequantize_row_int4(const uint8_t* q, const uint8_t* s, const uint8_t* z, int64_t k, float* y, const pqk_qparams& p) {
  const int64_t g = p.group == -1 ? k : p.group;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t b = 0; b < k / g; ++b) {
    const int zero = p.sym ? 8 : z[b];
    // table[c] = (float)(c - zero) * sf: the reference's product, once per group
    const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(iota, _mm512_set1_epi32(zero))),
                                   _mm512_set1_ps(load_f16v(s + 2 * b)));
    const uint8_t* qg = q + b * g / 2;
    float* yg = y + b * g;
    int64_t j = 0;
    __m512i e0, e1;
    for (; j + 32 <= g; j += 32) {
      unpack_nibbles(_mm_loadu_si128((const __m128i*)(qg + j / 2)), false, &e0, &e1);
      _mm512_storeu_ps(yg + j, _mm512_permutexvar_ps(e0, t));
      _mm512_storeu_ps(yg + j + 16, _mm512_permutexvar_ps(e1, t));
    }
    if (j < g) {
      const int64_t n = g - j;
      unpack_nibbles(_mm_maskz_loadu_epi8(lanes(n / 2), qg + j / 2), false, &e0, &e1);
      _mm512_mask_storeu_ps(yg + j, lanes(n), _mm512_permutexvar_ps(e0, t));
      _mm512_mask_storeu_ps(yg + j + 16, lanes(n - 16 > 0 ? n - 16 : 0), _mm512_permutexvar_ps(e1, t));
    }
  }
}

}}  // namespace pqk::avx512
