// int8-compute kernels with AVX2 (maddubs + madd): see int8_kernels256.h.
#include "int8_kernels256.h"

namespace pqk { namespace avx2 {

void gemm_int8(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
               const float* bias) {
  gemm_int8_256<false>(w, tile, a, m0, m1, y, ldy, bias);
}

}}  // namespace pqk::avx2
