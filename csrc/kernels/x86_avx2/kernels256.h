// Row kernels of the AVX2 folder (namespace pqk::avx2), registered in register.cpp.
#pragma once
#include <cstdint>

#include "pyqkern/pyqkern.h"
#include "../gemv_f32_list.h"

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

PQK_GEMV_F32_FORMATS(PQK_GEMV_F32_DECLARE)
#undef PQK_AVX2_QUANTIZE
#undef PQK_AVX2_DEQUANTIZE

}}  // namespace pqk::avx2
