// The formats with a compute="float" decode kernel (gemv_f32 slot, see core/kernel_table.h) in the
// x86 folders, as an X-macro X(name, format id), and the kernels' signature. Macros only.
#pragma once

#define PQK_GEMV_F32_FORMATS(X)                                                                     \
  X(nf4, PQK_NF4) X(fp4, PQK_FP4) X(int4, PQK_INT4) X(q4_0, PQK_Q4_0) X(q4_1, PQK_Q4_1)               \
  X(iq4_nl, PQK_IQ4_NL) X(q8_0, PQK_Q8_0) X(q4_k, PQK_Q4_K) X(q6_k, PQK_Q6_K) X(int8, PQK_INT8)

#define PQK_GEMV_F32_SIGNATURE(fmt)                                                                 \
  bool gemv_f32_##fmt(const uint8_t* q, const uint8_t* s, const uint8_t* z, const pqk_row_bytes& rb, int64_t r0, \
                      int64_t r1, int64_t k, const pqk_qparams& p, const float* x, int64_t ldx, int64_t m,   \
                      float* y, int64_t ldy, const float* bias)
#define PQK_GEMV_F32_DECLARE(fmt, id) PQK_GEMV_F32_SIGNATURE(fmt);
#define PQK_GEMV_F32_REGISTER(fmt, id) t.gemv_f32[id] = gemv_f32_##fmt;
