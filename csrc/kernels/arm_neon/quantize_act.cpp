// Activation quantization for the int8 matmul with ARMv8.0 NEON (ref's is a scalar loop run
// for every activation row of every call), bit-identical to ref::quantize_act: per block of 32,
// d = max|x| / 127, codes round(x / d) half to even (vdivq_f32 rounds correctly, vrndnq_f32 ties
// to even, as the scalar division and nearbyint), clamped to +-127, and the code sums of each
// half block. x holds no NaN/Inf (the caller checked).
#include <arm_neon.h>

#include "../../core/kernel_table.h"
#include "../../core/packed.h"

namespace pqk { namespace neon {

void quantize_act(const float* x, int64_t k, int8_t* xq, float* dx, int32_t* xs) {
  const int32x4_t lo = vdupq_n_s32(-127), hi = vdupq_n_s32(127);
  for (int64_t b = 0; b < k / QBLK; ++b) {
    const float* xb = x + b * QBLK;
    float32x4_t v[8];
    float32x4_t am = vdupq_n_f32(0.0f);
    for (int j = 0; j < 8; ++j) {
      v[j] = vld1q_f32(xb + 4 * j);
      am = vmaxq_f32(am, vabsq_f32(v[j]));
    }
    const float d = vmaxvq_f32(am) / 127.0f;
    dx[b] = d;
    // d == 0 (an all-zero block, or max|x| / 127 underflowing): x / 1 rounds every x of the
    // block to 0, ref's codes
    const float32x4_t vd = vdupq_n_f32(d != 0.0f ? d : 1.0f);
    int32x4_t q[8];
    for (int j = 0; j < 8; ++j) q[j] = vmaxq_s32(vminq_s32(vcvtq_s32_f32(vrndnq_f32(vdivq_f32(v[j], vd))), hi), lo);
    xs[2 * b] = vaddvq_s32(vaddq_s32(vaddq_s32(q[0], q[1]), vaddq_s32(q[2], q[3])));
    xs[2 * b + 1] = vaddvq_s32(vaddq_s32(vaddq_s32(q[4], q[5]), vaddq_s32(q[6], q[7])));
    for (int h = 0; h < 2; ++h) {
      const int16x8_t a = vcombine_s16(vmovn_s32(q[4 * h]), vmovn_s32(q[4 * h + 1]));
      const int16x8_t c = vcombine_s16(vmovn_s32(q[4 * h + 2]), vmovn_s32(q[4 * h + 3]));
      vst1q_s8(xq + b * QBLK + 16 * h, vcombine_s8(vmovn_s16(a), vmovn_s16(c)));
    }
  }
}

}}  // namespace pqk::neon
