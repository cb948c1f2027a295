// nf4 (bitsandbytes) and int8 (per-channel) rows (int2/int3/int4: intn.cpp).
#include "ref_kernels.h"

namespace pqk { namespace ref {

// nf4: blocks of p.group along the row; absmax fp32 in s; codes two per byte, the first
// element in the HIGH nibble (bitsandbytes order). Code = nf4_index(x * (1 / max(absmax, 1e-38)))
// as bitsandbytes (common.h); an all-zero block stores code 7 (0.0).
void quantize_row_nf4(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t*, const pqk_qparams& p) {
  const int64_t bs = p.group;
  for (int64_t b = 0; b < k / bs; ++b) {
    const float* xb = x + b * bs;
    const float amax = abs_max(xb, bs);
    std::memcpy(s + 4 * b, &amax, 4);
    uint8_t* qb = q + b * bs / 2;
    const float r = bnb_recip(amax);
    for (int64_t j = 0; j < bs; j += 2) {
      uint8_t hi = nf4_index(xb[j] * r);
      uint8_t lo = nf4_index(xb[j + 1] * r);
      qb[j / 2] = (uint8_t)((hi << 4) | lo);
    }
  }
}

void dequantize_row_nf4(const uint8_t* q, const uint8_t* s, const uint8_t*, int64_t k, float* y, const pqk_qparams& p) {
  dequantize_row_bnb4(kNF4, q, s, k, y, p.group);
}

// int8: symmetric per row, fp32 scale = amax/127, q = round_half_even(x / scale).
void quantize_row_int8(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t*, const pqk_qparams&) {
  const float amax = abs_max(x, k);
  const float scale = amax / 127.0f;
  std::memcpy(s, &scale, 4);
  for (int64_t j = 0; j < k; ++j) {
    int v = scale == 0.0f ? 0 : round_even_i32(x[j] / scale);
    v = v < -127 ? -127 : (v > 127 ? 127 : v);
    q[j] = (uint8_t)(int8_t)v;
  }
}

void dequantize_row_int8(const uint8_t* q, const uint8_t* s, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  float scale;
  std::memcpy(&scale, s, 4);
  for (int64_t j = 0; j < k; ++j) y[j] = (float)(int8_t)q[j] * scale;
}

}}  // namespace pqk::ref
