// fp32 kernels for compute="float": row dots (4 weight rows share each load of x) and, for many
// rows, the panel kernel over transposed activations.
#include "../avx512_gcc12_warnings.h"  // before <immintrin.h>
#include <immintrin.h>

#include "../../core/kernel_table.h"

namespace pqk { namespace avx512 {

namespace {
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
}  // namespace

namespace {
// 4 activation rows x 4 weight rows in 16 accumulators: each load feeds 4 FMAs (GEMM, M >= 4)
void tile4x4(const float* w, int64_t k, const float* x, int64_t ldx, float* y, int64_t ldy, const float* bias) {
  const int64_t k16 = k & ~(int64_t)15;
  const __mmask16 tail = (__mmask16)((1u << (k - k16)) - 1);
  __m512 acc[4][4];
  for (int i = 0; i < 4; ++i)
    for (int r = 0; r < 4; ++r) acc[i][r] = _mm512_setzero_ps();
  auto step = [&](int64_t j, __mmask16 mk) {
    __m512 wv[4], xv[4];
    for (int r = 0; r < 4; ++r) wv[r] = _mm512_maskz_loadu_ps(mk, w + r * k + j);
    for (int i = 0; i < 4; ++i) xv[i] = _mm512_maskz_loadu_ps(mk, x + i * ldx + j);
    for (int i = 0; i < 4; ++i)
      for (int r = 0; r < 4; ++r) acc[i][r] = _mm512_fmadd_ps(xv[i], wv[r], acc[i][r]);
  };
  for (int64_t j = 0; j < k16; j += 16) step(j, 0xFFFF);
  if (tail) step(k16, tail);
  for (int i = 0; i < 4; ++i)
    for (int r = 0; r < 4; ++r) {
      const float s = hsum(acc[i][r]);
      y[i * ldy + r] = bias ? s + bias[r] : s;
    }
}
}  // namespace

void gemm_f32(const float* w, int nr, int64_t k, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy,
              const float* bias) {
  const int64_t k16 = k & ~(int64_t)15;
  const __mmask16 tail = (__mmask16)((1u << (k - k16)) - 1);
  int64_t i0 = 0;
  if (nr >= 4)
    for (; i0 + 4 <= m; i0 += 4) {
      int r = 0;
      for (; r + 4 <= nr; r += 4) tile4x4(w + (int64_t)r * k, k, x + i0 * ldx, ldx, y + i0 * ldy + r, ldy, bias ? bias + r : nullptr);
      if (r < nr) gemm_f32(w + (int64_t)r * k, nr - r, k, x + i0 * ldx, ldx, 4, y + i0 * ldy + r, ldy, bias ? bias + r : nullptr);
    }
  for (int64_t i = i0; i < m; ++i) {
    const float* xi = x + i * ldx;
    int r = 0;
    for (; r + 4 <= nr; r += 4) {
      const float* w0 = w + (int64_t)r * k;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t j = 0; j < k16; j += 16) {
        __m512 xv = _mm512_loadu_ps(xi + j);
        a0 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w0 + j), a0);
        a1 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w0 + k + j), a1);
        a2 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w0 + 2 * k + j), a2);
        a3 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w0 + 3 * k + j), a3);
      }
      if (tail) {
        __m512 xv = _mm512_maskz_loadu_ps(tail, xi + k16);
        a0 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(tail, w0 + k16), a0);
        a1 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(tail, w0 + k + k16), a1);
        a2 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(tail, w0 + 2 * k + k16), a2);
        a3 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(tail, w0 + 3 * k + k16), a3);
      }
      float s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
      for (int t = 0; t < 4; ++t) y[i * ldy + r + t] = bias ? s[t] + bias[r + t] : s[t];
    }
    for (; r < nr; ++r) {
      const float* wr = w + (int64_t)r * k;
      __m512 a0 = _mm512_setzero_ps();
      for (int64_t j = 0; j < k16; j += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xi + j), _mm512_loadu_ps(wr + j), a0);
      if (tail) a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, xi + k16), _mm512_maskz_loadu_ps(tail, wr + k16), a0);
      float s = hsum(a0);
      y[i * ldy + r] = bias ? s + bias[r] : s;
    }
  }
}

namespace {
// R weight rows x 32 activation rows: per k, two vectors of the panel and R broadcast weights feed
// 2R fused-multiply-adds (acc[r][h] lane l = y[16h + l][r]). Each element sums its products in
// k order in blocks of XT_KB, the block sums added in order: one chain of k products would carry
// ~K/16 times the rounding error of the row-dot kernel's 16-lane partial sums.
constexpr int64_t XT_KB = 256;

template <int R>
void panel(const float* w, int64_t k, const float* xt, int mb, float* y, int64_t ldy, const float* bias) {
  alignas(64) float out[R][XT_MB];
  for (int64_t j0 = 0; j0 < k; j0 += XT_KB) {
    const int64_t j1 = j0 + XT_KB < k ? j0 + XT_KB : k;
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t j = j0; j < j1; ++j) {
      const __m512 x0 = _mm512_load_ps(xt + j * XT_MB), x1 = _mm512_load_ps(xt + j * XT_MB + 16);
      for (int r = 0; r < R; ++r) {
        const __m512 wv = _mm512_set1_ps(w[r * k + j]);
        acc[r][0] = _mm512_fmadd_ps(x0, wv, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(x1, wv, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < 2; ++h)
        _mm512_store_ps(out[r] + 16 * h, j0 ? _mm512_add_ps(_mm512_load_ps(out[r] + 16 * h), acc[r][h]) : acc[r][h]);
  }
  for (int i = 0; i < mb; ++i)
    for (int r = 0; r < R; ++r) y[i * ldy + r] = bias ? out[r][i] + bias[r] : out[r][i];
}
}  // namespace

void gemm_f32_xt(const float* w, int nr, int64_t k, const float* xt, int mb, float* y, int64_t ldy,
                 const float* bias) {
  switch (nr) {
    case 8: return panel<8>(w, k, xt, mb, y, ldy, bias);
    case 7: return panel<7>(w, k, xt, mb, y, ldy, bias);
    case 6: return panel<6>(w, k, xt, mb, y, ldy, bias);
    case 5: return panel<5>(w, k, xt, mb, y, ldy, bias);
    case 4: return panel<4>(w, k, xt, mb, y, ldy, bias);
    case 3: return panel<3>(w, k, xt, mb, y, ldy, bias);
    case 2: return panel<2>(w, k, xt, mb, y, ldy, bias);
    default: return panel<1>(w, k, xt, mb, y, ldy, bias);
  }
}

void quantize_act(const float* x, int64_t k, int8_t* xq, float* dx, int32_t* xs);

void lora_expand(const LoraArgs& L, int64_t m0, int64_t m1, int64_t n0, int nr, float* y, int64_t ldy);
void lora_shrink(const pqk_lora& ad, int64_t r0, int64_t r1, int64_t k, const float* x, float* t);

bool all_finite(const float* x, int64_t k, uint32_t e);

void register_matmul_kernels(KernelTable& t) {
  t.all_finite = all_finite;
  t.gemm_f32 = gemm_f32;
  t.gemm_f32_xt = gemm_f32_xt;
  t.lora_expand = lora_expand;
  t.lora_shrink = lora_shrink;
  t.quantize_act = quantize_act;
}

}}  // namespace pqk::avx512
