// Scalar reference matmul kernels: activation quantization, the int8-compute tile kernel
// over packed weights (see core/packed.h for the exact arithmetic) and the fp32 row-dot kernel.
#include "../../core/kernel_table.h"
#include "../../core/packed.h"
#include "ref_kernels.h"

namespace pqk { namespace ref {

// x ~ dx * xq per block of 32: dx = amax / 127, xq = round_half_even(x / dx), |xq| <= 127.
// Division, not multiplication by 1/dx: 1/dx overflows to inf for subnormal dx, x / dx cannot
// (|x| <= amax), so every finite input has one well-defined result.
// Every exponent field below e (255: none all ones). Branch-free so the compiler vectorises it.
bool all_finite(const float* x, int64_t k, uint32_t e) {
  const uint32_t lim = e << 23;
  uint32_t bad = 0;
  for (int64_t i = 0; i < k; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    bad |= (uint32_t)((u & 0x7f800000u) >= lim);
  }
  return bad == 0;
}

void quantize_act(const float* x, int64_t k, int8_t* xq, float* dx, int32_t* xs) {
  for (int64_t b = 0; b < k / QBLK; ++b) {
    const float* xb = x + b * QBLK;
    const float amax = abs_max(xb, QBLK);
    const float d = amax / 127.0f;
    dx[b] = d;
    int32_t s0 = 0, s1 = 0;
    for (int j = 0; j < QBLK; ++j) {
      int v = d != 0.0f ? round_even_i32(xb[j] / d) : 0;
      v = v < -127 ? -127 : (v > 127 ? 127 : v);
      xq[b * QBLK + j] = (int8_t)v;
      (j < 16 ? s0 : s1) += v;
    }
    xs[2 * b] = s0;
    xs[2 * b + 1] = s1;
  }
}

static inline int code_at(const PackedWeight& w, const uint8_t* cb, int r, int l) {
  if (w.nibbles) {
    int quad = l / 4;
    uint8_t byte = cb[(quad & 3) * 64 + r * 4 + (l & 3)];
    int idx = quad < 4 ? (byte & 0xF) : (byte >> 4);
    return w.lut ? w.lut16[idx] : idx;
  }
  return cb[(l / 4) * 64 + r * 4 + (l & 3)];
}

void gemm_int8(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
               const float* bias) {
  const int64_t n0 = tile * NR;
  const int nr = (int)(w.n - n0 < NR ? w.n - n0 : NR);
  const uint8_t* ct = w.codes + tile * w.tile_code_bytes;
  const int per = QBLK / w.blk;  // weight blocks per activation block
  for (int64_t i = m0; i < m1; ++i) {
    const int8_t* xq = a.row_q(i);
    const float* dxr = a.row_d(i);
    const int32_t* xs16 = a.row_s(i);
    float acc[NR] = {};
    for (int64_t kb = 0; kb < w.k / QBLK; ++kb) {
      const float dx = dxr[kb];
      for (int sub = 0; sub < per; ++sub) {
        const int64_t b = kb * per + sub;
        const int32_t xs = w.blk == 32 ? xs16[2 * kb] + xs16[2 * kb + 1] : xs16[b];
        const uint8_t* cb = ct + b * w.block_code_bytes();
        const int8_t* xb = xq + b * w.blk;
        const int64_t pi = w.par_index(tile, b);
        for (int r = 0; r < NR; ++r) {
          int32_t dot = 0;
          for (int l = 0; l < w.blk; ++l) dot += code_at(w, cb, r, l) * (int32_t)xb[l];
          const int32_t o = w.offs ? w.offs[pi + r] : w.o_const;
          const int32_t isum = dot - o * xs;
          const float a_r = w.sq ? w.sd[w.sup_index(pi + r)] * (float)w.sq[pi + r]  // exact (packed.h)
                                 : w.scale16 ? fp16_to_fp32(w.scale16[pi + r]) : w.scale[pi + r];
          const float da = a_r * dx;
          const float t = (float)isum * da;
          acc[r] = acc[r] + t;
          if (w.has_min) {
            const float mx = dx * (float)xs;
            const float m_r = w.mq ? w.md[w.sup_index(pi + r)] * (float)w.mq[pi + r]
                                   : w.min16 ? fp16_to_fp32(w.min16[pi + r]) : w.minv[pi + r];
            const float tm = m_r * mx;
            acc[r] = acc[r] + tm;
          }
        }
      }
    }
    for (int r = 0; r < nr; ++r) y[i * ldy + n0 + r] = bias ? acc[r] + bias[n0 + r] : acc[r];
  }
}

void gemm_f32(const float* w, int nr, int64_t k, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy,
              const float* bias) {
  for (int64_t i = 0; i < m; ++i)
    for (int r = 0; r < nr; ++r) {
      float acc = 0.0f;
      for (int64_t j = 0; j < k; ++j) acc += x[i * ldx + j] * w[r * k + j];
      y[i * ldy + r] = bias ? acc + bias[r] : acc;
    }
}

}}  // namespace pqk::ref

namespace pqk { namespace ref {

// element i of an adapter array (A or Bp) in the adapter's dtype, widened exactly
static inline float lora_elem_of(const void* p, int dtype, int64_t i) {
  if (dtype == 0) return ((const float*)p)[i];
  const uint16_t h = ((const uint16_t*)p)[i];
  return dtype == 1 ? fp16_to_fp32(h) : bf16_to_fp32(h);
}
static inline float lora_elem(const pqk_lora& ad, int64_t i) { return lora_elem_of(ad.Bp, ad.dtype, i); }

void lora_shrink(const pqk_lora& ad, int64_t r0, int64_t r1, int64_t k, const float* x, float* t) {
  for (int64_t r = r0; r < r1; ++r) {
    float acc = 0.0f;
    for (int64_t j = 0; j < k; ++j) acc = acc + x[j] * lora_elem_of(ad.A, ad.dtype, r * k + j);
    t[r - r0] = acc;
  }
}

void lora_expand(const LoraArgs& L, int64_t m0, int64_t m1, int64_t n0, int nr, float* y, int64_t ldy) {
  for (int64_t i = m0; i < m1; ++i) {
    float* yr = y + i * ldy + n0;
    const float* ti = L.t + i * L.t_cols;
    int a0 = 0, a1 = L.n_ad;
    if (L.row_adapter) { a0 = L.row_adapter[i]; a1 = a0 + 1; }
    for (int c = 0; c < nr; ++c) {
      const int64_t n = n0 + c;
      float v = yr[c];
      for (int a = a0 < 0 ? a1 : a0; a < a1; ++a) {
        const pqk_lora& ad = L.ad[a];
        const float* ta = ti + (L.row_adapter ? 0 : L.t_off[a]);
        const int64_t b0 = (n / 16) * ad.rank * 16 + n % 16;
        // four interleaved chains (rank r goes to chain r % 4), fused multiply-adds rounded once,
        // combined as (c0 + c1) + (c2 + c3): the SIMD kernels do exactly this (one FMA chain is
        // latency-bound)
        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int r = 0; r < ad.rank; ++r) c[r & 3] = std::fma(ta[r], lora_elem(ad, b0 + r * 16), c[r & 3]);
        const float acc = (c[0] + c[1]) + (c[2] + c[3]);
        v = v + ad.scale * acc;
        if (ad.row_scale) v = v * ad.row_scale[n];
      }
      if (L.bias) v = v + L.bias[n];
      yr[c] = v;
    }
  }
}

}}  // namespace pqk::ref
