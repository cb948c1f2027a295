// AVX-512 helpers for the quantize / dequantize row kernels of this folder.
//
// Internal linkage only (anonymous namespace): this header is compiled with AVX-512 flags and
// must never hand the linker an external inline symbol another ISA folder could also define.
//
// Exactness notes (every kernel here is bit-identical to csrc/kernels/ref):
// - the folder is compiled with -ffp-contract=off, and GCC implements _mm512_mul_ps / add_ps as
//   plain vector operators, so a mul followed by an add stays two roundings as in the
//   reference; no _mm*_fmadd_* is used on a bit-exact path.
// - divisions stay divisions (x / s is not x * (1/s)).
// - _mm512_cvttps_epi32 gives 0x80000000 for NaN / out of range, like cvtt_i32 in common.h;
//   _mm512_cvtps_epi32 rounds half to even under the default MXCSR, like nearbyint.
// - F16C fp32 -> fp16 with _MM_FROUND_TO_NEAREST_INT equals fp32_to_fp16 for every non-NaN
//   float (subnormals, overflow to inf); fp16 -> fp32 is exact (checked exhaustively).
#pragma once
#include "../avx512_gcc12_warnings.h"  // before <immintrin.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "../common.h"

namespace pqk { namespace avx512 { namespace {

inline uint16_t f16_bits(float f) {
  return (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(f), _MM_FROUND_TO_NEAREST_INT), 0);
}
inline void store_f16v(uint8_t* p, float f) { uint16_t h = f16_bits(f); std::memcpy(p, &h, 2); }
inline float load_f16v(const uint8_t* p) {
  uint16_t h; std::memcpy(&h, p, 2);
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}
inline float load_f32(const uint8_t* p) { float f; std::memcpy(&f, p, 4); return f; }

// C roundf (half away from zero) then x86 truncating conversion, = round_away_i32 for every
// float: trunc(v + copysign(0.5 - 2^-25, v)). Inf / NaN / |v| >= 2^31 give 0x80000000.
// (Checked against round_away_i32 over all 2^32 bit patterns.)
inline __m512i round_away_epi32(__m512 v) {
  const __m512i half = _mm512_set1_epi32(0x3effffff);  // 0.49999997f
  const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
  __m512 h = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(half, _mm512_castps_si512(v), sign, 0xf8));
  return _mm512_cvttps_epi32(_mm512_add_ps(v, h));
}

// ggml q4 code: MIN(15, (int8_t)cvtt(v)) clamped at 0 -- on 32 values (a: elements 0..15,
// b: 16..31), returned as bytes lo | hi << 4 (byte j = element j low, j + 16 high).
inline __m128i q4_pack_codes(__m512 va, __m512 vb) {
  __m128i ca = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(va));  // low byte, as the reference
  __m128i cb = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(vb));
  const __m128i zero = _mm_setzero_si128(), fifteen = _mm_set1_epi8(15);
  ca = _mm_min_epi8(_mm_max_epi8(ca, zero), fifteen);
  cb = _mm_min_epi8(_mm_max_epi8(cb, zero), fifteen);
  return _mm_or_si128(ca, _mm_slli_epi16(cb, 4));
}

// Index of the first lane (of 32: a then b) equal to `v`; one must exist.
inline int first_eq(__m512 a, __m512 b, float v) {
  const __m512 vv = _mm512_set1_ps(v);
  uint32_t m = (uint32_t)_mm512_cmp_ps_mask(a, vv, _CMP_EQ_OQ) |
               ((uint32_t)_mm512_cmp_ps_mask(b, vv, _CMP_EQ_OQ) << 16);
  return __builtin_ctz(m);  // m != 0
}

// 32 int32 codes in [0, 15] (a: elements 0..15, b: 16..31) -> 16 bytes, pairs (2i, 2i+1)
// packed as (w0 * code[2i] + w1 * code[2i+1]); weights given as the int16 pattern w0 | w1 << 8.
inline __m128i pack_pairs(__m512i a, __m512i b, short weights) {
  __m256i bytes = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtepi32_epi8(a)),
                                          _mm512_cvtepi32_epi8(b), 1);
  __m256i w = _mm256_maddubs_epi16(bytes, _mm256_set1_epi16(weights));
  return _mm256_cvtepi16_epi8(w);
}
constexpr short kLowFirst = 1 | (16 << 8);   // int4: element 2i low nibble
constexpr short kHighFirst = 16 | (1 << 8);  // nf4: element 2i high nibble

// 16 packed bytes -> 32 nibble indices in element order, as two vectors of 16 int32.
// high_first: element 2i is the high nibble (nf4); else the low nibble (int4).
inline void unpack_nibbles(__m128i b, bool high_first, __m512i* e0, __m512i* e1) {
  const __m128i m = _mm_set1_epi8(0x0f);
  __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  __m128i first = high_first ? hi : lo, second = high_first ? lo : hi;
  *e0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(first, second));
  *e1 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(first, second));
}

}}}  // namespace pqk::avx512::(anonymous)
