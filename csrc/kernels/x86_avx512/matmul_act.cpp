// Activation quantization for compute="int8" (AVX-512): per block of 32, dx = amax/127,
// xq = round_half_even(x / dx) clamped to +-127, sums per 16. Same IEEE operations as
// ref::quantize_act (two correctly rounded divisions; cvtps2dq rounds to nearest even in the
// default MXCSR mode, which pyqkern never changes), so the bytes are identical.
#include "../avx512_gcc12_warnings.h"  // before <immintrin.h>
#include <immintrin.h>

#include "../../core/kernel_table.h"
#include "../../core/packed.h"

namespace pqk { namespace avx512 {

namespace {

// v[j] -> lane j of the result = OP over the 16 lanes of v[j] (OP exact and order-free: max of
// |x|, integer add), by a transposing tree: 45 shuffles and OPs for 16 vectors instead of ~8
// dependent steps per vector for _mm512_reduce_*
template <class Op>
inline __m512i reduce16(const __m512i* v, Op op) {
  __m512i a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = op(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    b[i] = op(_mm512_unpacklo_epi64(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_epi64(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 2; ++i)
    c[i] = op(_mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return op(_mm512_shuffle_i32x4(c[0], c[1], 0x88), _mm512_shuffle_i32x4(c[0], c[1], 0xDD));
}

// block b: codes from x / vd, clamped, stored; returns the two 16-value halves as int32
inline void codes(const float* xb, __m512 vd, int8_t* q, __m512i& q0, __m512i& q1) {
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  q0 = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(xb), vd));
  q1 = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(xb + 16), vd));
  q0 = _mm512_min_epi32(_mm512_max_epi32(q0, lo), hi);
  q1 = _mm512_min_epi32(_mm512_max_epi32(q1, lo), hi);
  _mm_storeu_si128((__m128i*)q, _mm512_cvtepi32_epi8(q0));
  _mm_storeu_si128((__m128i*)(q + 16), _mm512_cvtepi32_epi8(q1));
}

}  // namespace

void quantize_act(const float* x, int64_t k, int8_t* xq, float* dx, int32_t* xs) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const int64_t nb = k / QBLK;
  int64_t b = 0;
  // 16 blocks at a time: their maxima and sums through one transposing tree each, and the 16
  // scales in one vector division (the same IEEE amax / 127 per lane)
  for (; b + 16 <= nb; b += 16) {
    __m512i am[16];
    for (int j = 0; j < 16; ++j) {
      const float* xb = x + (b + j) * QBLK;
      am[j] = _mm512_castps_si512(_mm512_max_ps(_mm512_and_ps(_mm512_loadu_ps(xb), absmask),
                                                _mm512_and_ps(_mm512_loadu_ps(xb + 16), absmask)));
    }
    // |x| as int32 orders like the floats (non-negative, no NaN: the caller checked)
    const __m512 amax = _mm512_castsi512_ps(reduce16(am, [](__m512i p, __m512i q) { return _mm512_max_epi32(p, q); }));
    const __m512 d = _mm512_div_ps(amax, _mm512_set1_ps(127.0f));
    _mm512_storeu_ps(dx + b, d);
    // d == 0 for an all-zero block or when amax / 127 underflows (amax <= 63 * 2^-149): x / 1
    // then rounds every x of the block to 0, the codes the ref gives
    alignas(64) float vd[16];
    _mm512_store_ps(vd, _mm512_mask_blend_ps(_mm512_cmpeq_ps_mask(d, _mm512_setzero_ps()), d, _mm512_set1_ps(1.0f)));
    __m512i h[32];
    for (int j = 0; j < 16; ++j)
      codes(x + (b + j) * QBLK, _mm512_set1_ps(vd[j]), xq + (b + j) * QBLK, h[2 * j], h[2 * j + 1]);
    auto add = [](__m512i p, __m512i q) { return _mm512_add_epi32(p, q); };
    _mm512_storeu_si512((void*)(xs + 2 * b), reduce16(h, add));
    _mm512_storeu_si512((void*)(xs + 2 * b + 16), reduce16(h + 16, add));
  }
  for (; b < nb; ++b) {
    const float* xb = x + b * QBLK;
    __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
    __m512 am = _mm512_max_ps(_mm512_and_ps(v0, absmask), _mm512_and_ps(v1, absmask));
    const float amax = _mm512_reduce_max_ps(am);
    const float d = amax / 127.0f;
    dx[b] = d;
    __m512i q0, q1;
    codes(xb, _mm512_set1_ps(d != 0.0f ? d : 1.0f), xq + b * QBLK, q0, q1);
    xs[2 * b] = _mm512_reduce_add_epi32(q0);
    xs[2 * b + 1] = _mm512_reduce_add_epi32(q1);
  }
}

}}  // namespace pqk::avx512
