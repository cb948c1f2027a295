// Shared by the Arm int8 tile kernels (arm_neon, arm_dotprod): the per-block float epilogue of
// core/packed.h, in exactly ref::gemm_int8's order, 4 rows per register. Only the block dot
// product differs between the folders. Everything has internal linkage (anonymous namespace):
// this header is compiled with different -march flags in each folder.
#pragma once
#include <arm_neon.h>

#include <cstring>

#include "../../core/packed.h"
#include "../common.h"

namespace pqk { namespace arm { namespace {

// 16 code bytes of quad j (k = 4j..4j+3) for rows 4c..4c+3 (byte 4r' + i), as u8.
// four uint8 zero points widened to int32 lanes
inline int32x4_t offs4(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(v))))));
}

// four int8 block multipliers (two-level parameters) as fp32 lanes
inline float32x4_t sq4(const int8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_u32(vdup_n_u32(v))))));
}

inline uint8x16_t codes16(const PackedWeight& w, const uint8_t* cb, int j, int c) {
  if (!w.nibbles) return vld1q_u8(cb + j * 64 + c * 16);
  const uint8x16_t v = vld1q_u8(cb + (j & 3) * 64 + c * 16);
  return j < 4 ? vandq_u8(v, vdupq_n_u8(0xF)) : vshrq_n_u8(v, 4);
}

template <class BlockDots>
inline void gemm_tile(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y,
                      int64_t ldy, const float* bias, BlockDots block_dots) {
  const int64_t n0 = tile * NR;
  const int nr = (int)(w.n - n0 < NR ? w.n - n0 : NR);
  const uint8_t* ct = w.codes + tile * w.tile_code_bytes;
  const int per = QBLK / w.blk;
  for (int64_t i = m0; i < m1; ++i) {
    const int8_t* xq = a.row_q(i);
    const float* dxr = a.row_d(i);
    const int32_t* xs16 = a.row_s(i);
    float32x4_t acc[4];
    for (int g = 0; g < 4; ++g) acc[g] = vdupq_n_f32(0.0f);
    for (int64_t kb = 0; kb < w.k / QBLK; ++kb) {
      const float dx = dxr[kb];
      for (int sub = 0; sub < per; ++sub) {
        const int64_t b = kb * per + sub;
        const int32_t xs = w.blk == 32 ? xs16[2 * kb] + xs16[2 * kb + 1] : xs16[b];
        const uint8_t* cb = ct + b * w.block_code_bytes();
        const int8_t* xb = xq + b * w.blk;
        const int64_t pi = w.par_index(tile, b);
        int32x4_t dot[4];
        block_dots(w, cb, xb, xs, dot);
        const float32x4_t vdx = vdupq_n_f32(dx);
        const float mx = dx * (float)xs;
        for (int g = 0; g < 4; ++g) {
          const int32x4_t o = w.offs ? offs4(w.offs + pi + 4 * g) : vdupq_n_s32(w.o_const);
          const int32x4_t isum = vsubq_s32(dot[g], vmulq_s32(o, vdupq_n_s32(xs)));
          float32x4_t ar;
          if (w.sq) {  // two-level (q4_k, q6_k): d * q, exact (packed.h)
            ar = vmulq_f32(vld1q_f32(w.sd + w.sup_index(pi + 4 * g)), sq4(w.sq + pi + 4 * g));
          } else if (w.scale16) {
            float t4[4];
            for (int r = 0; r < 4; ++r) t4[r] = fp16_to_fp32(w.scale16[pi + 4 * g + r]);
            ar = vld1q_f32(t4);
          } else {
            ar = vld1q_f32(w.scale + pi + 4 * g);
          }
          const float32x4_t da = vmulq_f32(ar, vdx);
          const float32x4_t t = vmulq_f32(vcvtq_f32_s32(isum), da);
          acc[g] = vaddq_f32(acc[g], t);
          if (w.has_min) {
            float32x4_t mr;
            if (w.mq) {
              mr = vmulq_f32(vld1q_f32(w.md + w.sup_index(pi + 4 * g)), sq4(w.mq + pi + 4 * g));
            } else if (w.min16) {
              float t4[4];
              for (int r = 0; r < 4; ++r) t4[r] = fp16_to_fp32(w.min16[pi + 4 * g + r]);
              mr = vld1q_f32(t4);
            } else {
              mr = vld1q_f32(w.minv + pi + 4 * g);
            }
            acc[g] = vaddq_f32(acc[g], vmulq_f32(mr, vdupq_n_f32(mx)));
          }
        }
      }
    }
    float out[NR];
    for (int g = 0; g < 4; ++g) vst1q_f32(out + 4 * g, acc[g]);
    for (int r = 0; r < nr; ++r) y[i * ldy + n0 + r] = bias ? out[r] + bias[n0 + r] : out[r];
  }
}

}}}  // namespace pqk::arm::(anonymous)
