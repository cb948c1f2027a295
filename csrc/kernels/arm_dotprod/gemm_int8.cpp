// int8-compute tile kernel over packed weights with SDOT (ARMv8.2 dot product).
// The packed quad-major layout (core/packed.h) puts 4 consecutive k of one row in 4 bytes, which
// is exactly one SDOT lane. Codes are unsigned: 8-bit and code-book codes (0..255) are flipped to
// signed (u ^ 0x80 = u - 128) and the product sum is corrected exactly with 128 * sum(xq), which
// is the block's activation sum xs; plain 4-bit codes (0..15) are already valid signed bytes.
// The float epilogue is shared with arm_neon (same op order as ref::gemm_int8).
#include <arm_neon.h>

#include "../../core/kernel_table.h"
#include "../../core/packed.h"
#include "../arm_neon/arm_gemm_common.h"
#include "../common.h"

#if !defined(__ARM_FEATURE_DOTPROD)
#error "arm_dotprod must be compiled with -march=armv8.2-a+dotprod"
#endif

namespace pqk { namespace dotprod {

static inline void block_dots(const PackedWeight& w, const uint8_t* cb, const int8_t* xb, int32_t xs,
                              int32x4_t dot[4]) {
  for (int c = 0; c < 4; ++c) dot[c] = vdupq_n_s32(0);
  const int nq = w.blk / 4;
  const bool flip = !w.nibbles || w.lut;
  const uint8x16_t lut = vld1q_u8(w.lut16);
  for (int j = 0; j < nq; ++j) {
    int32_t x4;
    std::memcpy(&x4, xb + 4 * j, 4);
    const int8x16_t xv = vreinterpretq_s8_s32(vdupq_n_s32(x4));
    for (int c = 0; c < 4; ++c) {
      uint8x16_t u = arm::codes16(w, cb, j, c);
      if (w.lut) u = vqtbl1q_u8(lut, u);
      if (flip) u = veorq_u8(u, vdupq_n_u8(0x80));
      dot[c] = vdotq_s32(dot[c], vreinterpretq_s8_u8(u), xv);
    }
  }
  if (flip) {
    const int32x4_t corr = vdupq_n_s32(128 * xs);
    for (int c = 0; c < 4; ++c) dot[c] = vaddq_s32(dot[c], corr);
  }
}

void gemm_int8(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
               const float* bias) {
  arm::gemm_tile(w, tile, a, m0, m1, y, ldy, bias, block_dots);
}

}}  // namespace pqk::dotprod
