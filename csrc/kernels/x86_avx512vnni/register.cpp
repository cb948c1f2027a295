#include "../../core/kernel_table.h"
#include "../../core/packed.h"

namespace pqk { namespace avx512vnni {

void gemm_int8(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
               const float* bias);

void register_int8_peak(KernelTable& t);  // int8_peak.cpp

void register_kernels(KernelTable& t) {
  t.gemm_int8 = gemm_int8;
  register_int8_peak(t);
}

}}  // namespace pqk::avx512vnni
