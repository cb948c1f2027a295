// Adapter epilogue (AVX-512): 16 output columns per vector, the same per-lane operations and
// order as ref::lora_expand (mul then add, rank summed in order), so results are identical.
#include <immintrin.h>

#include "../../core/kernel_table.h"

namespace pqk { namespace avx512 {

void lora_expand(const LoraArgs& L, int64_t m0, int64_t m1, int64_t n0, int nr, float* y, int64_t ldy) {
  for (int64_t i = m0; i < m1; ++i) {
    const float* ti = L.t + i * L.t_cols;
    int a0 = 0, a1 = L.n_ad;
    if (L.row_adapter) { a0 = L.row_adapter[i]; a1 = a0 + 1; }
    if (a0 < 0) a0 = a1;
    for (int c0 = 0; c0 < nr; ) {
      const int cn = nr - c0 < 16 - (int)((n0 + c0) % 16) ? nr - c0 : 16 - (int)((n0 + c0) % 16);
      const __mmask16 mk = (__mmask16)((1u << cn) - 1);
      const int64_t n = n0 + c0;
      float* yp = y + i * ldy + n;
      __m512 v = _mm512_maskz_loadu_ps(mk, yp);
      for (int a = a0; a < a1; ++a) {
        const pqk_lora& ad = L.ad[a];
        const float* ta = ti + (L.row_adapter ? 0 : L.t_off[a]);
        const float* bt = ad.Bp + (n / 16) * ad.rank * 16 + n % 16;  // one contiguous [rank][16] block
        __m512 acc = _mm512_setzero_ps();
        for (int r = 0; r < ad.rank; ++r)
          acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(ta[r]), _mm512_maskz_loadu_ps(mk, bt + r * 16)));
        v = _mm512_add_ps(v, _mm512_mul_ps(_mm512_set1_ps(ad.scale), acc));
        if (ad.row_scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mk, ad.row_scale + n));
      }
      if (L.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, L.bias + n));
      _mm512_mask_storeu_ps(yp, mk, v);
      c0 += cn;
    }
  }
}

}}  // namespace pqk::avx512
