// fp32 row kernel for compute="float" with ARMv8.0 NEON (ref's is a scalar loop): the rows of a
// dequantized weight group against each activation row, four weight rows sharing each load of x
// (row_dots.h). The float matmul is specified to fp32 accuracy, not to ref's summation order.
#include "../../core/kernel_table.h"
#include "row_dots.h"

namespace pqk { namespace neon {

void gemm_f32(const float* w, int nr, int64_t k, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy,
              const float* bias) {
  float t[16];
  for (int64_t i = 0; i < m; ++i)
    for (int r0 = 0; r0 < nr; r0 += 16) {
      const int r1 = nr - r0 < 16 ? nr : r0 + 16;
      dots<0>(w, r0, r1, k, x + i * ldx, t);
      for (int r = r0; r < r1; ++r) y[i * ldy + r] = bias ? t[r - r0] + bias[r] : t[r - r0];
    }
}

}}  // namespace pqk::neon
