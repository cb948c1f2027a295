// ggml super-block formats q4_k and q6_k (quantize + dequantize) and iq4_nl quantize.
//
// These are ports of the algorithms in llama.cpp's ggml/src/ggml-quants.c as they run WITHOUT
// an importance matrix (written from a reading of that file, not copied):
//   q4_k    quantize_row_q4_K_ref  (= quantize_q4_K(..., quant_weights = NULL), what
//           llama-quantize runs without --imatrix)
//   q6_k    quantize_row_q6_K_ref  (= quantize_q6_K(..., NULL))
//   iq4_nl  quantize_iq4_nl(..., NULL): the path llama-quantize uses (the scale search with
//           ntry = 7, weights x^2, super block = block = 32). ggml also has
//           quantize_row_iq4_nl_ref, which skips the search (ntry = -1); it only serves
//           ggml's from_float hook, and the files people actually download were written by
//           quantize_iq4_nl, so that is the one whose bytes we reproduce.
// Every float operation is done in the order the C code does it (two-operand expressions are
// evaluated left to right, no fused multiply-add: this TU is built with -ffp-contract=off,
// as ggml's reference is when compiled for baseline x86-64). The bytes are therefore
// identical to llama.cpp's for every finite input; tests/test_kquants.py checks it against a
// build of the real ggml-quants.c.
#include "ref_kernels.h"

namespace pqk { namespace ref {

namespace {

constexpr float kGroupMaxEps = 1e-15f;  // ggml's GROUP_MAX_EPS

// ---------------------------------------------------------------- q4_k helpers
// Asymmetric 4-bit fit of one 32-element sub-block: codes L in [0, 15] and (scale, min) with
// x ~= scale * L - min, minimising the weighted squared error over 21 candidate grids.
// (make_qkx2_quants with n = 32, nmax = 15, rmin = -1, rdelta = 0.1, nstep = 20, use_mad = 0.)
// As in ggml, once a candidate wins, the later grids are laid out from the winner's min
// (`lo` below), not from the block minimum.
float fit_q4k_sub(const float* x, const float* w, uint8_t* L, float* neg_min) {
  constexpr int n = 32, nmax = 15, nstep = 20;
  constexpr float rmin = -1.0f, rdelta = 0.1f;
  float lo = x[0], hi = x[0];
  float sum_w = w[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < lo) lo = x[i];
    if (x[i] > hi) hi = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (lo > 0) lo = 0;
  if (hi == lo) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *neg_min = -lo;
    return 0.0f;
  }
  float iscale = (float)nmax / (hi - lo);
  float scale = 1.0f / iscale;
  float best_err = 0.0f;
  for (int i = 0; i < n; ++i) {
    int l = nearest_int(iscale * (x[i] - lo));
    l = l < 0 ? 0 : (l > nmax ? nmax : l);
    L[i] = (uint8_t)l;
    float diff = scale * (float)l + lo - x[i];
    diff = diff * diff;
    best_err += w[i] * diff;
  }
  uint8_t aux[n];
  for (int step = 0; step <= nstep; ++step) {
    iscale = (rmin + rdelta * (float)step + (float)nmax) / (hi - lo);
    float sl = 0.0f, sl2 = 0.0f, sxl = 0.0f;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * (x[i] - lo));
      l = l < 0 ? 0 : (l > nmax ? nmax : l);
      aux[i] = (uint8_t)l;
      const float fl = (float)l;
      sl += w[i] * fl;
      sl2 += w[i] * fl * fl;
      sxl += w[i] * fl * x[i];
    }
    const float det = sum_w * sl2 - sl * sl;
    if (!(det > 0)) continue;
    float s = (sum_w * sxl - sum_x * sl) / det;
    float m = (sl2 * sum_x - sl * sxl) / det;
    if (m > 0) {
      m = 0;
      s = sxl / sl2;
    }
    float err = 0.0f;
    for (int i = 0; i < n; ++i) {
      float diff = s * (float)aux[i] + m - x[i];
      diff = diff * diff;
      err += w[i] * diff;
    }
    if (err < best_err) {
      for (int i = 0; i < n; ++i) L[i] = aux[i];
      best_err = err;
      scale = s;
      lo = m;
    }
  }
  *neg_min = -lo;
  return scale;
}

// ---------------------------------------------------------------- q6_k helpers
inline int clamp_i(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Sums of the rmse_type = 1 fit (weights x^2) for one candidate inverse scale.
inline void q6k_sums(const float* x, float iscale, float* sumlx, float* suml2) {
  float a = 0.0f, b = 0.0f;
  for (int i = 0; i < 16; ++i) {
    const int l = clamp_i(nearest_int(iscale * x[i]), -32, 31);
    const float w = x[i] * x[i];
    const float fl = (float)l;
    a += w * x[i] * fl;
    b += w * fl * fl;
  }
  *sumlx = a;
  *suml2 = b;
}

inline void q6k_codes(const float* x, float iscale, int8_t* L) {
  for (int i = 0; i < 16; ++i) L[i] = (int8_t)(clamp_i(nearest_int(iscale * x[i]), -32, 31) + 32);
}

// Symmetric 6-bit fit of one 16-element sub-block: codes L in [0, 63] (value L - 32) and
// the scale (make_qx_quants with n = 16, nmax = 32, rmse_type = 1, no quant weights).
float fit_q6k_sub(const float* x, int8_t* L) {
  constexpr int nmax = 32;
  float amax = 0.0f, max = 0.0f;
  for (int i = 0; i < 16; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) { amax = ax; max = x[i]; }
  }
  if (amax < kGroupMaxEps) {
    for (int i = 0; i < 16; ++i) L[i] = 0;
    return 0.0f;
  }
  float iscale = (float)(-nmax) / max;
  float sumlx, suml2;
  q6k_sums(x, iscale, &sumlx, &suml2);
  q6k_codes(x, iscale, L);
  float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int t = -9; t <= 9; ++t) {
    if (t == 0) continue;
    iscale = -((float)nmax + 0.1f * (float)t) / max;
    q6k_sums(x, iscale, &sumlx, &suml2);
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      q6k_codes(x, iscale, L);
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// ---------------------------------------------------------------- iq4_nl helpers
// Index of the table entry nearest to v (ggml best_index_int8 on kvalues_iq4nl): values at or
// beyond the ends clamp, an exact midpoint goes to the upper entry, NaN gives 15.
inline int iq4nl_index(float v) {
  if (v <= (float)kIQ4NL[0]) return 0;
  if (v >= (float)kIQ4NL[15]) return 15;
  int lo = 0, hi = 15;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (v < (float)kIQ4NL[mid]) hi = mid; else lo = mid;
  }
  return v - (float)kIQ4NL[hi - 1] < (float)kIQ4NL[hi] - v ? hi - 1 : hi;
}

// Weighted sums for one candidate inverse scale (weights x^2).
inline void iq4nl_sums(const float* x, float id, float* sumqx, float* sumq2) {
  float a = 0.0f, b = 0.0f;
  for (int j = 0; j < 32; ++j) {
    const float q = (float)kIQ4NL[iq4nl_index(id * x[j])];
    const float w = x[j] * x[j];
    a += w * q * x[j];
    b += w * q * q;
  }
  *sumqx = a;
  *sumq2 = b;
}

}  // namespace

// ---------------------------------------------------------------- q4_k
// Block (144 bytes): d fp16, dmin fp16, scales[12] (eight 6-bit scales and mins), qs[128]
// (per 64-element chunk c: byte l = element 64c+l low nibble | element 64c+32+l high nibble).
void quantize_row_q4_k(const float* x, int64_t k, uint8_t* q, uint8_t*, uint8_t*, const pqk_qparams&) {
  uint8_t L[QK_K];
  float w[32], scales[8], mins[8];
  for (int64_t b = 0; b < k / QK_K; ++b, x += QK_K, q += Q4_K_BYTES) {
    float max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < 8; ++j) {
      const float* xb = x + 32 * j;
      float sum_x2 = 0.0f;
      for (int l = 0; l < 32; ++l) sum_x2 += xb[l] * xb[l];
      const float av_x = std::sqrt(sum_x2 / 32.0f);
      for (int l = 0; l < 32; ++l) w[l] = av_x + std::fabs(xb[l]);
      scales[j] = fit_q4k_sub(xb, w, L + 32 * j, &mins[j]);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
    const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
    uint8_t* sc = q + 4;
    for (int j = 0; j < 8; ++j) {
      // ggml stores nearest_int(...) into a uint8_t before MIN(63, .): keep the wrap-around
      uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]);
      uint8_t lm = (uint8_t)nearest_int(inv_min * mins[j]);
      ls = ls < 63 ? ls : 63;
      lm = lm < 63 ? lm : 63;
      if (j < 4) {
        sc[j] = ls;
        sc[j + 4] = lm;
      } else {
        sc[j + 4] = (uint8_t)((ls & 0x0F) | ((lm & 0x0F) << 4));
        sc[j - 4] |= (uint8_t)((ls >> 4) << 6);
        sc[j] |= (uint8_t)((lm >> 4) << 6);
      }
    }
    store_f16(q, max_scale / 63.0f);
    store_f16(q + 2, max_min / 63.0f);
    const float d_all = load_f16(q), dmin_all = load_f16(q + 2);
    // codes again, against the scales as stored (sub-blocks whose scale rounds to 0 keep the
    // codes of the fit, as ggml does)
    for (int j = 0; j < 8; ++j) {
      int s, m;
      q4k_scale_min(sc, j, &s, &m);
      const float d = d_all * (float)s;
      if (d == 0.0f) continue;
      const float dm = dmin_all * (float)m;
      for (int i = 0; i < 32; ++i) L[32 * j + i] = (uint8_t)clamp_i(nearest_int((x[32 * j + i] + dm) / d), 0, 15);
    }
    uint8_t* qs = q + 16;
    for (int c = 0; c < 4; ++c)
      for (int l = 0; l < 32; ++l) qs[32 * c + l] = (uint8_t)(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
  }
}

void dequantize_row_q4_k(const uint8_t* q, const uint8_t*, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  for (int64_t b = 0; b < k / QK_K; ++b, q += Q4_K_BYTES) {
    const float d = load_f16(q), dmin = load_f16(q + 2);
    const uint8_t* sc = q + 4;
    const uint8_t* qs = q + 16;
    for (int c = 0; c < 4; ++c, qs += 32) {
      int s0, m0, s1, m1;
      q4k_scale_min(sc, 2 * c, &s0, &m0);
      q4k_scale_min(sc, 2 * c + 1, &s1, &m1);
      const float d0 = d * (float)s0, dm0 = dmin * (float)m0;
      const float d1 = d * (float)s1, dm1 = dmin * (float)m1;
      for (int l = 0; l < 32; ++l) *y++ = d0 * (float)(qs[l] & 0x0F) - dm0;
      for (int l = 0; l < 32; ++l) *y++ = d1 * (float)(qs[l] >> 4) - dm1;
    }
  }
}

// ---------------------------------------------------------------- q6_k
// Block (210 bytes): ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d fp16.
// Per 128-element half h: ql[64h + l] = e(l) | e(l+64) << 4, ql[64h + 32 + l] = e(l+32) |
// e(l+96) << 4, qh[32h + l] = high bits of e(l), e(l+32), e(l+64), e(l+96) at bits 0, 2, 4, 6.
void quantize_row_q6_k(const float* x, int64_t k, uint8_t* q, uint8_t*, uint8_t*, const pqk_qparams&) {
  int8_t L[QK_K];
  float scales[16];
  for (int64_t b = 0; b < k / QK_K; ++b, x += QK_K, q += Q6_K_BYTES) {
    float max_scale = 0.0f, max_abs_scale = 0.0f;
    for (int ib = 0; ib < 16; ++ib) {
      scales[ib] = fit_q6k_sub(x + 16 * ib, L + 16 * ib);
      const float a = std::fabs(scales[ib]);
      if (a > max_abs_scale) { max_abs_scale = a; max_scale = scales[ib]; }
    }
    if (max_abs_scale < kGroupMaxEps) {  // all zero (d = +0)
      std::memset(q, 0, Q6_K_BYTES);
      continue;
    }
    uint8_t* ql = q;
    uint8_t* qh = q + 128;
    int8_t* sc = (int8_t*)(q + 192);
    const float iscale = -128.0f / max_scale;
    store_f16(q + 208, 1.0f / iscale);
    for (int ib = 0; ib < 16; ++ib) {
      const int v = nearest_int(iscale * scales[ib]);
      sc[ib] = (int8_t)(uint8_t)((v < 127 ? v : 127) & 0xFF);
    }
    const float d_all = load_f16(q + 208);
    for (int j = 0; j < 16; ++j) {
      const float d = d_all * (float)sc[j];
      if (d == 0.0f) continue;  // keep the fit's codes, as ggml does
      for (int i = 0; i < 16; ++i) L[16 * j + i] = (int8_t)(clamp_i(nearest_int(x[16 * j + i] / d), -32, 31) + 32);
    }
    for (int h = 0; h < 2; ++h) {
      const int8_t* e = L + 128 * h;
      for (int l = 0; l < 32; ++l) {
        ql[64 * h + l] = (uint8_t)((e[l] & 0x0F) | ((e[l + 64] & 0x0F) << 4));
        ql[64 * h + 32 + l] = (uint8_t)((e[l + 32] & 0x0F) | ((e[l + 96] & 0x0F) << 4));
        qh[32 * h + l] = (uint8_t)((e[l] >> 4) | ((e[l + 32] >> 4) << 2) | ((e[l + 64] >> 4) << 4) |
                                   ((e[l + 96] >> 4) << 6));
      }
    }
  }
}

void dequantize_row_q6_k(const uint8_t* q, const uint8_t*, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  for (int64_t b = 0; b < k / QK_K; ++b, q += Q6_K_BYTES) {
    const int8_t* sc = (const int8_t*)(q + 192);
    const float d = load_f16(q + 208);
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = q + 64 * h;
      const uint8_t* qh = q + 128 + 32 * h;
      // quarter i holds elements 32i + l of this half: low nibbles of ql[l] (i = 0), ql[32 + l]
      // (1), high nibbles of ql[l] (2), ql[32 + l] (3); high bits at 2i in qh[l]
      for (int i = 0; i < 4; ++i) {
        const uint8_t* lo = ql + 32 * (i & 1);
        const int shift = 4 * (i >> 1);
        for (int half = 0; half < 2; ++half, y += 16) {
          const float ds = d * (float)sc[8 * h + 2 * i + half];
          for (int l = 16 * half; l < 16 * half + 16; ++l) {
            const int c = (((lo[l] >> shift) & 0x0F) | (((qh[l] >> (2 * i)) & 3) << 4)) - 32;
            y[l - 16 * half] = ds * (float)c;
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------- iq4_nl
// Block (18 bytes): d fp16, qs[16] (byte j = element j low nibble | element j+16 high).
// Follows quantize_iq4_nl without imatrix (see the file comment for why this path).
void quantize_row_iq4_nl(const float* x, int64_t k, uint8_t* q, uint8_t*, uint8_t*, const pqk_qparams&) {
  constexpr int ntry = 7;
  for (int64_t b = 0; b < k / 32; ++b, x += 32, q += IQ4NL_BYTES) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; ++j) {
      const float ax = std::fabs(x[j]);
      if (ax > amax) { amax = ax; max = x[j]; }
    }
    float d = 0.0f;
    if (!(amax < kGroupMaxEps)) {
      d = -max / (float)kIQ4NL[0];
      float sumqx, sumq2;
      iq4nl_sums(x, 1.0f / d, &sumqx, &sumq2);
      d = sumq2 > 0 ? sumqx / sumq2 : 0.0f;
      float best = d * sumqx;
      for (int t = -ntry; t <= ntry; ++t) {
        iq4nl_sums(x, (float)(t + kIQ4NL[0]) / max, &sumqx, &sumq2);
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
          d = sumqx / sumq2;
          best = d * sumqx;
        }
      }
      // |x| beyond ~1.8e19: the x^2 weights overflow and inf / inf leaves d NaN, whose sign bit
      // is the CPU's (set on x86, clear on Arm): x86's, as llama.cpp writes there, everywhere
      if (d != d) d = bits_f32(0xFFC00000u);
    }
    store_f16(q, d);
    // codes against the unrounded scale (all-zero blocks: id = 0, every code is index(0) = 8)
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < 16; ++j) {
      const int lo = iq4nl_index(id * x[j]), hi = iq4nl_index(id * x[j + 16]);
      q[2 + j] = (uint8_t)(lo | (hi << 4));
    }
  }
}

}}  // namespace pqk::ref
