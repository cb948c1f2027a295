// AVX2 (+FMA, F16C, BMI2) helpers for the quantize / dequantize row kernels of this folder.
//
// Internal linkage only (anonymous namespace): this header is compiled with AVX2 flags and
// must never hand the linker an external inline symbol another ISA folder could also define.
//
// Exactness notes (every kernel here is bit-identical to csrc/kernels/ref):
// - the folder is compiled with -ffp-contract=off and GCC implements _mm256_mul_ps / add_ps as
//   plain vector operators, so a mul followed by an add stays two roundings as in the
//   reference; no _mm*_fmadd_* is used on a bit-exact path.
// - divisions stay divisions (x / s is not x * (1/s)).
// - _mm256_cvttps_epi32 gives 0x80000000 for NaN / out of range, like cvtt_i32 in common.h;
//   _mm256_cvtps_epi32 rounds half to even under the default MXCSR, like nearbyint.
// - F16C fp32 -> fp16 with _MM_FROUND_TO_NEAREST_INT equals fp32_to_fp16 for every non-NaN
//   float (subnormals, overflow to inf); fp16 -> fp32 is exact.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "../common.h"

namespace pqk { namespace avx2 { namespace {

inline uint16_t f16_bits(float f) {
  return (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(f), _MM_FROUND_TO_NEAREST_INT), 0);
}
inline void store_f16v(uint8_t* p, float f) { uint16_t h = f16_bits(f); std::memcpy(p, &h, 2); }
inline float load_f16v(const uint8_t* p) {
  uint16_t h; std::memcpy(&h, p, 2);
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}
inline float load_f32(const uint8_t* p) { float f; std::memcpy(&f, p, 4); return f; }

inline __m256 abs_ps(__m256 v) { return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline float hmin(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_min_ss(m, _mm_movehdup_ps(m)));
}

// C roundf (half away from zero) then x86 truncating conversion, = round_away_i32 for every
// float: trunc(v + copysign(0.5 - 2^-25, v)). Inf / NaN / |v| >= 2^31 give 0x80000000.
inline __m256i round_away_epi32(__m256 v) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
  const __m256 half = _mm256_castsi256_ps(_mm256_set1_epi32(0x3effffff));  // 0.49999997f
  return _mm256_cvttps_epi32(_mm256_add_ps(v, _mm256_or_ps(_mm256_and_ps(v, sign), half)));
}

// Low byte of each of 32 int32 (a: elements 0..7, b: 8..15, ...), in element order.
inline __m256i low_bytes32(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i m = _mm256_set1_epi32(0xff);
  const __m256i ab = _mm256_packus_epi32(_mm256_and_si256(a, m), _mm256_and_si256(b, m));
  const __m256i cd = _mm256_packus_epi32(_mm256_and_si256(c, m), _mm256_and_si256(d, m));
  return _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// ggml q4 code: MIN(15, (int8_t)cvtt(v)) clamped at 0, for 32 values v[0..3] (8 each), returned
// as bytes lo | hi << 4 (byte j = element j low, j + 16 high).
inline __m128i q4_pack_codes(const __m256* v) {
  __m256i c = low_bytes32(_mm256_cvttps_epi32(v[0]), _mm256_cvttps_epi32(v[1]), _mm256_cvttps_epi32(v[2]),
                          _mm256_cvttps_epi32(v[3]));
  c = _mm256_min_epi8(_mm256_max_epi8(c, _mm256_setzero_si256()), _mm256_set1_epi8(15));
  return _mm_or_si128(_mm256_castsi256_si128(c), _mm_slli_epi16(_mm256_extracti128_si256(c, 1), 4));
}

// Index of the first of 32 lanes (v[0..3]) equal to `x`; one must exist.
inline int first_eq(const __m256* v, float x) {
  const __m256 xx = _mm256_set1_ps(x);
  uint32_t m = 0;
  for (int i = 0; i < 4; ++i) m |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(v[i], xx, _CMP_EQ_OQ)) << (8 * i);
  return __builtin_ctz(m);  // m != 0
}

// 32 codes in [0, 15] as bytes in element order -> 16 bytes, pairs (2i, 2i+1) packed as
// w0 * code[2i] + w1 * code[2i+1]; weights given as the int16 pattern w0 | w1 << 8.
inline __m128i pack_pairs(__m256i bytes, short weights) {
  const __m256i w = _mm256_maddubs_epi16(bytes, _mm256_set1_epi16(weights));
  return _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
}
constexpr short kLowFirst = 1 | (16 << 8);   // int4: element 2i low nibble
constexpr short kHighFirst = 16 | (1 << 8);  // nf4: element 2i high nibble

// 16 packed bytes -> 32 nibble indices in element order, as four vectors of 8 int32.
// high_first: element 2i is the high nibble (nf4); else the low nibble (int4).
inline void unpack_nibbles(__m128i b, bool high_first, __m256i* e) {
  const __m128i m = _mm_set1_epi8(0x0f);
  __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  __m128i first = high_first ? hi : lo, second = high_first ? lo : hi;
  __m128i u0 = _mm_unpacklo_epi8(first, second), u1 = _mm_unpackhi_epi8(first, second);
  e[0] = _mm256_cvtepu8_epi32(u0);
  e[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(u0, 8));
  e[2] = _mm256_cvtepu8_epi32(u1);
  e[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(u1, 8));
}

// table lookup of 16 floats (lo: entries 0..7, hi: 8..15) by int32 indices 0..15
inline __m256 lut16(__m256 lo, __m256 hi, __m256i idx) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

}}}  // namespace pqk::avx2::(anonymous)
