#include "../../core/kernel_table.h"
#include "kernels256.h"

namespace pqk { namespace avx2 {

void register_kernels(KernelTable& t) {
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
  t.gemv_f32[PQK_NF4] = gemv_f32_nf4;
  t.gemv_f32[PQK_FP4] = gemv_f32_fp4;
  t.gemv_f32[PQK_INT4] = gemv_f32_int4;
  t.gemv_f32[PQK_Q4_0] = gemv_f32_q4_0;
  t.gemv_f32[PQK_Q4_1] = gemv_f32_q4_1;
  t.gemv_f32[PQK_IQ4_NL] = gemv_f32_iq4_nl;
  t.gemv_f32[PQK_Q8_0] = gemv_f32_q8_0;
  t.gemv_f32[PQK_Q4_K] = gemv_f32_q4_k;
  t.gemv_f32[PQK_Q6_K] = gemv_f32_q6_k;
  t.gemv_f32[PQK_INT8] = gemv_f32_int8;
}

}}  // namespace pqk::avx2
