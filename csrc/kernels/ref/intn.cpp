// int2, int3, int4: group-wise, GPTQ's quantizer (range widened to include 0; sym: +-amax and
// zero fixed at 2 / 4 / 8; asym: zero = round(-min/scale)), scale rounded to fp16 first and used
// for the codes, q = clamp(round_half_even(x / scale) + zero, 0, maxq), maxq = 3 / 7 / 15.
// Codes packed low bits first, the row read as a little-endian bit stream:
//   int4: element 2i in the LOW nibble of byte i, 2i+1 in the high one;
//   int2: byte i holds elements 4i..4i+3, element 4i+t in bits 2t..2t+1;
//   int3: element i in bits 3i..3i+2 (8 elements per 3 bytes; GPTQ's int3 packs 32 values into
//         three int32 words the same way).
// int2/int3 are scalar only (GPTQ targets; the matmul reads them through the packed layout's
// 4-bit lanes); int4 has SIMD quantizers that must match this one.
#include "ref_kernels.h"

namespace pqk { namespace ref {

namespace {

template <int BITS>
void put_code(uint8_t* q, int64_t i, int c) {
  const int64_t bit = BITS * i;
  const uint32_t v = (uint32_t)c << (bit & 7);
  q[bit >> 3] = (uint8_t)(q[bit >> 3] | (v & 0xFF));
  if ((bit & 7) + BITS > 8) q[(bit >> 3) + 1] = (uint8_t)(q[(bit >> 3) + 1] | (v >> 8));  // int3 straddles
}

template <int BITS>
int get_code(const uint8_t* q, int64_t i) {
  const int64_t bit = BITS * i;
  uint32_t v = q[bit >> 3];
  if ((bit & 7) + BITS > 8) v |= (uint32_t)q[(bit >> 3) + 1] << 8;
  return (int)((v >> (bit & 7)) & ((1u << BITS) - 1));
}

template <int BITS>
void quantize_row(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t* z, const pqk_qparams& p) {
  constexpr int maxq = (1 << BITS) - 1;
  const int64_t g = p.group == -1 ? k : p.group;
  std::memset(q, 0, (size_t)(k * BITS / 8));
  for (int64_t b = 0; b < k / g; ++b) {
    const float* xg = x + b * g;
    float sf; uint16_t s16; int zero;
    intq_group_params(xg, g, p.sym != 0, maxq, &sf, &s16, &zero);
    std::memcpy(s + 2 * b, &s16, 2);
    if (!p.sym) z[b] = (uint8_t)zero;
    for (int64_t j = 0; j < g; ++j) {
      int v = sf == 0.0f ? zero : round_even_i32(xg[j] / sf) + zero;
      put_code<BITS>(q, b * g + j, v < 0 ? 0 : (v > maxq ? maxq : v));
    }
  }
}

template <int BITS>
void dequantize_row(const uint8_t* q, const uint8_t* s, const uint8_t* z, int64_t k, float* y, const pqk_qparams& p) {
  const int64_t g = p.group == -1 ? k : p.group;
  for (int64_t b = 0; b < k / g; ++b) {
    uint16_t s16;
    std::memcpy(&s16, s + 2 * b, 2);
    const float sf = fp16_to_fp32(s16);
    const int zero = p.sym ? (1 << (BITS - 1)) : z[b];
    for (int64_t j = 0; j < g; ++j) y[b * g + j] = (float)(get_code<BITS>(q, b * g + j) - zero) * sf;
  }
}

}  // namespace

void quantize_row_int4(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t* z, const pqk_qparams& p) {
  quantize_row<4>(x, k, q, s, z, p);
}
void dequantize_row_int4(const uint8_t* q, const uint8_t* s, const uint8_t* z, int64_t k, float* y,
                         const pqk_qparams& p) {
  dequantize_row<4>(q, s, z, k, y, p);
}
void quantize_row_int2(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t* z, const pqk_qparams& p) {
  quantize_row<2>(x, k, q, s, z, p);
}
void dequantize_row_int2(const uint8_t* q, const uint8_t* s, const uint8_t* z, int64_t k, float* y,
                         const pqk_qparams& p) {
  dequantize_row<2>(q, s, z, k, y, p);
}
void quantize_row_int3(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t* z, const pqk_qparams& p) {
  quantize_row<3>(x, k, q, s, z, p);
}
void dequantize_row_int3(const uint8_t* q, const uint8_t* s, const uint8_t* z, int64_t k, float* y,
                         const pqk_qparams& p) {
  dequantize_row<3>(q, s, z, k, y, p);
}

}}  // namespace pqk::ref
