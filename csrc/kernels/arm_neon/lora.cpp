// Adapter kernels with ARMv8.0 NEON (the ref loops are scalar here: a rank-16 adapter on a
// 4096x4096 layer is ~131k multiply-adds per token, a good part of a phone core's GEMV time).
//
// Expansion: 4 output columns per vector, 16 (a whole B tile) at a time where they fit, with
// the same per-lane operations and order as ref::lora_expand: rank r into fused multiply-add
// chain r % 4 (vfmaq_f32 rounds once, as std::fma), chains added as (c0 + c1) + (c2 + c3), then
// y + scale * acc (a multiply, then an add), the DoRA factor and, after the last adapter, the
// bias; so the results are identical. Columns outside whole 4-column groups of their tile, and
// rows without an adapter, take ref::lora_expand itself.
// Shrink: fp32 dot products, 4 adapter rows sharing each load of x, each row in two 4-lane FMA
// chains and the same operations whatever rows it is grouped with, so a column's value does not
// depend on how the rank columns were split over threads (its order is not ref's: the shrink is
// specified only to fp32 accuracy).
// A and B may be fp32, fp16 (vcvt_f32_f16) or bf16 (shifted into the high half): widened exactly.
#include <arm_neon.h>

#include "../../core/kernel_table.h"
#include "../ref/ref_kernels.h"
#include "row_dots.h"  // load4, row dots (the shrink)

namespace pqk { namespace neon {

namespace {

// acc[v] (columns 4v..4v+3 from b0 of a [rank][16] tile) = ref's chain sum for V vectors
template <int DT, int V>
inline void rank_sums(const float* ta, const void* Bp, int64_t b0, int rank, float32x4_t* acc) {
  float32x4_t c[4][V];
  for (int q = 0; q < 4; ++q)
    for (int v = 0; v < V; ++v) c[q][v] = vdupq_n_f32(0.0f);
  int r = 0;
  for (; r + 4 <= rank; r += 4)
    for (int q = 0; q < 4; ++q) {
      const float32x4_t tq = vdupq_n_f32(ta[r + q]);
      for (int v = 0; v < V; ++v) c[q][v] = vfmaq_f32(c[q][v], load4<DT>(Bp, b0 + (r + q) * 16 + 4 * v), tq);
    }
  for (int q = 0; q < 3; ++q)  // the last rank % 4 (constant indices keep c in registers)
    if (r + q < rank)
      for (int v = 0; v < V; ++v)
        c[q][v] = vfmaq_f32(c[q][v], load4<DT>(Bp, b0 + (r + q) * 16 + 4 * v), vdupq_n_f32(ta[r + q]));
  for (int v = 0; v < V; ++v) acc[v] = vaddq_f32(vaddq_f32(c[0][v], c[1][v]), vaddq_f32(c[2][v], c[3][v]));
}

// y[c0, c1) of one row (4-aligned columns n0 + c0.., c1 - c0 a multiple of 4) += adapter a's
// expansion: v = y + scale * acc (* row_scale) (+ bias when last)
template <int DT>
void expand_one(const pqk_lora& ad, const float* ta, int64_t n0, int c0, int c1, float* yr, const float* bias) {
  const int64_t ts = (int64_t)ad.rank * 16;
  auto store = [&](float32x4_t acc, int c) {
    const int64_t n = n0 + c;
    float32x4_t v = vaddq_f32(vld1q_f32(yr + c), vmulq_n_f32(acc, ad.scale));
    if (ad.row_scale) v = vmulq_f32(v, vld1q_f32(ad.row_scale + n));
    if (bias) v = vaddq_f32(v, vld1q_f32(bias + n));
    vst1q_f32(yr + c, v);
  };
  int c = c0;
  while (c < c1) {
    const int64_t n = n0 + c;
    const int64_t b0 = (n / 16) * ts + n % 16;
    if (n % 16 == 0 && c1 - c >= 16) {  // a whole tile: 16 chains in flight
      float32x4_t acc[4];
      rank_sums<DT, 4>(ta, ad.Bp, b0, ad.rank, acc);
      for (int v = 0; v < 4; ++v) store(acc[v], c + 4 * v);
      c += 16;
    } else {
      float32x4_t acc;
      rank_sums<DT, 1>(ta, ad.Bp, b0, ad.rank, &acc);
      store(acc, c);
      c += 4;
    }
  }
}

}  // namespace

void lora_shrink(const pqk_lora& ad, int64_t r0, int64_t r1, int64_t k, const float* x, float* t) {
  if (ad.dtype == 0) dots<0>(ad.A, r0, r1, k, x, t);
  else if (ad.dtype == 1) dots<1>(ad.A, r0, r1, k, x, t);
  else dots<2>(ad.A, r0, r1, k, x, t);
}

void lora_expand(const LoraArgs& L, int64_t m0, int64_t m1, int64_t n0, int nr, float* y, int64_t ldy) {
  // the vector part: whole 4-column groups (4-aligned column indices, so inside one B tile)
  const int head = (int)((4 - n0 % 4) % 4) < nr ? (int)((4 - n0 % 4) % 4) : nr;
  const int body = (nr - head) / 4 * 4;
  for (int64_t i = m0; i < m1; ++i) {
    const int a0 = L.row_adapter ? L.row_adapter[i] : 0;
    if (a0 < 0 || body == 0) {  // no adapter on this row (bias only), or no whole group
      ref::lora_expand(L, i, i + 1, n0, nr, y, ldy);
      continue;
    }
    if (head) ref::lora_expand(L, i, i + 1, n0, head, y, ldy);
    if (head + body < nr) ref::lora_expand(L, i, i + 1, n0 + head + body, nr - head - body, y, ldy);
    // adapter by adapter over the body (y holds v between adapters: ref's per-value order)
    const float* ti = L.t + i * L.t_cols;
    float* yr = y + i * ldy + n0;
    const int a1 = L.row_adapter ? a0 + 1 : L.n_ad;
    for (int a = a0; a < a1; ++a) {
      const pqk_lora& ad = L.ad[a];
      const float* ta = ti + (L.row_adapter ? 0 : L.t_off[a]);
      const float* bias = a + 1 == a1 ? L.bias : nullptr;
      if (ad.dtype == 0) expand_one<0>(ad, ta, n0, head, head + body, yr, bias);
      else if (ad.dtype == 1) expand_one<1>(ad, ta, n0, head, head + body, yr, bias);
      else expand_one<2>(ad, ta, n0, head, head + body, yr, bias);
    }
  }
}

}}  // namespace pqk::neon
