// ggml block-32 formats q4_0, q4_1, q8_0, iq4_nl (dequantize), bit-exact with ggml's
// *_ref functions and the gguf package. Nibbles: byte j = element j (low) | j+16 (high).
#include "ref_kernels.h"

namespace pqk { namespace ref {

// low byte of the x86-style conversion, then min(15, .) as ggml's MIN(15, (int8_t)v)
static inline uint8_t q4_code(float v) {
  int8_t c = (int8_t)(uint8_t)(cvtt_i32(v) & 0xff);
  return (uint8_t)(c < 15 ? (c < 0 ? 0 : c) : 15);
}

void quantize_row_q4_0(const float* x, int64_t k, uint8_t* q, uint8_t*, uint8_t*, const pqk_qparams&) {
  for (int64_t b = 0; b < k / 32; ++b, x += 32, q += Q4_0_BYTES) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; ++j) {
      float a = std::fabs(x[j]);
      if (amax < a) { amax = a; max = x[j]; }
    }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_f16(q, d);
    for (int j = 0; j < 16; ++j) {
      uint8_t lo = q4_code(x[j] * id + 8.5f), hi = q4_code(x[j + 16] * id + 8.5f);
      q[2 + j] = (uint8_t)(lo | (hi << 4));
    }
  }
}

void dequantize_row_q4_0(const uint8_t* q, const uint8_t*, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  for (int64_t b = 0; b < k / 32; ++b, q += Q4_0_BYTES, y += 32) {
    const float d = load_f16(q);
    for (int j = 0; j < 16; ++j) {
      y[j] = (float)((q[2 + j] & 0xf) - 8) * d;
      y[j + 16] = (float)((q[2 + j] >> 4) - 8) * d;
    }
  }
}

void quantize_row_q4_1(const float* x, int64_t k, uint8_t* q, uint8_t*, uint8_t*, const pqk_qparams&) {
  for (int64_t b = 0; b < k / 32; ++b, x += 32, q += Q4_1_BYTES) {
    float mn = x[0], mx = x[0];
    for (int j = 1; j < 32; ++j) { mn = x[j] < mn ? x[j] : mn; mx = x[j] > mx ? x[j] : mx; }
    const float d = (mx - mn) / 15.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_f16(q, d);
    store_f16(q + 2, mn);
    for (int j = 0; j < 16; ++j) {
      uint8_t lo = q4_code((x[j] - mn) * id + 0.5f), hi = q4_code((x[j + 16] - mn) * id + 0.5f);
      q[4 + j] = (uint8_t)(lo | (hi << 4));
    }
  }
}

void dequantize_row_q4_1(const uint8_t* q, const uint8_t*, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  for (int64_t b = 0; b < k / 32; ++b, q += Q4_1_BYTES, y += 32) {
    const float d = load_f16(q), m = load_f16(q + 2);
    for (int j = 0; j < 16; ++j) {
      y[j] = d * (float)(q[4 + j] & 0xf) + m;
      y[j + 16] = d * (float)(q[4 + j] >> 4) + m;
    }
  }
}

void quantize_row_q8_0(const float* x, int64_t k, uint8_t* q, uint8_t*, uint8_t*, const pqk_qparams&) {
  for (int64_t b = 0; b < k / 32; ++b, x += 32, q += Q8_0_BYTES) {
    const float amax = abs_max(x, 32);
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_f16(q, d);
    for (int j = 0; j < 32; ++j) q[2 + j] = (uint8_t)(round_away_i32(x[j] * id) & 0xff);
  }
}

void dequantize_row_q8_0(const uint8_t* q, const uint8_t*, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  for (int64_t b = 0; b < k / 32; ++b, q += Q8_0_BYTES, y += 32) {
    const float d = load_f16(q);
    for (int j = 0; j < 32; ++j) y[j] = (float)(int8_t)q[2 + j] * d;
  }
}

void dequantize_row_iq4_nl(const uint8_t* q, const uint8_t*, const uint8_t*, int64_t k, float* y, const pqk_qparams&) {
  for (int64_t b = 0; b < k / 32; ++b, q += IQ4NL_BYTES, y += 32) {
    const float d = load_f16(q);
    for (int j = 0; j < 16; ++j) {
      y[j] = d * (float)kIQ4NL[q[2 + j] & 0xf];
      y[j + 16] = d * (float)kIQ4NL[q[2 + j] >> 4];
    }
  }
}

}}  // namespace pqk::ref
