// fp32 row-dot kernel for compute="float" (AVX2 + FMA): 4 weight rows share each load of x.
#include <immintrin.h>

#include "../../core/kernel_table.h"
#include "../../core/packed.h"

namespace pqk { namespace avx2 {

namespace {
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
}  // namespace

void gemm_f32(const float* w, int nr, int64_t k, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy,
              const float* bias) {
  const int64_t k8 = k & ~(int64_t)7;
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * ldx;
    int r = 0;
    for (; r + 4 <= nr; r += 4) {
      const float* w0 = w + (int64_t)r * k;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t j = 0; j < k8; j += 8) {
        __m256 xv = _mm256_loadu_ps(xi + j);
        a0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w0 + j), a0);
        a1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w0 + k + j), a1);
        a2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w0 + 2 * k + j), a2);
        a3 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w0 + 3 * k + j), a3);
      }
      float s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
      for (int64_t j = k8; j < k; ++j)
        for (int t = 0; t < 4; ++t) s[t] += xi[j] * w0[t * k + j];
      for (int t = 0; t < 4; ++t) y[i * ldy + r + t] = bias ? s[t] + bias[r + t] : s[t];
    }
    for (; r < nr; ++r) {
      const float* wr = w + (int64_t)r * k;
      __m256 a0 = _mm256_setzero_ps();
      for (int64_t j = 0; j < k8; j += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xi + j), _mm256_loadu_ps(wr + j), a0);
      float s = hsum(a0);
      for (int64_t j = k8; j < k; ++j) s += xi[j] * wr[j];
      y[i * ldy + r] = bias ? s + bias[r] : s;
    }
  }
}

void gemm_int8(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
               const float* bias);

void lora_shrink(const pqk_lora& ad, int64_t r0, int64_t r1, int64_t k, const float* x, float* t);
void lora_expand(const LoraArgs& L, int64_t m0, int64_t m1, int64_t n0, int nr, float* y, int64_t ldy);
void quantize_act(const float* x, int64_t k, int8_t* xq, float* dx, int32_t* xs);

void register_matmul_kernels(KernelTable& t) {
  t.gemm_f32 = gemm_f32;
  t.gemm_int8 = gemm_int8;
  t.lora_shrink = lora_shrink;
  t.lora_expand = lora_expand;
  t.quantize_act = quantize_act;
}

}}  // namespace pqk::avx2
