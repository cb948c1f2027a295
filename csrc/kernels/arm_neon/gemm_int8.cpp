// int8-compute tile kernel over packed weights (core/packed.h) with ARMv8.0 NEON.
// Integer part: u8 codes x s8 activations widened to s16 (|u * x| <= 255 * 127 fits), pairwise
// accumulated to s32 per block (exact). Float part: the same ops in the same order as
// ref::gemm_int8, 4 rows per register, separate mul and add.
#include <arm_neon.h>

#include "../../core/kernel_table.h"
#include "../../core/packed.h"
#include "../common.h"
#include "arm_gemm_common.h"

namespace pqk { namespace neon {

// dot[r] for the 16 rows of one weight block: codes in quad-major order (64 bytes per quad).
static inline void block_dots(const PackedWeight& w, const uint8_t* cb, const int8_t* xb, int32_t /*xs*/,
                              int32x4_t dot[4]) {
  int32x4_t acc[8];
  for (int c = 0; c < 8; ++c) acc[c] = vdupq_n_s32(0);
  const int nq = w.blk / 4;
  const uint8x16_t lut = vld1q_u8(w.lut16);
  for (int j = 0; j < nq; ++j) {
    int32_t x4;
    std::memcpy(&x4, xb + 4 * j, 4);
    const int8x16_t xv = vreinterpretq_s8_s32(vdupq_n_s32(x4));
    const int16x8_t xlo = vmovl_s8(vget_low_s8(xv)), xhi = vmovl_s8(vget_high_s8(xv));
    for (int c = 0; c < 4; ++c) {  // 16 bytes = rows 4c..4c+3, 4 k each
      uint8x16_t u = arm::codes16(w, cb, j, c);
      if (w.lut) u = vqtbl1q_u8(lut, u);
      const int16x8_t ulo = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(u)));
      const int16x8_t uhi = vreinterpretq_s16_u16(vmovl_u8(vget_high_u8(u)));
      acc[2 * c] = vpadalq_s16(acc[2 * c], vmulq_s16(ulo, xlo));
      acc[2 * c + 1] = vpadalq_s16(acc[2 * c + 1], vmulq_s16(uhi, xhi));
    }
  }
  // acc[2c] = [r0 k01, r0 k23, r1 k01, r1 k23] -> pairwise: [r0, r1, r2, r3]
  for (int c = 0; c < 4; ++c) dot[c] = vpaddq_s32(acc[2 * c], acc[2 * c + 1]);
}

void gemm_int8(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
               const float* bias) {
  arm::gemm_tile(w, tile, a, m0, m1, y, ldy, bias, block_dots);
}

}}  // namespace pqk::neon
