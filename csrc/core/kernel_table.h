// One table of kernel pointers per ISA variant. Empty slots are filled from the variant
// below (avx512vnni <- avx512 <- avx2 <- ref), so every slot is always callable.
#pragma once
#include <cstddef>
#include <cstdint>
#include "pyqkern/pyqkern.h"

namespace pqk {

// One row: k floats -> q (codes / ggml blocks), s (scales), z (zeros) of that row.
using quantize_row_fn = void (*)(const float* x, int64_t k, uint8_t* q, uint8_t* s, uint8_t* z,
                                 const pqk_qparams& p);
// One row back to k floats.
using dequantize_row_fn = void (*)(const uint8_t* q, const uint8_t* s, const uint8_t* z,
                                   int64_t k, float* y, const pqk_qparams& p);

struct PackedWeight;
struct ActQ;

// Activations of one row: k floats -> xq int8 [k], dx [k/32], xs [k/16] (sums of xq per 16).
using quantize_act_fn = void (*)(const float* x, int64_t k, int8_t* xq, float* dx, int32_t* xs);
// One 16-row tile of y[m0:m1, 16*tile : 16*tile+16] from packed weights (int8 compute).
using gemm_int8_fn = void (*)(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1,
                              float* y, int64_t ldy, const float* bias);
// y[i, r] = dot(x[i, :k], w[r, :k]) (+ bias[r]) for r < nr, i < m: fp32 products, fp32 sums.
using gemm_f32_fn = void (*)(const float* w, int nr, int64_t k, const float* x, int64_t ldx, int64_t m,
                             float* y, int64_t ldy, const float* bias);

// Many rows (optional): y[i, r] (+ bias[r]) for i < mb <= XT_MB, r < nr <= 8 from w [nr][k] and a
// transposed activation panel xt [k][XT_MB] (rows i >= mb zero): per element one fused-multiply-add
// chain in k order, so a row's result does not depend on the panel it sits in.
constexpr int XT_MB = 32;
using gemm_f32_xt_fn = void (*)(const float* w, int nr, int64_t k, const float* xt, int mb, float* y, int64_t ldy,
                                const float* bias);

// Adapter epilogue over output rows [m0, m1) and columns [n0, n0 + nr): see LoraArgs.
struct LoraArgs {
  const pqk_lora* ad = nullptr;
  int32_t n_ad = 0;
  const int32_t* row_adapter = nullptr;  // null: all adapters on every row
  const float* t = nullptr;              // shrink results [m][t_cols]
  int64_t t_cols = 0;
  int64_t n = 0;                         // output columns
  const int64_t* t_off = nullptr;        // column offset of adapter a in t (all-adapters mode); 0 per-row mode
  const float* bias = nullptr;
};
// y[i, n] = ((y[i, n] + sum_a scale_a * sum_r t[i, off_a + r] * B_a[n, r]) * row_scale_a[n]) + bias[n]
// for the columns [n0, n0 + nr) (any range: B_a is read from its 16-row tiles Bp, see pqk_lora)
// with, per adapter, the rank sum in four fused-multiply-add chains (r % 4) added as
// (c0 + c1) + (c2 + c3), then scaled once.
using lora_expand_fn = void (*)(const LoraArgs& L, int64_t m0, int64_t m1, int64_t n0, int nr, float* y,
                                int64_t ldy);

// compute="float" for m rows of bfloat16 activations on one 16-row tile of packed 4-bit codes:
// y = x @ dequant(W).T (+ bias), exact products, fp32 sums (see x86_avx512bf16). parts = 1: x
// [m][ldx] bf16 bits (m <= 4); parts = 3: fp32 activations split exactly into three bf16 parts,
// part p at x + p * part_stride (m <= 2). Returns false, having written nothing, for cases it
// does not take (formats with a min term among them).
using gemv_bf16_fn = bool (*)(const PackedWeight& w, int64_t tile, const uint16_t* x, int64_t ldx, int64_t m,
                              int parts, int64_t part_stride, float* y, int64_t ldy, const float* bias);

// The same for fp32 activations on CPUs without the bf16 kernel (x86_avx2/gemv_f32_packed.cpp),
// m <= 8 rows of x [m][ldx] given pre-scaled: x[k] * 2^-gemv_f32p_shift(k % 32), every non-zero
// |x| in [2^-100, 2^101) before scaling, so every scaled value is normal. The same kind of sums as
// gemv_bf16 (per block, of exact (u - o) * x products, then scaled), so the same bound; the
// additions within a block come in another order, so the bits differ from gemv_bf16's and, as
// there, with m. Returns false, having written nothing, for the cases it does not take (formats
// with a min term, code books).
using gemv_f32p_fn = bool (*)(const PackedWeight& w, int64_t tile, const float* x, int64_t ldx, int64_t m, float* y,
                              int64_t ldy, const float* bias);
// The bit position of the nibble of block offset kk (k % 32) within its row's 32-bit lane of the
// packed layout (core/packed.h: byte kk % 4 of register (kk % 16) / 4, high nibble for kk >= 16),
// which the kernel leaves in place, so x comes scaled down by as much; the top nibble is shifted
// down instead, 0.
inline int gemv_f32p_shift(int64_t kk) {
  const int q = (int)(2 * (kk % 4) + kk / 16);
  return q == 7 ? 0 : 4 * q;
}

// compute="float" for m <= GEMV_F32_MAX_M activation rows straight from a format's canonical row
// bytes (optional, per format): y[i, r] (+ bias[r]) for weight rows r0 <= r < r1 and i < m, each
// weight decoded to the float dequantize_row gives, fp32 fused-multiply-add sums; a row's result
// does not depend on [r0, r1). Returns false, having written nothing, for parameters it does not
// take (r0 == r1 asks), or for a range it could not run (no memory for its scratch).
constexpr int GEMV_F32_MAX_M = 8;
using gemv_f32_fn = bool (*)(const uint8_t* q, const uint8_t* s, const uint8_t* z, const pqk_row_bytes& rb, int64_t r0,
                             int64_t r1, int64_t k, const pqk_qparams& p, const float* x, int64_t ldx, int64_t m,
                             float* y, int64_t ldy, const float* bias);

// t[r - r0] = dot(x[0:k], A[r, 0:k]) for adapter rows r in [r0, r1), A in the adapter's dtype.
using lora_shrink_fn = void (*)(const pqk_lora& ad, int64_t r0, int64_t r1, int64_t k, const float* x, float* t);

// true if every x[0, k) has an exponent field below e (e = 255: no NaN or Inf): the quantizers
// refuse non-finite input, and the int8 path x at or above its weight's limit (matmul.cpp's
// int8_x_exp_limit); this runs on every activation row before the kernels see it.
using all_finite_fn = bool (*)(const float* x, int64_t k, uint32_t e);

// The variant's int8 dot-product instruction (vpdpbusd) on 16 independent accumulators, iters
// times, for the benchmarks' compute ceiling; returns their sum so nothing is optimised away.
// int8_peak_ops: integer operations (2 per multiply-add) per iteration.
using int8_peak_fn = uint64_t (*)(int64_t iters);

// The variant's widest fp32 FMA on independent accumulators, iters times, for the benchmarks'
// float compute ceiling; returns a value of their sums so nothing is optimised away.
// fma_peak_flops: floating-point operations (2 per multiply-add) per iteration.
using fma_peak_fn = uint64_t (*)(int64_t iters);

// Sum of the 64-bit words of [p, p + n), n a multiple of 128, with the variant's widest loads:
// the loop of the read-bandwidth probe (read_probe.cpp).
using read_sum_fn = uint64_t (*)(const uint8_t* p, size_t n);

struct KernelTable {
  read_sum_fn read_sum = nullptr;
  int8_t read_sum_isa = 0;
  int8_peak_fn int8_peak = nullptr;
  int32_t int8_peak_ops = 0;
  int8_t int8_peak_isa = 0;
  fma_peak_fn fma_peak = nullptr;
  int32_t fma_peak_flops = 0;
  int8_t fma_peak_isa = 0;
  all_finite_fn all_finite = nullptr;
  int8_t all_finite_isa = 0;
  lora_expand_fn lora_expand = nullptr;
  lora_shrink_fn lora_shrink = nullptr;
  int8_t lora_expand_isa = 0, lora_shrink_isa = 0;
  gemv_bf16_fn gemv_bf16 = nullptr;  // optional (CPUs with AVX512-BF16)
  int8_t gemv_bf16_isa = 0;
  gemv_f32p_fn gemv_f32p = nullptr;  // optional (the AVX2 variant)
  int8_t gemv_f32p_isa = 0;
  quantize_act_fn quantize_act = nullptr;
  gemm_int8_fn gemm_int8 = nullptr;
  bool gemm_int8_xp = false;  // gemm_int8 reads ActQ::xp (the driver fills it only then)
  int32_t gemm_int8_xu_rows = 0;  // gemm_int8 reads ActQ::xu: the driver fills it for this many rows or more (0: never)
  gemm_f32_fn gemm_f32 = nullptr;
  int8_t quantize_act_isa = 0, gemm_int8_isa = 0, gemm_f32_isa = 0;
  gemm_f32_xt_fn gemm_f32_xt = nullptr;
  int8_t gemm_f32_xt_isa = 0;
  quantize_row_fn quantize[PQK_FORMAT_COUNT] = {};
  dequantize_row_fn dequantize[PQK_FORMAT_COUNT] = {};
  gemv_f32_fn gemv_f32[PQK_FORMAT_COUNT] = {};
  // Where each slot came from (for info() and tests): the pqk_isa that filled it.
  int8_t quantize_isa[PQK_FORMAT_COUNT] = {};
  int8_t dequantize_isa[PQK_FORMAT_COUNT] = {};
  int8_t gemv_f32_isa[PQK_FORMAT_COUNT] = {};
};

// Each ISA folder defines one of these; it only sets the slots it implements.
namespace ref { void register_kernels(KernelTable& t); }
namespace avx2 { void register_kernels(KernelTable& t); }
namespace avx512 { void register_kernels(KernelTable& t); }
namespace avx512vnni { void register_kernels(KernelTable& t); }
namespace avx512bf16 { void register_kernels(KernelTable& t); }  // only where the CPU has AVX512-BF16
namespace avxvnni { void register_kernels(KernelTable& t); }
namespace neon { void register_kernels(KernelTable& t); }     // csrc/kernels/arm_neon (aarch64 only)
namespace dotprod { void register_kernels(KernelTable& t); }  // csrc/kernels/arm_dotprod (aarch64 only)
// matmul kernels register separately (matmul_register.cpp in each folder)
namespace avx2 { void register_matmul_kernels(KernelTable& t); }
namespace avx512 { void register_matmul_kernels(KernelTable& t); }

// Table for a variant (must be runnable: check with isa_runnable first).
const KernelTable& kernel_table(int isa);
bool isa_compiled(int isa);
bool isa_runnable(int isa);
int active_isa();  // throws std::runtime_error if PYQKERN_ISA names a variant this CPU can't run

}  // namespace pqk
