#include "../../core/kernel_table.h"
#include "kernels256.h"

namespace pqk { namespace avx2 {

uint64_t read_sum(const uint8_t* p, size_t n);  // read_sum.cpp
uint64_t int8_peak(int64_t iters);              // int8_peak.cpp
uint64_t fma_peak(int64_t iters);               // fma_peak.cpp

void register_kernels(KernelTable& t) {
  t.read_sum = read_sum;
  t.int8_peak = int8_peak;
  t.int8_peak_ops = 7 * 32 * 2;  // 7 maddubs x 32 multiply-adds
  t.fma_peak = fma_peak;
  t.fma_peak_flops = 12 * 8 * 2;  // 12 FMAs x 8 lanes
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
  PQK_GEMV_F32_FORMATS(PQK_GEMV_F32_REGISTER)
}

}}  // namespace pqk::avx2
