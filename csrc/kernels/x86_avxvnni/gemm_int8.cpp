// int8-compute kernels with AVX-VNNI (VEX-encoded vpdpbusd on 256-bit vectors: Intel Alder Lake
// and later client cores, which have no AVX-512): the AVX2 kernels with each maddubs + madd
// replaced by one dot product (see x86_avx2/int8_kernels256.h). Everything else this variant
// runs is the avx2 variant's.
#include "../x86_avx2/int8_kernels256.h"

namespace pqk { namespace avxvnni {

namespace {
struct VnniDot {
  static constexpr bool kVnni = true;
  static __m256i dot(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
};
}  // namespace

void gemm_int8(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
               const float* bias) {
  gemm_int8_256<VnniDot>(w, tile, a, m0, m1, y, ldy, bias);
}

void register_int8_peak(KernelTable& t);  // int8_peak.cpp

void register_kernels(KernelTable& t) {
  t.gemm_int8 = gemm_int8;
  register_int8_peak(t);
}

}}  // namespace pqk::avxvnni
