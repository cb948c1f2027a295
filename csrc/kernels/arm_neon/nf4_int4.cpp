// nf4 and int4 quantize/dequantize with ARMv8.0 NEON, bit-identical to ref/nf4_int.cpp.
//
// Exactness notes:
//  - every float op is the same single IEEE op as in ref: x / absmax and x / scale are
//    vdivq_f32 (correctly rounded, like the scalar division); dequantize products are one
//    vmulq_f32 per table entry (code value * scale), looked up afterwards (built with
//    -ffp-contract=off; no vfma anywhere);
//  - int4 rounds half to even with FRINTN (vrndnq_f32) = nearbyint in the default mode, and
//    converts with x86 cvtt semantics as ref's round_even_i32 does: a rounded value outside
//    (-2147483904, 2147483648) becomes INT32_MIN (then + zero, clamped to 0), where NEON's
//    FCVTZS would saturate (only reachable when the fp16 scale saturates at 65504);
//  - int4's per-group scale and zero come from ref::int4_group_params (one copy of that
//    logic), fed with the group's {min, max} (the sign of a zero extreme does not matter to it);
//  - nf4 code = number of fp32 midpoints strictly below x / absmax (ties go to the lower
//    code), an all-zero block stores code 7; amax is an exact max of |x|, order-independent.
// Layout: int4 element 2i in the LOW nibble; nf4 element 2i in the HIGH nibble.
#include <arm_neon.h>

#include "../common.h"
#include "../ref/ref_kernels.h"  // int4_group_params

namespace pqk { namespace neon {

// ---- shared: 32 floats from 16 packed bytes through a 16-entry float table -------------
// t holds table[c] as 64 bytes (entry c at bytes 4c..4c+3); element 2i comes from the low
// nibble of byte i unless high_first.
static inline void lut32(uint8x16_t v, const uint8x16x4_t& t, bool high_first, float* y) {
  const uint8x16_t lo = vandq_u8(v, vdupq_n_u8(0xf)), hi = vshrq_n_u8(v, 4);
  const uint8x16_t e = high_first ? hi : lo, o = high_first ? lo : hi;
  const uint8x16_t off = vreinterpretq_u8_u32(vdupq_n_u32(0x03020100u));  // byte k of an entry
  const uint8x16_t c[2] = {vshlq_n_u8(vzip1q_u8(e, o), 2), vshlq_n_u8(vzip2q_u8(e, o), 2)};  // 4 * code
  for (int h = 0; h < 2; ++h) {
    const uint8x16_t d0 = vzip1q_u8(c[h], c[h]), d1 = vzip2q_u8(c[h], c[h]);
    const uint8x16_t idx[4] = {vzip1q_u8(d0, d0), vzip2q_u8(d0, d0), vzip1q_u8(d1, d1), vzip2q_u8(d1, d1)};
    for (int j = 0; j < 4; ++j)
      vst1q_u8((uint8_t*)(y + 16 * h + 4 * j), vqtbl4q_u8(t, vaddq_u8(idx[j], off)));
  }
}

// n (even, <= 32) elements from n/2 packed bytes
static inline void lut_tail(const uint8_t* q, int64_t n, const uint8x16x4_t& t, bool high_first, float* y) {
  uint8_t buf[16] = {0};
  float out[32];
  std::memcpy(buf, q, (size_t)(n / 2));
  lut32(vld1q_u8(buf), t, high_first, out);
  std::memcpy(y, out, (size_t)n * 4);
}

static inline uint8x16x4_t table_of(const float32x4_t v[4]) {
  uint8x16x4_t t;
  t.val[0] = vreinterpretq_u8_f32(v[0]);
  t.val[1] = vreinterpretq_u8_f32(v[1]);
  t.val[2] = vreinterpretq_u8_f32(v[2]);
  t.val[3] = vreinterpretq_u8_f32(v[3]);
  return t;
}

// 16 int32 lanes (each 0..15 in the low byte) a (first of each pair) and b -> 16 bytes
// a | b << 4 ... packed from four vectors each
static inline uint8x16_t pack_nibbles(const int32x4_t f[4], const int32x4_t s[4]) {
  int32x4_t w[4];
  for (int u = 0; u < 4; ++u) w[u] = vorrq_s32(f[u], vshlq_n_s32(s[u], 4));
  const int16x8_t h0 = vcombine_s16(vmovn_s32(w[0]), vmovn_s32(w[1]));
  const int16x8_t h1 = vcombine_s16(vmovn_s32(w[2]), vmovn_s32(w[3]));
  return vreinterpretq_u8_s8(vcombine_s8(vmovn_s16(h0), vmovn_s16(h1)));
}

// ---- nf4 ---------------------------------------------------------------------------------

// count of midpoints < v (v in [-1, 1], never NaN)
static inline int32x4_t nf4_code(float32x4_t v, const float* mids) {
  uint32x4_t c = vdupq_n_u32(0);
  for (int i = 0; i < 15; ++i) c = vsubq_u32(c, vcgtq_f32(v, vdupq_n_f32(mids[i])));  // true = all ones = -1
  return vreinterpretq_s32_u32(c);
}

void quantize_row_nf4(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t*, const pqk_qparams& p) {
  const int64_t bs = p.group;  // power of two, 32..4096
  float mids[15];
  for (int i = 0; i < 15; ++i) mids[i] = (kNF4[i] + kNF4[i + 1]) * 0.5f;  // as nf4_index computes them
  for (int64_t b = 0; b < k / bs; ++b) {
    const float* xb = x + b * bs;
    float32x4_t m0 = vdupq_n_f32(0.0f), m1 = m0;
    for (int64_t j = 0; j < bs; j += 8) {
      m0 = vmaxq_f32(m0, vabsq_f32(vld1q_f32(xb + j)));
      m1 = vmaxq_f32(m1, vabsq_f32(vld1q_f32(xb + j + 4)));
    }
    const float amax = vmaxvq_f32(vmaxq_f32(m0, m1));  // +0.0 or positive (inputs are finite)
    std::memcpy(s + 4 * b, &amax, 4);
    uint8_t* qb = q + b * bs / 2;
    if (amax == 0.0f) { std::memset(qb, 0x77, (size_t)(bs / 2)); continue; }
    const float32x4_t vr = vdupq_n_f32(bnb_recip(amax));
    for (int64_t j = 0; j < bs; j += 32) {
      int32x4_t ev[4], od[4];
      for (int u = 0; u < 4; ++u) {
        const float32x4x2_t v = vld2q_f32(xb + j + 8 * u);  // val[0] = elements 2i, val[1] = 2i+1
        ev[u] = nf4_code(vmulq_f32(v.val[0], vr), mids);
        od[u] = nf4_code(vmulq_f32(v.val[1], vr), mids);
      }
      vst1q_u8(qb + j / 2, pack_nibbles(od, ev));  // element 2i in the HIGH nibble
    }
  }
}

void dequantize_row_nf4(const uint8_t* q, const uint8_t* s, const uint8_t*, int64_t k, float* y, const pqk_qparams& p) {
  const int64_t bs = p.group;
  for (int64_t b = 0; b < k / bs; ++b) {
    float amax;
    std::memcpy(&amax, s + 4 * b, 4);
    const float32x4_t va = vdupq_n_f32(amax);
    // table[c] = kNF4[c] * amax: the reference's product, once per block
    const float32x4_t tv[4] = {vmulq_f32(vld1q_f32(kNF4), va), vmulq_f32(vld1q_f32(kNF4 + 4), va),
                               vmulq_f32(vld1q_f32(kNF4 + 8), va), vmulq_f32(vld1q_f32(kNF4 + 12), va)};
    const uint8x16x4_t t = table_of(tv);
    const uint8_t* qb = q + b * bs / 2;
    float* yb = y + b * bs;
    for (int64_t j = 0; j < bs; j += 32) lut32(vld1q_u8(qb + j / 2), t, true, yb + j);
  }
}

// ---- int4 --------------------------------------------------------------------------------

// clamp(round_even_i32(x / sf) + zero, 0, 15) with ref's cvtt semantics
static inline int32x4_t int4_code(float32x4_t x, float32x4_t vsf, int32x4_t vz) {
  const float32x4_t r = vrndnq_f32(vdivq_f32(x, vsf));
  const uint32x4_t in_range = vandq_u32(vcgtq_f32(r, vdupq_n_f32(-2147483904.0f)),
                                        vcltq_f32(r, vdupq_n_f32(2147483648.0f)));
  const int32x4_t c = vaddq_s32(vbslq_s32(in_range, vcvtq_s32_f32(r), vdupq_n_s32(INT32_MIN)), vz);
  return vminq_s32(vmaxq_s32(c, vdupq_n_s32(0)), vdupq_n_s32(15));
}

// 32 elements -> 16 bytes, element 2i in the LOW nibble
static inline uint8x16_t int4_codes32(const float* x, float32x4_t vsf, int32x4_t vz) {
  int32x4_t ev[4], od[4];
  for (int u = 0; u < 4; ++u) {
    const float32x4x2_t v = vld2q_f32(x + 8 * u);
    ev[u] = int4_code(v.val[0], vsf, vz);
    od[u] = int4_code(v.val[1], vsf, vz);
  }
  return pack_nibbles(ev, od);
}

void quantize_row_int4(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t* z, const pqk_qparams& p) {
  const int64_t g = p.group == -1 ? k : p.group;  // power of two >= 16, or any even K
  const bool sym = p.sym != 0;
  for (int64_t b = 0; b < k / g; ++b) {
    const float* xg = x + b * g;
    // range including 0
    float32x4_t vmn = vdupq_n_f32(0.0f), vmx = vmn;
    int64_t j = 0;
    for (; j + 4 <= g; j += 4) {
      const float32x4_t v = vld1q_f32(xg + j);
      vmn = vminq_f32(vmn, v);
      vmx = vmaxq_f32(vmx, v);
    }
    float range[2] = {vminvq_f32(vmn), vmaxvq_f32(vmx)};
    for (; j < g; ++j) {
      range[0] = xg[j] < range[0] ? xg[j] : range[0];
      range[1] = xg[j] > range[1] ? xg[j] : range[1];
    }
    // {min, max} as a 2-element "group": int4_group_params finds the same range from it
    float sf; uint16_t s16; int zero;
    ref::int4_group_params(range, 2, sym, &sf, &s16, &zero);
    std::memcpy(s + 2 * b, &s16, 2);
    if (!sym) z[b] = (uint8_t)zero;

    uint8_t* qg = q + b * g / 2;
    if (sf == 0.0f) { std::memset(qg, zero | (zero << 4), (size_t)(g / 2)); continue; }
    const float32x4_t vsf = vdupq_n_f32(sf);
    const int32x4_t vz = vdupq_n_s32(zero);
    for (j = 0; j + 32 <= g; j += 32) vst1q_u8(qg + j / 2, int4_codes32(xg + j, vsf, vz));
    if (j < g) {  // n = g - j is even, < 32: padded copy (pad lanes are computed and dropped)
      const int64_t n = g - j;
      float buf[32] = {0};
      uint8_t out[16];
      std::memcpy(buf, xg + j, (size_t)n * 4);
      vst1q_u8(out, int4_codes32(buf, vsf, vz));
      std::memcpy(qg + j / 2, out, (size_t)(n / 2));
    }
  }
}

void dequantize_row_int4(const uint8_t* q, const uint8_t* s, const uint8_t* z, int64_t k, float* y, const pqk_qparams& p) {
  const int64_t g = p.group == -1 ? k : p.group;
  const int32x4_t iota = {0, 1, 2, 3};
  for (int64_t b = 0; b < k / g; ++b) {
    const int zero = p.sym ? 8 : z[b];
    const float32x4_t vsf = vdupq_n_f32(load_f16(s + 2 * b));
    // table[c] = (float)(c - zero) * sf: the reference's product, once per group
    float32x4_t tv[4];
    for (int u = 0; u < 4; ++u)
      tv[u] = vmulq_f32(vcvtq_f32_s32(vsubq_s32(vaddq_s32(iota, vdupq_n_s32(4 * u)), vdupq_n_s32(zero))), vsf);
    const uint8x16x4_t t = table_of(tv);
    const uint8_t* qg = q + b * g / 2;
    float* yg = y + b * g;
    int64_t j = 0;
    for (; j + 32 <= g; j += 32) lut32(vld1q_u8(qg + j / 2), t, false, yg + j);
    if (j < g) lut_tail(qg + j / 2, g - j, t, false, yg + j);
  }
}

}}  // namespace pqk::neon
