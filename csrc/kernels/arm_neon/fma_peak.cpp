// The fp32 FMA instruction ceiling of this variant (KernelTable::fma_peak): fmla on 128-bit
// vectors, 12 independent accumulators, each a <- a * m + c (settles at 0.1: no overflow, no
// subnormals). The dotprod variant inherits it.
#include <arm_neon.h>

#include "../../core/kernel_table.h"

namespace pqk { namespace neon {

uint64_t fma_peak(int64_t iters) {
  // named accumulators, not an array: an array of them may stay on the stack (see int8_peak)
#define PQK_12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define PQK_DECL(j) float32x4_t a##j = vdupq_n_f32(0.01f * (j + 1));
  PQK_12(PQK_DECL)
  float32x4_t m = vdupq_n_f32(0.99999f), c = vdupq_n_f32(1e-6f);
  __asm__("" : "+w"(m), "+w"(c));  // not constants the compiler could fold
  for (int64_t i = 0; i < iters; ++i) {
#define PQK_FMA(j) a##j = vfmaq_f32(c, a##j, m);
    PQK_12(PQK_FMA)
  }
#define PQK_SUM(j) t = vaddq_f32(t, a##j);
  float32x4_t t = vdupq_n_f32(0.0f);
  PQK_12(PQK_SUM)
#undef PQK_SUM
#undef PQK_FMA
#undef PQK_DECL
#undef PQK_12
  return (uint64_t)((double)vaddvq_f32(t) * 1e6);
}

}}  // namespace pqk::neon
