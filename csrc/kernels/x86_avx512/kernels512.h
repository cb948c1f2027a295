// Row kernels of the AVX-512 folder (namespace pqk::avx512), registered in register.cpp.
#pragma once
#include <cstdint>

#include "pyqkern/pyqkern.h"
#include "../gemv_f32_list.h"

namespace pqk { namespace avx512 {

#define PQK_AVX512_QUANTIZE(fmt)                                                                   \
  void quantize_row_##fmt(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t* z, const pqk_qparams& p);
#define PQK_AVX512_DEQUANTIZE(fmt)                                                                 \
  void dequantize_row_##fmt(const uint8_t* q, const uint8_t* s, const uint8_t* z, int64_t k, float* y, \
                            const pqk_qparams& p);

PQK_AVX512_QUANTIZE(q8_0) PQK_AVX512_DEQUANTIZE(q8_0)
PQK_AVX512_QUANTIZE(q4_0) PQK_AVX512_DEQUANTIZE(q4_0)
PQK_AVX512_QUANTIZE(q4_1) PQK_AVX512_DEQUANTIZE(q4_1)
PQK_AVX512_DEQUANTIZE(iq4_nl)
PQK_AVX512_DEQUANTIZE(q4_k)
PQK_AVX512_DEQUANTIZE(q6_k)
PQK_AVX512_DEQUANTIZE(fp4)
PQK_AVX512_QUANTIZE(nf4) PQK_AVX512_DEQUANTIZE(nf4)
PQK_AVX512_QUANTIZE(int4) PQK_AVX512_DEQUANTIZE(int4)
PQK_AVX512_QUANTIZE(int8) PQK_AVX512_DEQUANTIZE(int8)

PQK_GEMV_F32_FORMATS(PQK_GEMV_F32_DECLARE)
#undef PQK_AVX512_QUANTIZE
#undef PQK_AVX512_DEQUANTIZE

}}  // namespace pqk::avx512
