// Scalar helpers and format constants shared by every kernel folder.
//
// Everything here has internal linkage (static / constexpr) on purpose: this header is
// compiled into TUs with different -m flags, and an `inline` function with external linkage
// would let the linker keep an AVX-512 copy for a baseline caller (an ODR trap that turns
// into SIGILL on older CPUs).
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>

#include "pyqkern/pyqkern.h"

namespace pqk {

// ggml block sizes
constexpr int QK4_0 = 32, QK8_0 = 32, QK_K = 256;
constexpr int Q4_0_BYTES = 18, Q4_1_BYTES = 20, Q8_0_BYTES = 34, IQ4NL_BYTES = 18;
constexpr int Q4_K_BYTES = 144, Q6_K_BYTES = 210;

// bitsandbytes NF4 code book (index order = value order).
static constexpr float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// bitsandbytes FP4 code book in bit-pattern order (not sorted): bit 3 is the sign; the
// magnitudes of bits 0..2 are {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12 (fp32, correctly rounded;
// bitsandbytes' get_4bit_type("fp4") divides the raw table by its max, 12, in fp32).
static constexpr float kFP4[16] = {
    0.0f,  0.0625f / 12.0f,  8.0f / 12.0f,  1.0f,  4.0f / 12.0f,  6.0f / 12.0f,  2.0f / 12.0f,  3.0f / 12.0f,
    -0.0f, -0.0625f / 12.0f, -8.0f / 12.0f, -1.0f, -4.0f / 12.0f, -6.0f / 12.0f, -2.0f / 12.0f, -3.0f / 12.0f};
// the eight magnitudes in ascending order and their codes
static constexpr float kFP4Mag[8] = {0.0f, 0.0625f / 12.0f, 2.0f / 12.0f, 3.0f / 12.0f,
                                     4.0f / 12.0f, 6.0f / 12.0f, 8.0f / 12.0f, 1.0f};
static constexpr uint8_t kFP4MagCode[8] = {0, 1, 6, 7, 4, 5, 2, 3};
// lower bound of absmax in the bitsandbytes 4-bit quantizers' reciprocal (fp32 1e-38): x is
// coded as x * (1 / max(absmax, 1e-38)), the product bitsandbytes forms (not x / absmax: a value
// near a code midpoint can round to the other side, and a block of subnormals codes as ~0)
static constexpr float kBnbMinAbsmax = 1e-38f;
static inline float bnb_recip(float amax) { return 1.0f / (amax > kBnbMinAbsmax ? amax : kBnbMinAbsmax); }

// ggml kvalues_iq4nl
static constexpr int8_t kIQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                      1,    13,   25,  38,  53,  69,  89,  113};

static inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// IEEE binary16 -> binary32 (exact).
static inline float fp16_to_fp32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0) {
    if (man == 0) return bits_f32(sign);
    // subnormal: man * 2^-24, exact in fp32
    float v = (float)man * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (man << 13));
  return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

// IEEE binary32 -> binary16, round to nearest even, overflow to inf (what numpy's
// astype(float16) and F16C's _mm_cvtps_ph(x, 0) do).
static inline uint16_t fp32_to_fp16(float f) {
  uint32_t x = f32_bits(f);
  uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
  uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (a > 0x7f800000u ? 0x200 : 0));
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                                   // result is subnormal or zero
    uint32_t e = a >> 23;
    if (e < 102) return sign;
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14..24
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) q++;
    return (uint16_t)(sign | q);
  }
  uint32_t r = a - 0x38000000u;  // rebias 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return (uint16_t)(sign | (r >> 13));
}

// bf16 -> fp32 (exact)
static inline float bf16_to_fp32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

// float -> int32 with x86 cvttss2si semantics: truncation, and INT32_MIN ("integer
// indefinite") for NaN and out-of-range. ggml's C reference and gguf's numpy reference
// both behave this way on x86 when 1/d overflows for blocks of tiny values; the low byte
// of INT32_MIN is 0, which is what they store. Every variant reproduces this.
static inline int32_t cvtt_i32(float v) {
  if (!(v > -2147483904.0f && v < 2147483648.0f)) return INT32_MIN;
  return (int32_t)v;
}

// C roundf (half away from zero), then cvtt_i32.
static inline int32_t round_away_i32(float v) {
  if (!(v > -2147483904.0f && v < 2147483648.0f)) return INT32_MIN;
  float t = std::trunc(v);
  float d = v - t;  // exact
  if (d >= 0.5f) t += 1.0f;
  else if (d <= -0.5f) t -= 1.0f;
  return cvtt_i32(t);
}

// round half to even (the default FP rounding mode; we never change it), then cvtt_i32.
static inline int32_t round_even_i32(float v) { return cvtt_i32(std::nearbyint(v)); }

// ggml nearest_int: round-half-even via the 1.5*2^23 trick (valid for |v| <= 4194303).
static inline int nearest_int(float fval) {
  float val = fval + 12582912.f;
  int i; std::memcpy(&i, &val, sizeof(int));
  return (i & 0x007fffff) - 0x00400000;
}

static inline void store_f16(uint8_t* p, float v) { uint16_t h = fp32_to_fp16(v); std::memcpy(p, &h, 2); }
static inline float load_f16(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return fp16_to_fp32(h); }

// 6-bit scale j (0..7) and min of a q4_k block's 12-byte scales field.
static inline void q4k_scale_min(const uint8_t* sc, int j, int* s, int* m) {
  if (j < 4) {
    *s = sc[j] & 63;
    *m = sc[j + 4] & 63;
  } else {
    *s = (sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4);
    *m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
  }
}

// NF4: index of the nearest code to v in [-1, 1]; an exact midpoint goes to the lower code
// (bitsandbytes' argmin over |v - code| keeps the first minimum).
static inline uint8_t nf4_index(float v) {
  // midpoints computed in fp32 from the table above
  uint8_t lo = 0;
  for (int i = 0; i < 15; ++i) {
    float mid = (kNF4[i] + kNF4[i + 1]) * 0.5f;
    lo += (v > mid);
  }
  return lo;
}

// FP4: code of v = x * (1 / absmax). Sign bit 8 if v < 0 (so +0 and tiny positives keep code 0);
// the magnitude is the nearest of kFP4Mag by fp32 midpoints, an exact midpoint going to the
// smaller magnitude (the comparisons are strict, as in bitsandbytes' quantizers).
static inline uint8_t fp4_index(float v) {
  const float a = std::fabs(v);
  int r = 0;
  for (int i = 0; i < 7; ++i) {
    float mid = (kFP4Mag[i] + kFP4Mag[i + 1]) * 0.5f;
    r += (a > mid);
  }
  return (uint8_t)((v < 0.0f ? 8 : 0) | kFP4MagCode[r]);
}

}  // namespace pqk
