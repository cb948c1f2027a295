// AVX2 int4 (GPTQ-style group quantization, fp16 scales, optional uint8 zero points),
// bit-identical to csrc/kernels/ref/nf4_int.cpp. Any group >= 16 and per-channel (group -1,
// any even K): the last < 32 values of a group go through the scalar formula.
#include "../ref/ref_kernels.h"  // int4_group_params: the one scalar per-group computation
#include "kernels256.h"
#include "simd256.h"

namespace pqk { namespace avx2 {

// clamp(round_half_even(x / sf) + zero, 0, 15)
static inline __m256i int4_codes(__m256 x, __m256 vsf, __m256i vz) {
  const __m256i c = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_div_ps(x, vsf)), vz);
  return _mm256_min_epi32(_mm256_max_epi32(c, _mm256_setzero_si256()), _mm256_set1_epi32(15));
}
static inline int int4_code(float x, float sf, int zero) {
  const int v = round_even_i32(x / sf) + zero;
  return v < 0 ? 0 : (v > 15 ? 15 : v);
}

void quantize_row_int4(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t* z, const pqk_qparams& p) {
  const int64_t g = p.group == -1 ? k : p.group;
  const bool sym = p.sym != 0;
  for (int64_t b = 0; b < k / g; ++b) {
    const float* xg = x + b * g;
    // range including 0 (the sign of a zero extreme does not matter in int4_group_params)
    __m256 vmn = _mm256_setzero_ps(), vmx = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= g; j += 8) {
      const __m256 v = _mm256_loadu_ps(xg + j);
      vmn = _mm256_min_ps(vmn, v);
      vmx = _mm256_max_ps(vmx, v);
    }
    float range[2] = {hmin(vmn), hmax(vmx)};
    for (; j < g; ++j) {
      range[0] = xg[j] < range[0] ? xg[j] : range[0];
      range[1] = xg[j] > range[1] ? xg[j] : range[1];
    }
    // {min, max} as a 2-element "group": int4_group_params finds the same range from it
    float sf; uint16_t s16; int zero;
    ref::int4_group_params(range, 2, sym, &sf, &s16, &zero);
    std::memcpy(s + 2 * b, &s16, 2);
    if (!sym) z[b] = (uint8_t)zero;

    uint8_t* qg = q + b * g / 2;
    if (sf == 0.0f) { std::memset(qg, zero | (zero << 4), (size_t)(g / 2)); continue; }
    const __m256 vsf = _mm256_set1_ps(sf);
    const __m256i vz = _mm256_set1_epi32(zero);
    for (j = 0; j + 32 <= g; j += 32) {
      __m256i c[4];
      for (int t = 0; t < 4; ++t) c[t] = int4_codes(_mm256_loadu_ps(xg + j + 8 * t), vsf, vz);
      _mm_storeu_si128((__m128i*)(qg + j / 2), pack_pairs(low_bytes32(c[0], c[1], c[2], c[3]), kLowFirst));
    }
    for (; j < g; j += 2)
      qg[j / 2] = (uint8_t)(int4_code(xg[j], sf, zero) | (int4_code(xg[j + 1], sf, zero) << 4));
  }
}

void dequantize_row_int4(const uint8_t* q, const uint8_t* s, const uint8_t* z, int64_t k, float* y, const pqk_qparams& p) {
  const int64_t g = p.group == -1 ? k : p.group;
  for (int64_t b = 0; b < k / g; ++b) {
    const int zero = p.sym ? 8 : z[b];
    const float sf = load_f16v(s + 2 * b);
    const __m256 vsf = _mm256_set1_ps(sf);
    const __m256i vz = _mm256_set1_epi32(zero);
    const uint8_t* qg = q + b * g / 2;
    float* yg = y + b * g;
    int64_t j = 0;
    for (; j + 32 <= g; j += 32) {
      __m256i e[4];
      unpack_nibbles(_mm_loadu_si128((const __m128i*)(qg + j / 2)), false, e);
      // (float)(c - zero) * sf
      for (int t = 0; t < 4; ++t)
        _mm256_storeu_ps(yg + j + 8 * t, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(e[t], vz)), vsf));
    }
    for (; j < g; j += 2) {
      const uint8_t c = qg[j / 2];
      yg[j] = (float)((c & 0xf) - zero) * sf;
      yg[j + 1] = (float)((c >> 4) - zero) * sf;
    }
  }
}

}}  // namespace pqk::avx2
