// Scalar reference kernels: the oracle every variant is tested against, and the fallback
// for slots no SIMD variant fills. Compiled with baseline flags and -ffp-contract=off.
#pragma once
#include "../common.h"

namespace pqk { namespace ref {

#define PQK_DECLARE_ROW_KERNELS(fmt)                                                                 \
  void quantize_row_##fmt(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t* z,             \
                          const pqk_qparams& p);                                                     \
  void dequantize_row_##fmt(const uint8_t* q, const uint8_t* s, const uint8_t* z, int64_t k, float* y, \
                            const pqk_qparams& p);

PQK_DECLARE_ROW_KERNELS(q4_0)
PQK_DECLARE_ROW_KERNELS(q4_1)
PQK_DECLARE_ROW_KERNELS(q8_0)
PQK_DECLARE_ROW_KERNELS(q4_k)
PQK_DECLARE_ROW_KERNELS(q6_k)
PQK_DECLARE_ROW_KERNELS(iq4_nl)
PQK_DECLARE_ROW_KERNELS(nf4)
PQK_DECLARE_ROW_KERNELS(int4)
PQK_DECLARE_ROW_KERNELS(int8)
PQK_DECLARE_ROW_KERNELS(int2)
PQK_DECLARE_ROW_KERNELS(int3)
PQK_DECLARE_ROW_KERNELS(fp4)

// max |x[j]| over n values (0 for none; the comparison keeps a NaN out, as the quantizers expect)
static inline float abs_max(const float* x, int64_t n) {
  float amax = 0.0f;
  for (int64_t j = 0; j < n; ++j) { const float a = std::fabs(x[j]); amax = amax > a ? amax : a; }
  return amax;
}

// bitsandbytes 4-bit layout (nf4, fp4): blocks of bs along the row, fp32 absmax per block in s,
// two codes per byte with the first element in the HIGH nibble; y = table[code] * absmax.
static inline void dequantize_row_bnb4(const float* table, const uint8_t* q, const uint8_t* s, int64_t k, float* y,
                                       int64_t bs) {
  for (int64_t b = 0; b < k / bs; ++b) {
    float amax;
    std::memcpy(&amax, s + 4 * b, 4);
    for (int64_t j = 0; j < bs; j += 2) {
      const uint8_t c = q[(b * bs + j) / 2];
      y[b * bs + j] = table[c >> 4] * amax;
      y[b * bs + j + 1] = table[c & 0xf] * amax;
    }
  }
}

}}  // namespace pqk::ref
#include "../../core/packed.h"
#include "../../core/kernel_table.h"
namespace pqk { namespace ref {
bool all_finite(const float* x, int64_t k, uint32_t e);
void quantize_act(const float* x, int64_t k, int8_t* xq, float* dx, int32_t* xs);
void gemm_int8(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
               const float* bias);
void lora_shrink(const pqk_lora& ad, int64_t r0, int64_t r1, int64_t k, const float* x, float* t);
void lora_expand(const LoraArgs& L, int64_t m0, int64_t m1, int64_t n0, int nr, float* y, int64_t ldy);
void gemm_f32(const float* w, int nr, int64_t k, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy,
              const float* bias);

// intN group parameters (maxq = 2^bits - 1) for one group of n values (shared by every variant so the scale
// and zero point, which are scalar per group, are computed by one piece of code).
// Returns the fp16-rounded scale as float in *sf, its fp16 bits in *s16 and the zero point.
static inline void intq_group_params(const float* x, int64_t n, bool sym, int maxq, float* sf, uint16_t* s16,
                                     int* zero) {
  float mn = 0.0f, mx = 0.0f;  // GPTQ: the range always includes 0
  for (int64_t i = 0; i < n; ++i) { mn = x[i] < mn ? x[i] : mn; mx = x[i] > mx ? x[i] : mx; }
  if (sym) {
    float a = -mn > mx ? -mn : mx;
    mn = -a; mx = a;
  }
  if (mn == 0.0f && mx == 0.0f) { mn = -1.0f; mx = 1.0f; }
  float scale = (mx - mn) / (float)maxq;
  if (scale > 65504.0f) scale = 65504.0f;  // fp16 saturates instead of becoming inf
  *s16 = fp32_to_fp16(scale);
  *sf = fp16_to_fp32(*s16);
  if (sym) *zero = (maxq + 1) / 2;
  else if (*sf == 0.0f) *zero = 0;
  else {
    int z = round_even_i32(-mn / *sf);
    *zero = z < 0 ? 0 : (z > maxq ? maxq : z);
  }
}

static inline void int4_group_params(const float* x, int64_t n, bool sym, float* sf, uint16_t* s16, int* zero) {
  intq_group_params(x, n, sym, 15, sf, s16, zero);
}

}}  // namespace pqk::ref
