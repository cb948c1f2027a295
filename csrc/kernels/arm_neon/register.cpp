// ARMv8.0 NEON variant (aarch64 only): fills the slots it implements; the rest come from ref.
#include "../../core/kernel_table.h"
#include "../../core/packed.h"

namespace pqk { namespace neon {

void quantize_row_q8_0(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t* z, const pqk_qparams& p);
void dequantize_row_q8_0(const uint8_t* q, const uint8_t* s, const uint8_t* z, int64_t k, float* y,
                         const pqk_qparams& p);
void quantize_row_q4_0(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t* z, const pqk_qparams& p);
void dequantize_row_q4_0(const uint8_t* q, const uint8_t* s, const uint8_t* z, int64_t k, float* y,
                         const pqk_qparams& p);
void quantize_row_nf4(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t* z, const pqk_qparams& p);
void dequantize_row_nf4(const uint8_t* q, const uint8_t* s, const uint8_t* z, int64_t k, float* y,
                        const pqk_qparams& p);
void quantize_row_int4(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t* z, const pqk_qparams& p);
void dequantize_row_int4(const uint8_t* q, const uint8_t* s, const uint8_t* z, int64_t k, float* y,
                         const pqk_qparams& p);
void gemm_int8(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
               const float* bias);
void quantize_act(const float* x, int64_t k, int8_t* xq, float* dx, int32_t* xs);  // quantize_act.cpp
void gemm_f32(const float* w, int nr, int64_t k, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy,
              const float* bias);  // matmul_f32.cpp
void lora_shrink(const pqk_lora& ad, int64_t r0, int64_t r1, int64_t k, const float* x, float* t);  // lora.cpp
void lora_expand(const LoraArgs& L, int64_t m0, int64_t m1, int64_t n0, int nr, float* y, int64_t ldy);
uint64_t fma_peak(int64_t iters);  // fma_peak.cpp

void register_kernels(KernelTable& t) {
  t.quantize[PQK_Q8_0] = quantize_row_q8_0;
  t.dequantize[PQK_Q8_0] = dequantize_row_q8_0;
  t.quantize[PQK_Q4_0] = quantize_row_q4_0;
  t.dequantize[PQK_Q4_0] = dequantize_row_q4_0;
  t.quantize[PQK_NF4] = quantize_row_nf4;
  t.dequantize[PQK_NF4] = dequantize_row_nf4;
  t.quantize[PQK_INT4] = quantize_row_int4;
  t.dequantize[PQK_INT4] = dequantize_row_int4;
  t.quantize_act = quantize_act;
  t.gemm_int8 = gemm_int8;
  t.gemm_f32 = gemm_f32;
  t.lora_shrink = lora_shrink;
  t.lora_expand = lora_expand;
  t.fma_peak = fma_peak;
  t.fma_peak_flops = 12 * 4 * 2;  // 12 FMAs x 4 lanes
}

}}  // namespace pqk::neon
