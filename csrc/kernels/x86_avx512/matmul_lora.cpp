// Adapter kernels (AVX-512). Expansion: 16 output columns per vector, the same per-lane
// operations and order as ref::lora_expand (rank r into FMA chain r % 4, chains added as
// (c0 + c1) + (c2 + c3), then scale, DoRA factor and bias), so results are identical. Shrink: fp32 dot products (4 adapter rows share each load of x), FMA, any order.
// A and B may be fp32, fp16 (vcvtph2ps) or bf16 (shift into the high half): widened exactly.
#include <immintrin.h>

#include "../../core/kernel_table.h"

namespace pqk { namespace avx512 {

namespace {

// 16 elements at p + i (masked), widened to fp32
inline __m512 load16(const void* p, int dtype, int64_t i, __mmask16 mk) {
  if (dtype == 0) return _mm512_maskz_loadu_ps(mk, (const float*)p + i);
  const __m256i h = _mm256_maskz_loadu_epi16(mk, (const uint16_t*)p + i);
  if (dtype == 1) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int DT>
inline __m512 load16t(const void* p, int64_t i, __mmask16 mk) {
  if (DT == 0) return _mm512_maskz_loadu_ps(mk, (const float*)p + i);
  const __m256i h = _mm256_maskz_loadu_epi16(mk, (const uint16_t*)p + i);
  if (DT == 1) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// sum_r ta[r] * Bp[b0 + 16 r + lane]: rank r into FMA chain r % 4, then (c0 + c1) + (c2 + c3)
template <int DT>
inline __m512 rank_sum(const float* ta, const void* Bp, int64_t b0, int rank, __mmask16 mk) {
  __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
  int r = 0;
  for (; r + 4 <= rank; r += 4) {
    c0 = _mm512_fmadd_ps(_mm512_set1_ps(ta[r]), load16t<DT>(Bp, b0 + r * 16, mk), c0);
    c1 = _mm512_fmadd_ps(_mm512_set1_ps(ta[r + 1]), load16t<DT>(Bp, b0 + (r + 1) * 16, mk), c1);
    c2 = _mm512_fmadd_ps(_mm512_set1_ps(ta[r + 2]), load16t<DT>(Bp, b0 + (r + 2) * 16, mk), c2);
    c3 = _mm512_fmadd_ps(_mm512_set1_ps(ta[r + 3]), load16t<DT>(Bp, b0 + (r + 3) * 16, mk), c3);
  }
  if (r < rank) c0 = _mm512_fmadd_ps(_mm512_set1_ps(ta[r]), load16t<DT>(Bp, b0 + r * 16, mk), c0);
  if (r + 1 < rank) c1 = _mm512_fmadd_ps(_mm512_set1_ps(ta[r + 1]), load16t<DT>(Bp, b0 + (r + 1) * 16, mk), c1);
  if (r + 2 < rank) c2 = _mm512_fmadd_ps(_mm512_set1_ps(ta[r + 2]), load16t<DT>(Bp, b0 + (r + 2) * 16, mk), c2);
  return _mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3));
}

}  // namespace

void lora_shrink(const pqk_lora& ad, int64_t r0, int64_t r1, int64_t k, const float* x, float* t) {
  const int64_t k16 = k & ~(int64_t)15;
  const __mmask16 tail = (__mmask16)((1u << (k - k16)) - 1);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < k16; j += 16) {
      const __m512 xv = _mm512_loadu_ps(x + j);
      a0 = _mm512_fmadd_ps(xv, load16(ad.A, ad.dtype, r * k + j, 0xFFFF), a0);
      a1 = _mm512_fmadd_ps(xv, load16(ad.A, ad.dtype, (r + 1) * k + j, 0xFFFF), a1);
      a2 = _mm512_fmadd_ps(xv, load16(ad.A, ad.dtype, (r + 2) * k + j, 0xFFFF), a2);
      a3 = _mm512_fmadd_ps(xv, load16(ad.A, ad.dtype, (r + 3) * k + j, 0xFFFF), a3);
    }
    if (tail) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + k16);
      a0 = _mm512_fmadd_ps(xv, load16(ad.A, ad.dtype, r * k + k16, tail), a0);
      a1 = _mm512_fmadd_ps(xv, load16(ad.A, ad.dtype, (r + 1) * k + k16, tail), a1);
      a2 = _mm512_fmadd_ps(xv, load16(ad.A, ad.dtype, (r + 2) * k + k16, tail), a2);
      a3 = _mm512_fmadd_ps(xv, load16(ad.A, ad.dtype, (r + 3) * k + k16, tail), a3);
    }
    t[r - r0] = _mm512_reduce_add_ps(a0);
    t[r - r0 + 1] = _mm512_reduce_add_ps(a1);
    t[r - r0 + 2] = _mm512_reduce_add_ps(a2);
    t[r - r0 + 3] = _mm512_reduce_add_ps(a3);
  }
  for (; r < r1; ++r) {
    __m512 a0 = _mm512_setzero_ps();
    for (int64_t j = 0; j < k16; j += 16)
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + j), load16(ad.A, ad.dtype, r * k + j, 0xFFFF), a0);
    if (tail) a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x + k16), load16(ad.A, ad.dtype, r * k + k16, tail), a0);
    t[r - r0] = _mm512_reduce_add_ps(a0);
  }
}

void lora_expand(const LoraArgs& L, int64_t m0, int64_t m1, int64_t n0, int nr, float* y, int64_t ldy) {
  for (int64_t i = m0; i < m1; ++i) {
    const float* ti = L.t + i * L.t_cols;
    int a0 = 0, a1 = L.n_ad;
    if (L.row_adapter) { a0 = L.row_adapter[i]; a1 = a0 + 1; }
    if (a0 < 0) a0 = a1;
    for (int c0 = 0; c0 < nr;) {
      const int cn = nr - c0 < 16 - (int)((n0 + c0) % 16) ? nr - c0 : 16 - (int)((n0 + c0) % 16);
      const __mmask16 mk = (__mmask16)((1u << cn) - 1);
      const int64_t n = n0 + c0;
      float* yp = y + i * ldy + n;
      __m512 v = _mm512_maskz_loadu_ps(mk, yp);
      for (int a = a0; a < a1; ++a) {
        const pqk_lora& ad = L.ad[a];
        const float* ta = ti + (L.row_adapter ? 0 : L.t_off[a]);
        const int64_t b0 = (n / 16) * ad.rank * 16 + n % 16;  // one contiguous [rank][16] block
        const __m512 acc = ad.dtype == 0 ? rank_sum<0>(ta, ad.Bp, b0, ad.rank, mk)
                           : ad.dtype == 1 ? rank_sum<1>(ta, ad.Bp, b0, ad.rank, mk)
                                           : rank_sum<2>(ta, ad.Bp, b0, ad.rank, mk);
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
