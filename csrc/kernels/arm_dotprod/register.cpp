// NEON + dot product variant (aarch64 only; -march=armv8.2-a+dotprod, run only when the
// kernel reports HWCAP_ASIMDDP): the int8 tile kernel with SDOT.
#include "../../core/kernel_table.h"
#include "../../core/packed.h"

namespace pqk { namespace dotprod {

void gemm_int8(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
               const float* bias);

void register_kernels(KernelTable& t) { t.gemm_int8 = gemm_int8; }

}}  // namespace pqk::dotprod
