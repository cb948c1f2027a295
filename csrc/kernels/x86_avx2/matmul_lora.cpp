// Adapter kernels and activation quantization (AVX2 + FMA + F16C). The expansion matches
// ref::lora_expand bit for bit (rank r into FMA chain r % 4, (c0 + c1) + (c2 + c3), then scale,
// DoRA factor, bias); the shrink is fp32 dot products (any order); the activation quantizer
// matches ref::quantize_act bit for bit (x / dx, round half to even, clamp, sums per 16).
#include <immintrin.h>

#include <algorithm>

#include "../../core/kernel_table.h"
#include "../../core/packed.h"

namespace pqk { namespace avx2 {

namespace {

// n (<= 8) elements at p + i widened to fp32, zeros beyond n
template <int DT>
inline __m256 load8(const void* p, int64_t i, int n) {
  if (n == 8) {
    if (DT == 0) return _mm256_loadu_ps((const float*)p + i);
    const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + i));
    if (DT == 1) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  alignas(32) float tmp[8] = {};
  for (int j = 0; j < n; ++j) {
    if (DT == 0) tmp[j] = ((const float*)p)[i + j];
    else {
      const uint16_t h = ((const uint16_t*)p)[i + j];
      tmp[j] = DT == 1 ? _cvtsh_ss(h) : _mm_cvtss_f32(_mm_castsi128_ps(_mm_cvtsi32_si128((int)h << 16)));
    }
  }
  return _mm256_load_ps(tmp);
}

// out[h] = sum_r ta[r] * Bp[b0 + 8 h + 16 r + lane] for the H halves (8 columns each) of a
// 16-column tile: rank r into FMA chain r % 4 of its half, then (c0 + c1) + (c2 + c3). The two
// halves' chains are independent and interleave (one half's 4 chains alone leave the FMA pipes
// idle); n: columns of a single half (H = 1) that exist, zeros beyond.
template <int DT, int H>
inline void rank_sums(const float* ta, const void* Bp, int64_t b0, int rank, int n, __m256* out) {
  __m256 c[H][4];
  for (int h = 0; h < H; ++h) c[h][0] = c[h][1] = c[h][2] = c[h][3] = _mm256_setzero_ps();
  int r = 0;
  for (; r + 4 <= rank; r += 4)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const __m256 tq = _mm256_set1_ps(ta[r + q]);
#pragma GCC unroll 2
      for (int h = 0; h < H; ++h) c[h][q] = _mm256_fmadd_ps(tq, load8<DT>(Bp, b0 + 8 * h + (r + q) * 16, n), c[h][q]);
    }
  // the last rank % 4 ranks (constant indices: a variable one keeps c in memory)
#pragma GCC unroll 3
  for (int q = 0; q < 3; ++q)
    if (r + q < rank)
#pragma GCC unroll 2
      for (int h = 0; h < H; ++h)
        c[h][q] = _mm256_fmadd_ps(_mm256_set1_ps(ta[r + q]), load8<DT>(Bp, b0 + 8 * h + (r + q) * 16, n), c[h][q]);
  for (int h = 0; h < H; ++h) out[h] = _mm256_add_ps(_mm256_add_ps(c[h][0], c[h][1]), _mm256_add_ps(c[h][2], c[h][3]));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// dot(x, A[r]) for G rows r0.. at a time (G loads of x shared): two chains per row over steps of
// 16 (even and odd 8), then the 8-step and tail chains, summed as (a0 + a1) then the lanes. Every
// row gets these operations whatever G, so a column's value does not depend on how the columns
// were split into calls (threads).
template <int DT, int G>
inline void shrink_rows(const void* A, int64_t r0, int64_t k, const float* x, float* t) {
  const int64_t k8 = k & ~(int64_t)7;
  const int tail = (int)(k - k8);
  __m256 a0[G], a1[G];
  for (int g = 0; g < G; ++g) a0[g] = a1[g] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= k8; j += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      a0[g] = _mm256_fmadd_ps(x0, load8<DT>(A, (r0 + g) * k + j, 8), a0[g]);
      a1[g] = _mm256_fmadd_ps(x1, load8<DT>(A, (r0 + g) * k + j + 8, 8), a1[g]);
    }
  }
  if (j < k8) {
    const __m256 x0 = _mm256_loadu_ps(x + j);
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) a0[g] = _mm256_fmadd_ps(x0, load8<DT>(A, (r0 + g) * k + j, 8), a0[g]);
  }
  if (tail) {
    alignas(32) float xt[8] = {};
    for (int q = 0; q < tail; ++q) xt[q] = x[k8 + q];
    const __m256 x0 = _mm256_load_ps(xt);
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) a0[g] = _mm256_fmadd_ps(x0, load8<DT>(A, (r0 + g) * k + k8, tail), a0[g]);
  }
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) t[g] = hsum8(_mm256_add_ps(a0[g], a1[g]));
}

template <int DT>
void shrink_t(const pqk_lora& ad, int64_t r0, int64_t r1, int64_t k, const float* x, float* t) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) shrink_rows<DT, 4>(ad.A, r, k, x, t + (r - r0));
  for (; r < r1; ++r) shrink_rows<DT, 1>(ad.A, r, k, x, t + (r - r0));
}

// One adapter over the columns [n0, n0 + nr) of a row (v = y (+ scale * acc) (* row_scale)
// (+ bias when last)): whole 16-column tiles as two interleaved halves, then pieces of at most
// 8 columns that do not cross a tile.
template <int DT>
void expand_one(const pqk_lora& ad, const float* ta, int64_t n0, int nr, float* yr, const float* bias) {
  const __m256 vs = _mm256_set1_ps(ad.scale);
  auto finish = [&](__m256 acc, int64_t n, float* yp, int cnt) {
    __m256 v;
    if (cnt == 8) v = _mm256_loadu_ps(yp);
    else {
      alignas(32) float buf[8] = {};
      for (int q = 0; q < cnt; ++q) buf[q] = yp[q];
      v = _mm256_load_ps(buf);
    }
    v = _mm256_add_ps(v, _mm256_mul_ps(vs, acc));
    if (ad.row_scale) v = _mm256_mul_ps(v, load8<0>(ad.row_scale, n, cnt));
    if (bias) v = _mm256_add_ps(v, load8<0>(bias, n, cnt));
    if (cnt == 8) _mm256_storeu_ps(yp, v);
    else {
      alignas(32) float buf[8];
      _mm256_store_ps(buf, v);
      for (int q = 0; q < cnt; ++q) yp[q] = buf[q];
    }
  };
  int c0 = 0;
  if (n0 % 16 == 0)
    for (; c0 + 16 <= nr; c0 += 16) {
      const int64_t n = n0 + c0;
      __m256 acc[2];
      rank_sums<DT, 2>(ta, ad.Bp, (n / 16) * ad.rank * 16, ad.rank, 8, acc);
      finish(acc[0], n, yr + c0, 8);
      finish(acc[1], n + 8, yr + c0 + 8, 8);
    }
  while (c0 < nr) {
    const int64_t n = n0 + c0;
    const int in_tile = 16 - (int)(n % 16);
    const int cnt = std::min(std::min(nr - c0, 8), in_tile);
    __m256 acc;
    rank_sums<DT, 1>(ta, ad.Bp, (n / 16) * ad.rank * 16 + n % 16, ad.rank, cnt, &acc);
    finish(acc, n, yr + c0, cnt);
    c0 += cnt;
  }
}

}  // namespace

void lora_shrink(const pqk_lora& ad, int64_t r0, int64_t r1, int64_t k, const float* x, float* t) {
  if (ad.dtype == 0) return shrink_t<0>(ad, r0, r1, k, x, t);
  if (ad.dtype == 1) return shrink_t<1>(ad, r0, r1, k, x, t);
  return shrink_t<2>(ad, r0, r1, k, x, t);
}

// adapter by adapter over the columns (y holds v between adapters: the same per-value order as
// ref, whose v stays in a register)
void lora_expand(const LoraArgs& L, int64_t m0, int64_t m1, int64_t n0, int nr, float* y, int64_t ldy) {
  for (int64_t i = m0; i < m1; ++i) {
    const float* ti = L.t + i * L.t_cols;
    float* yr = y + i * ldy + n0;
    int a0 = 0, a1 = L.n_ad;
    if (L.row_adapter) { a0 = L.row_adapter[i]; a1 = a0 + 1; }
    if (a0 < 0 || a0 >= a1) {  // no adapter on this row: bias only
      if (L.bias)
        for (int c = 0; c < nr; ++c) yr[c] = yr[c] + L.bias[n0 + c];
      continue;
    }
    for (int a = a0; a < a1; ++a) {
      const pqk_lora& ad = L.ad[a];
      const float* ta = ti + (L.row_adapter ? 0 : L.t_off[a]);
      const float* bias = a + 1 == a1 ? L.bias : nullptr;
      if (ad.dtype == 0) expand_one<0>(ad, ta, n0, nr, yr, bias);
      else if (ad.dtype == 1) expand_one<1>(ad, ta, n0, nr, yr, bias);
      else expand_one<2>(ad, ta, n0, nr, yr, bias);
    }
  }
}

namespace {

// v[j] -> lane j of the result = OP over the 8 lanes of v[j] (OP exact and order-free: max of
// |x| as int32, integer add), by a transposing tree of shuffles
template <class Op>
inline __m256i reduce8(const __m256i* v, Op op) {
  __m256i a[4], c[2];
  for (int i = 0; i < 4; ++i)
    a[i] = op(_mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 2; ++i)
    c[i] = op(_mm256_unpacklo_epi64(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_epi64(a[2 * i], a[2 * i + 1]));
  return op(_mm256_permute2x128_si256(c[0], c[1], 0x20), _mm256_permute2x128_si256(c[0], c[1], 0x31));
}

// block of 32 at xb: codes x / vd (round half to even, the default MXCSR mode), clamped to
// +-127, stored as bytes in order; the two sums of 16 as vectors of 8 partial sums
inline void codes(const float* xb, __m256 vd, int8_t* q, __m256i& s0, __m256i& s1) {
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  __m256i c[4];
  for (int j = 0; j < 4; ++j)
    c[j] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(xb + 8 * j), vd)), lo), hi);
  // packs work per 128-bit lane (no saturation: |c| <= 127); the permute restores the order
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  _mm256_storeu_si256((__m256i*)q, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  s0 = _mm256_add_epi32(c[0], c[1]);
  s1 = _mm256_add_epi32(c[2], c[3]);
}

inline __m256 block_absmax(const float* xb) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 am = _mm256_and_ps(_mm256_loadu_ps(xb), absmask);
  for (int j = 1; j < 4; ++j) am = _mm256_max_ps(am, _mm256_and_ps(_mm256_loadu_ps(xb + 8 * j), absmask));
  return am;
}

}  // namespace

void quantize_act(const float* x, int64_t k, int8_t* xq, float* dx, int32_t* xs) {
  const int64_t nb = k / QBLK;
  int64_t b = 0;
  // 8 blocks at a time: maxima and sums through transposing trees, 8 scales in one division
  for (; b + 8 <= nb; b += 8) {
    __m256i am[8];
    for (int j = 0; j < 8; ++j) am[j] = _mm256_castps_si256(block_absmax(x + (b + j) * QBLK));
    // |x| as int32 orders like the floats (non-negative, no NaN: the caller checked)
    const __m256 amax = _mm256_castsi256_ps(reduce8(am, [](__m256i p, __m256i q) { return _mm256_max_epi32(p, q); }));
    const __m256 d = _mm256_div_ps(amax, _mm256_set1_ps(127.0f));
    _mm256_storeu_ps(dx + b, d);
    // d == 0 for an all-zero block or when amax / 127 underflows (amax <= 63 * 2^-149): x / 1
    // then rounds every x of the block to 0, the codes the ref gives
    alignas(32) float vd[8];
    _mm256_store_ps(vd, _mm256_blendv_ps(d, _mm256_set1_ps(1.0f), _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_EQ_OQ)));
    __m256i h[16];
    for (int j = 0; j < 8; ++j) codes(x + (b + j) * QBLK, _mm256_set1_ps(vd[j]), xq + (b + j) * QBLK, h[2 * j], h[2 * j + 1]);
    auto add = [](__m256i p, __m256i q) { return _mm256_add_epi32(p, q); };
    _mm256_storeu_si256((__m256i*)(xs + 2 * b), reduce8(h, add));
    _mm256_storeu_si256((__m256i*)(xs + 2 * b + 8), reduce8(h + 8, add));
  }
  for (; b < nb; ++b) {
    const float* xb = x + b * QBLK;
    const __m256 am = block_absmax(xb);
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(am), _mm256_extractf128_ps(am, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float d = _mm_cvtss_f32(m4) / 127.0f;
    dx[b] = d;
    __m256i s0, s1;
    codes(xb, _mm256_set1_ps(d != 0.0f ? d : 1.0f), xq + b * QBLK, s0, s1);
    alignas(32) int32_t t[16];
    _mm256_store_si256((__m256i*)t, s0);
    _mm256_store_si256((__m256i*)(t + 8), s1);
    int32_t a0 = 0, a1 = 0;
    for (int l = 0; l < 8; ++l) { a0 += t[l]; a1 += t[8 + l]; }
    xs[2 * b] = a0;
    xs[2 * b + 1] = a1;
  }
}

}}  // namespace pqk::avx2
