// q8_0 and q4_0 quantize/dequantize with ARMv8.0 NEON, bit-identical to ref/ggml_block32.cpp.
//
// Exactness notes:
//  - every float op is the same single IEEE op as in ref (mul, then add; built with
//    -ffp-contract=off, so vmulq + vaddq are never fused);
//  - ref converts with x86 cvttss2si semantics (NaN / out of range -> INT32_MIN, low byte 0);
//    NEON's FCVTZS saturates instead (and gives 0 for NaN), so lanes outside
//    (-2147483904, 2147483648) or NaN are forced to INT32_MIN explicitly;
//  - q8_0 rounds with C roundf (half away from zero) = FRINTA (vrndaq_f32);
//  - q4_0's max is the FIRST element of largest magnitude, and +0.0 when all are zero.
#include <arm_neon.h>

#include "../common.h"

namespace pqk { namespace neon {

// x86 cvtt semantics on 4 lanes: truncate; NaN or |v| out of int32 range -> INT32_MIN.
static inline int32x4_t cvtt_x86(float32x4_t v) {
  const uint32x4_t in_range = vandq_u32(vcgtq_f32(v, vdupq_n_f32(-2147483904.0f)),
                                        vcltq_f32(v, vdupq_n_f32(2147483648.0f)));  // false for NaN
  return vbslq_s32(in_range, vcvtq_s32_f32(v), vdupq_n_s32(INT32_MIN));
}

static inline float amax32(const float* x) {
  float32x4_t m = vabsq_f32(vld1q_f32(x));
  for (int j = 4; j < 32; j += 4) m = vmaxq_f32(m, vabsq_f32(vld1q_f32(x + j)));
  return vmaxvq_f32(m);  // inputs are finite (checked by the C ABI)
}

void quantize_row_q8_0(const float* x, int64_t k, uint8_t* q, uint8_t*, uint8_t*, const pqk_qparams&) {
  for (int64_t b = 0; b < k / 32; ++b, x += 32, q += Q8_0_BYTES) {
    const float amax = amax32(x);
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_f16(q, d);
    const float32x4_t vid = vdupq_n_f32(id);
    for (int j = 0; j < 32; j += 16) {
      int32x4_t c[4];
      for (int u = 0; u < 4; ++u) {
        const float32x4_t v = vmulq_f32(vld1q_f32(x + j + 4 * u), vid);
        // roundf then cvtt: the range test is on v (as ref), FRINTA keeps out-of-range out of range
        const uint32x4_t in_range = vandq_u32(vcgtq_f32(v, vdupq_n_f32(-2147483904.0f)),
                                              vcltq_f32(v, vdupq_n_f32(2147483648.0f)));
        c[u] = vbslq_s32(in_range, vcvtq_s32_f32(vrndaq_f32(v)), vdupq_n_s32(INT32_MIN));
      }
      // low byte of each int32 (truncating narrow, no saturation)
      const int16x8_t h0 = vcombine_s16(vmovn_s32(c[0]), vmovn_s32(c[1]));
      const int16x8_t h1 = vcombine_s16(vmovn_s32(c[2]), vmovn_s32(c[3]));
      vst1q_u8(q + 2 + j, vreinterpretq_u8_s8(vcombine_s8(vmovn_s16(h0), vmovn_s16(h1))));
    }
  }
}

void dequantize_row_q8_0(const uint8_t* q, const uint8_t*, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  for (int64_t b = 0; b < k / 32; ++b, q += Q8_0_BYTES, y += 32) {
    const float32x4_t d = vdupq_n_f32(load_f16(q));
    for (int j = 0; j < 32; j += 16) {
      const int8x16_t c = vld1q_s8((const int8_t*)q + 2 + j);
      const int16x8_t lo = vmovl_s8(vget_low_s8(c)), hi = vmovl_s8(vget_high_s8(c));
      vst1q_f32(y + j, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), d));
      vst1q_f32(y + j + 4, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo))), d));
      vst1q_f32(y + j + 8, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), d));
      vst1q_f32(y + j + 12, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi))), d));
    }
  }
}

// 16 codes from 16 floats: low byte of cvtt(x * id + 8.5) as int8, clamped to [0, 15].
static inline uint8x16_t q4_codes16(const float* x, float32x4_t vid) {
  const float32x4_t h = vdupq_n_f32(8.5f);
  int32x4_t c[4];
  for (int u = 0; u < 4; ++u) c[u] = cvtt_x86(vaddq_f32(vmulq_f32(vld1q_f32(x + 4 * u), vid), h));
  const int16x8_t h0 = vcombine_s16(vmovn_s32(c[0]), vmovn_s32(c[1]));
  const int16x8_t h1 = vcombine_s16(vmovn_s32(c[2]), vmovn_s32(c[3]));
  int8x16_t b = vcombine_s8(vmovn_s16(h0), vmovn_s16(h1));
  b = vminq_s8(vmaxq_s8(b, vdupq_n_s8(0)), vdupq_n_s8(15));
  return vreinterpretq_u8_s8(b);
}

void quantize_row_q4_0(const float* x, int64_t k, uint8_t* q, uint8_t*, uint8_t*, const pqk_qparams&) {
  for (int64_t b = 0; b < k / 32; ++b, x += 32, q += Q4_0_BYTES) {
    const float amax = amax32(x);
    float max = 0.0f;
    if (amax > 0.0f) {
      int j = 0;
      while (std::fabs(x[j]) != amax) ++j;  // first element of largest magnitude
      max = x[j];
    }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_f16(q, d);
    const float32x4_t vid = vdupq_n_f32(id);
    const uint8x16_t lo = q4_codes16(x, vid), hi = q4_codes16(x + 16, vid);
    vst1q_u8(q + 2, vorrq_u8(lo, vshlq_n_u8(hi, 4)));
  }
}

void dequantize_row_q4_0(const uint8_t* q, const uint8_t*, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  for (int64_t b = 0; b < k / 32; ++b, q += Q4_0_BYTES, y += 32) {
    const float32x4_t d = vdupq_n_f32(load_f16(q));
    const uint8x16_t v = vld1q_u8(q + 2);
    const int8x16_t e8 = vdupq_n_s8(8);
    const int8x16_t halves[2] = {vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0xf))), e8),
                                 vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), e8)};
    for (int h = 0; h < 2; ++h) {
      const int16x8_t lo = vmovl_s8(vget_low_s8(halves[h])), hi = vmovl_s8(vget_high_s8(halves[h]));
      float* o = y + 16 * h;
      vst1q_f32(o, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), d));
      vst1q_f32(o + 4, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo))), d));
      vst1q_f32(o + 8, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), d));
      vst1q_f32(o + 12, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi))), d));
    }
  }
}

}}  // namespace pqk::neon
