#include "../../core/kernel_table.h"
#include "ref_kernels.h"

namespace pqk { namespace ref {

void register_kernels(KernelTable& t) {
#define PQK_SET(F, fmt)                         \
  t.quantize[F] = quantize_row_##fmt;           \
  t.dequantize[F] = dequantize_row_##fmt;
  PQK_SET(PQK_Q4_0, q4_0)
  PQK_SET(PQK_Q4_1, q4_1)
  PQK_SET(PQK_Q8_0, q8_0)
  PQK_SET(PQK_NF4, nf4)
  PQK_SET(PQK_INT4, int4)
  PQK_SET(PQK_INT8, int8)
  PQK_SET(PQK_INT2, int2)
  PQK_SET(PQK_INT3, int3)
  PQK_SET(PQK_FP4, fp4)
#undef PQK_SET
  t.all_finite = all_finite;
  t.quantize_act = quantize_act;
  t.gemm_int8 = gemm_int8;
  t.gemm_f32 = gemm_f32;
  t.lora_expand = lora_expand;
  t.lora_shrink = lora_shrink;
  t.dequantize[PQK_IQ4_NL] = dequantize_row_iq4_nl;
  // q4_k, q6_k and iq4_nl quantize: ref/kquants.cpp
  t.quantize[PQK_IQ4_NL] = quantize_row_iq4_nl;
  t.quantize[PQK_Q4_K] = quantize_row_q4_k; t.dequantize[PQK_Q4_K] = dequantize_row_q4_k;
  t.quantize[PQK_Q6_K] = quantize_row_q6_k; t.dequantize[PQK_Q6_K] = dequantize_row_q6_k;
}

}}  // namespace pqk::ref
