// int8-compute kernels with AVX2 (maddubs + madd): see int8_kernels256.h.
#include "int8_kernels256.h"

namespace pqk { namespace avx2 {

namespace {
struct MaddubsDot {  // the VNNI branches are never instantiated here; dot is their exact equivalent
  static constexpr bool kVnni = false;
  static __m256i dot(__m256i acc, __m256i u, __m256i s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
  }
};
}  // namespace

void gemm_int8(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
               const float* bias) {
  gemm_int8_256<MaddubsDot>(w, tile, a, m0, m1, y, ldy, bias);
}

}}  // namespace pqk::avx2
