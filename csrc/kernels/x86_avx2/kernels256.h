// Row kernels of the AVX2 folder (namespace pqk::avx2), registered in register.cpp.
#pragma once
#include <cstdint>

#include "pyqkern/pyqkern.h"

namespace pqk { namespace avx2 {

#define PQK_AVX2_QUANTIZE(fmt)                                                                   \
  void quantize_row_##fmt(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t* z, const pqk_qparams& p);
#define PQK_AVX2_DEQUANTIZE(fmt)                                                                 \
  void dequantize_row_##fmt(const uint8_t* q, const uint8_t* s, const uint8_t* z, int64_t k, float* y, \
                            const pqk_qparams& p);

PQK_AVX2_QUANTIZE(q8_0) PQK_AVX2_DEQUANTIZE(q8_0)
PQK_AVX2_QUANTIZE(q4_0) PQK_AVX2_DEQUANTIZE(q4_0)
PQK_AVX2_QUANTIZE(q4_1) PQK_AVX2_DEQUANTIZE(q4_1)
PQK_AVX2_DEQUANTIZE(iq4_nl)
PQK_AVX2_QUANTIZE(nf4) PQK_AVX2_DEQUANTIZE(nf4)
PQK_AVX2_QUANTIZE(int4) PQK_AVX2_DEQUANTIZE(int4)
PQK_AVX2_QUANTIZE(int8) PQK_AVX2_DEQUANTIZE(int8)

#define PQK_AVX2_GEMV_F32(fmt)                                                                        \
  bool gemv_f32_##fmt(const uint8_t* q, const uint8_t* s, const uint8_t* z, const pqk_row_bytes& rb, int64_t r0,  \
                      int64_t r1, int64_t k, const pqk_qparams& p, const float* x, int64_t ldx, int64_t m,    \
                      float* y, int64_t ldy, const float* bias);
PQK_AVX2_GEMV_F32(nf4) PQK_AVX2_GEMV_F32(fp4) PQK_AVX2_GEMV_F32(int4) PQK_AVX2_GEMV_F32(q4_0)
PQK_AVX2_GEMV_F32(q4_1) PQK_AVX2_GEMV_F32(iq4_nl) PQK_AVX2_GEMV_F32(q8_0) PQK_AVX2_GEMV_F32(q4_k)
PQK_AVX2_GEMV_F32(q6_k) PQK_AVX2_GEMV_F32(int8)

#undef PQK_AVX2_GEMV_F32
#undef PQK_AVX2_QUANTIZE
#undef PQK_AVX2_DEQUANTIZE

}}  // namespace pqk::avx2
