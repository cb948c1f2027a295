// fp4 (bitsandbytes FP4): the nf4 layout (blocks of p.group along the row, fp32 absmax per block
// in s, two codes per byte with the first element in the HIGH nibble) with bitsandbytes' FP4
// code book (kFP4, bit-pattern order, sign in bit 3).
// Quantize: v = x * (1 / max(absmax, 1e-38)) in fp32, the product bitsandbytes forms (its
// CPU/torch path clamps absmax to 1e-38 for the reciprocal, which also makes an all-zero block
// code 0 without a special case); code = fp4_index(v). Dequantize: kFP4[c] * absmax.
// Scalar only (the int8 matmul reads fp4 through the packed layout's 16-entry LUT).
#include "ref_kernels.h"

namespace pqk { namespace ref {

void quantize_row_fp4(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t*, const pqk_qparams& p) {
  const int64_t bs = p.group;
  for (int64_t b = 0; b < k / bs; ++b) {
    const float* xb = x + b * bs;
    const float amax = abs_max(xb, bs);
    std::memcpy(s + 4 * b, &amax, 4);
    const float r = bnb_recip(amax);
    uint8_t* qb = q + b * bs / 2;
    for (int64_t j = 0; j < bs; j += 2)
      qb[j / 2] = (uint8_t)((fp4_index(xb[j] * r) << 4) | fp4_index(xb[j + 1] * r));
  }
}

void dequantize_row_fp4(const uint8_t* q, const uint8_t* s, const uint8_t*, int64_t k, float* y, const pqk_qparams& p) {
  dequantize_row_bnb4(kFP4, q, s, k, y, p.group);
}

}}  // namespace pqk::ref
