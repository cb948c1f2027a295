// fp32 kernels for compute="float" (AVX2 + FMA): row dots (4 weight rows share each load of x)
// and, for many rows, the panel kernel over transposed activations.
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
bool gemv_f32p(const PackedWeight& w, int64_t tile, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy,
               const float* bias);  // gemv_f32_packed.cpp

namespace {
// The AVX-512 panel kernel's arithmetic (x86_avx512/matmul_f32.cpp) on 16 registers: R <= 6 weight
// rows x 16 activation rows (one half of a 32-row panel) in 2R accumulators; sums in k blocks of
// XT_KB, block sums added in order.
constexpr int64_t XT_KB = 256;

template <int R>
void panel_half(const float* w, int64_t k, const float* xt, int rows, float* y, int64_t ldy, const float* bias) {
  alignas(32) float out[R][16];
  for (int64_t j0 = 0; j0 < k; j0 += XT_KB) {
    const int64_t j1 = j0 + XT_KB < k ? j0 + XT_KB : k;
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t j = j0; j < j1; ++j) {
      const __m256 x0 = _mm256_load_ps(xt + j * XT_MB), x1 = _mm256_load_ps(xt + j * XT_MB + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 wv = _mm256_broadcast_ss(w + r * k + j);
        acc[r][0] = _mm256_fmadd_ps(x0, wv, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(x1, wv, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < 2; ++h)
        _mm256_store_ps(out[r] + 8 * h, j0 ? _mm256_add_ps(_mm256_load_ps(out[r] + 8 * h), acc[r][h]) : acc[r][h]);
  }
  for (int i = 0; i < rows; ++i)
    for (int r = 0; r < R; ++r) y[i * ldy + r] = bias ? out[r][i] + bias[r] : out[r][i];
}

void panel_rows(const float* w, int nr, int64_t k, const float* xt, int rows, float* y, int64_t ldy,
                const float* bias) {
  switch (nr) {
    case 6: return panel_half<6>(w, k, xt, rows, y, ldy, bias);
    case 5: return panel_half<5>(w, k, xt, rows, y, ldy, bias);
    case 4: return panel_half<4>(w, k, xt, rows, y, ldy, bias);
    case 3: return panel_half<3>(w, k, xt, rows, y, ldy, bias);
    case 2: return panel_half<2>(w, k, xt, rows, y, ldy, bias);
    default: return panel_half<1>(w, k, xt, rows, y, ldy, bias);
  }
}
}  // namespace

void gemm_f32_xt(const float* w, int nr, int64_t k, const float* xt, int mb, float* y, int64_t ldy,
                 const float* bias) {
  for (int h = 0; h < 2 && 16 * h < mb; ++h) {
    const int rows = mb - 16 * h < 16 ? mb - 16 * h : 16;
    for (int r = 0; r < nr; r += 6) {
      const int rr = nr - r < 6 ? nr - r : 6;
      panel_rows(w + (int64_t)r * k, rr, k, xt + 16 * h, rows, y + 16 * h * ldy + r, ldy, bias ? bias + r : nullptr);
    }
  }
}

bool all_finite(const float* x, int64_t k, uint32_t e);

void register_matmul_kernels(KernelTable& t) {
  t.all_finite = all_finite;
  t.gemm_f32 = gemm_f32;
  t.gemm_f32_xt = gemm_f32_xt;
  t.gemm_int8 = gemm_int8;
  t.gemm_int8_xp = true;  // the maddubs nibble kernel (int8_kernels256.h, tile_rows_nib)
  // tile_rows_su from 32 rows: it unpacks each tile's codes first, a cost the groups of 4 rows
  // share. Against tile_rows_nib (4096x4096, 1 thread, alternate calls, median time ratio): M 16
  // q4_0 / int4-g128 1.06 / 1.05, M 32 0.97 / 0.94, M 64 0.96 / 0.91, M 128 0.91 / 0.92
  t.gemm_int8_xu_rows = 32;
  t.lora_shrink = lora_shrink;
  t.lora_expand = lora_expand;
  t.quantize_act = quantize_act;
  t.gemv_f32p = gemv_f32p;
}

}}  // namespace pqk::avx2
