#include "../../core/kernel_table.h"
#include "kernels512.h"

namespace pqk { namespace avx512 {

uint64_t read_sum(const uint8_t* p, size_t n);  // read_sum.cpp
uint64_t fma_peak(int64_t iters);               // fma_peak.cpp

void register_kernels(KernelTable& t) {
  t.read_sum = read_sum;
  t.fma_peak = fma_peak;
  t.fma_peak_flops = 16 * 16 * 2;  // 16 FMAs x 16 lanes
#define PQK_SET(F, fmt)                \
  t.quantize[F] = quantize_row_##fmt;  \
  t.dequantize[F] = dequantize_row_##fmt;
  PQK_SET(PQK_Q8_0, q8_0)
  PQK_SET(PQK_Q4_0, q4_0)
  PQK_SET(PQK_Q4_1, q4_1)
  PQK_SET(PQK_NF4, nf4)
  PQK_SET(PQK_INT4, int4)
  PQK_SET(PQK_INT8, int8)
#undef PQK_SET
  t.dequantize[PQK_IQ4_NL] = dequantize_row_iq4_nl;
  t.dequantize[PQK_Q4_K] = dequantize_row_q4_k;
  t.dequantize[PQK_Q6_K] = dequantize_row_q6_k;
  t.dequantize[PQK_FP4] = dequantize_row_fp4;
  PQK_GEMV_F32_FORMATS(PQK_GEMV_F32_REGISTER)
}

}}  // namespace pqk::avx512
