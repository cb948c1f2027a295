// Row dot products with ARMv8.0 NEON, shared by the adapter shrink (lora.cpp) and the fp32
// row kernel (matmul_f32.cpp): internal linkage only (included by this folder's files).
#pragma once
#include <arm_neon.h>

#include <cstdint>

#include "../common.h"

namespace pqk { namespace neon { namespace {

// 4 elements at p + i, widened to fp32
template <int DT>
inline float32x4_t load4(const void* p, int64_t i) {
  if (DT == 0) return vld1q_f32((const float*)p + i);
  const uint16x4_t h = vld1_u16((const uint16_t*)p + i);
  if (DT == 1) return vcvt_f32_f16(vreinterpret_f16_u16(h));
  return vreinterpretq_f32_u32(vshll_n_u16(h, 16));
}

template <int DT>
inline float elem(const void* p, int64_t i) {
  if (DT == 0) return ((const float*)p)[i];
  const uint16_t h = ((const uint16_t*)p)[i];
  return DT == 1 ? fp16_to_fp32(h) : bf16_to_fp32(h);
}

// dot(x[0:k], W[r + g, 0:k]) for G rows from r (W of type DT, row stride k): two 4-lane FMA
// chains per row over each 8 of x, their sum reduced across lanes, then the last k % 8 in one
// scalar FMA chain; the same operations for a row whatever G, so a row's value does not depend
// on how the rows were split (over threads, or into groups)
template <int DT, int G>
inline void row_dots(const void* W, int64_t r, int64_t k, const float* x, float* t) {
  float32x4_t a[G], b[G];
  for (int g = 0; g < G; ++g) a[g] = b[g] = vdupq_n_f32(0.0f);
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    const float32x4_t x0 = vld1q_f32(x + j), x1 = vld1q_f32(x + j + 4);
    for (int g = 0; g < G; ++g) {
      a[g] = vfmaq_f32(a[g], x0, load4<DT>(W, (r + g) * k + j));
      b[g] = vfmaq_f32(b[g], x1, load4<DT>(W, (r + g) * k + j + 4));
    }
  }
  for (int g = 0; g < G; ++g) {
    float s = vaddvq_f32(vaddq_f32(a[g], b[g]));
    for (int64_t jj = j; jj < k; ++jj) s = __builtin_fmaf(x[jj], elem<DT>(W, (r + g) * k + jj), s);
    t[g] = s;
  }
}

// rows [r0, r1) of W into t[0, r1 - r0): 4 at a time (each load of x serves four rows), then one
template <int DT>
void dots(const void* W, int64_t r0, int64_t r1, int64_t k, const float* x, float* t) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) row_dots<DT, 4>(W, r, k, x, t + (r - r0));
  for (; r < r1; ++r) row_dots<DT, 1>(W, r, k, x, t + (r - r0));
}

}}}  // namespace pqk::neon::(anonymous)
