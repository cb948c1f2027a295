/* pyqkern C ABI, version 1.
 *
 * Plain C: fixed-width types, status codes, no exceptions or C++ types cross it.
 * Every call that can fail returns a pqk_status; on failure pqk_last_error() gives a message
 * (thread-local, valid until the next call on the same thread). The queries returning int32_t /
 * int64_t / strings do not fail: bad arguments give the documented value (0, -1, "").
 *
 * Quantized tensors are stored row-major, [n rows (output channels), k columns
 * (input features)], as up to three sections, each row-contiguous:
 *   q: codes / ggml blocks   (row_bytes.q bytes per row)
 *   s: scales                (row_bytes.s bytes per row; fp16 for int2/3/4, fp32 for nf4/fp4/int8)
 *   z: zero points           (row_bytes.z bytes per row; uint8, int4 asymmetric only)
 * ggml formats use only q, holding exactly the ggml block bytes.
 */
#ifndef PYQKERN_H
#define PYQKERN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PQK_ABI_VERSION 1

#if defined(_WIN32)
#define PQK_API __declspec(dllexport)
#else
#define PQK_API __attribute__((visibility("default")))
#endif

typedef enum pqk_status {
  PQK_OK = 0,
  PQK_ERR_ARG = 1,         /* null pointer, bad enum value, bad parameter */
  PQK_ERR_SHAPE = 2,       /* k not a multiple of the block, negative sizes, sizes beyond the limits:
                            * any one of n, k, m or a row stride > 2^40, or rows x row length
                            * (n x k, m x ldx, m x ldy) > 2^56 elements */
  PQK_ERR_NONFINITE = 3,   /* NaN or Inf where the format cannot represent it */
  PQK_ERR_UNSUPPORTED = 4, /* op not available for this format */
  PQK_ERR_ISA = 5,         /* variant not compiled in or not runnable on this CPU (also a bad
                            * PYQKERN_ISA, for calls with PQK_ISA_ACTIVE) */
  PQK_ERR_NOMEM = 6,
  PQK_ERR_INTERNAL = 7
} pqk_status;

typedef enum pqk_format {
  PQK_Q4_0 = 0,
  PQK_Q4_1 = 1,
  PQK_Q8_0 = 2,
  PQK_Q4_K = 3,
  PQK_Q6_K = 4,
  PQK_IQ4_NL = 5,
  PQK_NF4 = 6,
  PQK_INT4 = 7,
  PQK_INT8 = 8,
  PQK_INT2 = 9,  /* group-wise like int4, 4 codes per byte (low bits first) */
  PQK_INT3 = 10, /* group-wise like int4, little-endian 3-bit stream (8 codes per 3 bytes) */
  PQK_FP4 = 11,  /* bitsandbytes FP4: as nf4 (fp32 absmax per block, high nibble first), FP4 code book */
  PQK_FORMAT_COUNT = 12
} pqk_format;

typedef enum pqk_isa {
  PQK_ISA_ACTIVE = -1, /* whatever dispatch picked for this process */
  PQK_ISA_REF = 0,
  PQK_ISA_AVX2 = 1,        /* AVX2 + FMA + F16C */
  PQK_ISA_AVX512 = 2,      /* AVX-512 F/BW/VL/DQ */
  PQK_ISA_AVX512VNNI = 3,  /* AVX-512 F/BW/VL/DQ + VNNI */
  PQK_ISA_NEON = 4,        /* AArch64 Advanced SIMD (ARMv8.0) */
  PQK_ISA_DOTPROD = 5,     /* AArch64 NEON + dot product (ARMv8.2 SDOT/UDOT) */
  PQK_ISA_AVXVNNI = 6,     /* AVX2 + FMA + F16C + AVX-VNNI (VEX vpdpbusd; Alder Lake and later, no AVX-512) */
  PQK_ISA_COUNT = 7
} pqk_isa;

/* Format parameters. Zero-initialise and set what applies.
 *   group: nf4 / fp4 block size (default 64, power of two 32..4096);
 *          int2/int3/int4 group size (default 128, power of two >= 16, or -1 = per-channel).
 *   sym:   int2/int3/int4 only: 1 = symmetric (zero point fixed at 2/4/8, no z section). */
typedef struct pqk_qparams {
  int32_t group;
  int32_t sym;
} pqk_qparams;

typedef struct pqk_row_bytes {
  int64_t q, s, z;
} pqk_row_bytes;

PQK_API int32_t pqk_abi_version(void);
PQK_API const char* pqk_last_error(void);
PQK_API const char* pqk_format_name(int32_t fmt);
PQK_API const char* pqk_isa_name(int32_t isa);

/* 1 if the variant is compiled in and this CPU + OS can run it. */
PQK_API int32_t pqk_isa_runnable(int32_t isa);
/* The variant used for PQK_ISA_ACTIVE (picked once; PYQKERN_ISA env var forces one). */
PQK_API pqk_status pqk_active_isa(int32_t* isa);
/* 1 if the variant is compiled into this library (whether or not this CPU can run it). */
PQK_API int32_t pqk_isa_compiled(int32_t isa);
/* CPU brand string ("" if unknown). */
PQK_API const char* pqk_cpu_brand(void);
/* Which variant implements a kernel slot in variant isa's table: slot is one of "quantize",
 * "dequantize" (fmt selects the format), "quantize_act", "gemm_int8", "gemm_f32", "gemm_f32_xt",
 * "lora_shrink", "lora_expand", "gemv_bf16", "gemv_f32p", "all_finite", "int8_peak", "fma_peak", "gemv_f32"
 * (fmt selects the format: compute="float"'s row kernel); isa may be PQK_ISA_ACTIVE. Returns the
 * pqk_isa id, or -1 if the slot is empty or the arguments are bad. */
PQK_API int32_t pqk_slot_variant(int32_t isa, const char* slot, int32_t fmt);
/* Space-separated CPU feature names detected (e.g. "sse4.2 avx2 fma f16c avx512f ..."). */
PQK_API const char* pqk_cpu_features(void);

/* The library's thread pool (default: the CPUs this process may run on, its affinity mask).
 * n <= 0: that default; n > PQK_MAX_THREADS: PQK_ERR_ARG. PQK_ERR_NOMEM if the OS refuses a thread: the
 * pool then runs on 1.
 * Calls from several host threads are safe; while one of them uses the pool, the others run on
 * their own thread rather than wait for it (results never depend on the thread count). */
#define PQK_MAX_THREADS 1024
PQK_API pqk_status pqk_set_num_threads(int32_t n);
PQK_API int32_t pqk_get_num_threads(void);
/* Read-bandwidth probe: reads the nbytes at buf (>= 4096, a multiple of 128)
 * with the widest loads the CPU has (64-byte on AVX-512, 32-byte on AVX2, else 16-byte), split
 * over the library's threads as a GEMV is, and stores the best seconds of its passes (they go
 * on until reps of them had every thread take part, or for ~1 s: a pool thread can take tens of
 * ms to start on a VM), and, if checksum is not NULL, the sum of the
 * buffer's 64-bit words (each pass's, checked equal, so the reads cannot be skipped). nbytes
 * over the weight size of a layer gives the ceiling of a GEMV whose weight stays in cache;
 * over much more than the L3, the memory's. */
PQK_API pqk_status pqk_read_probe(const void* buf, int64_t nbytes, int32_t reps, double* best_seconds,
                                  uint64_t* checksum);
/* Int8 compute ceiling: every thread of the library's pool runs variant isa's int8 dot-product
 * instruction (vpdpbusd on avx512vnni and avxvnni) on independent accumulators; *gops = integer
 * operations (2 per multiply-add) per second over all threads, the best of passes of ~1 ms per
 * thread that go on until reps of them had every thread take part (or for ~1 s).
 * PQK_ERR_UNSUPPORTED for variants without such an instruction probe. */
PQK_API pqk_status pqk_int8_peak(int32_t isa, int32_t reps, double* gops);
/* Float compute ceiling, the same way: variant isa's widest fp32 FMA (512-bit on avx512 and its
 * descendants, 256-bit on avx2 / avxvnni, 128-bit on neon / dotprod) on independent
 * accumulators; *gflops = floating-point operations (2 per multiply-add) per second over all
 * threads. PQK_ERR_UNSUPPORTED for ref. */
PQK_API pqk_status pqk_fma_peak(int32_t isa, int32_t reps, double* gflops);

/* Resolves defaults in *params (group 0 -> the format's default) and checks them. */
PQK_API pqk_status pqk_row_bytes_of(int32_t fmt, int64_t k, pqk_qparams* params, pqk_row_bytes* out);

/* x: n rows of k floats, row i at x + i*ldx (ldx >= k, in elements).
 * q/s/z: sections as described above (s, z may be NULL when their row size is 0).
 * NaN/Inf in x -> PQK_ERR_NONFINITE. Finite weights beyond a format's fp16 scale range give
 * the bytes ggml's quantizers give (an Inf scale; q4_k / q6_k beyond ~2^64 zero blocks; int2/3/4
 * a scale clamped to 65504); the Python API checks the result and warns. */
PQK_API pqk_status pqk_quantize(int32_t isa, int32_t fmt, const float* x, int64_t n, int64_t k,
                                int64_t ldx, const pqk_qparams* params, void* q, void* s, void* z);
PQK_API pqk_status pqk_dequantize(int32_t isa, int32_t fmt, const void* q, const void* s,
                                  const void* z, int64_t n, int64_t k, const pqk_qparams* params,
                                  float* y);

/* ---- matmul: y[m, n] = x[m, :] . W[n, :] (+ bias[n]) ------------------------------------ */
/* y may overlap x (out = x: x is copied first); the weight, bias, adapters and row ids must not
 * overlap y. */

/* Prepacked weight for compute="int8" (opaque; see csrc/core/packed.h for the arithmetic). */
typedef struct pqk_packed pqk_packed;

/* 1 if compute="int8" is available for this format/K/params (K % 32 == 0; int4 group >= 32). */
PQK_API int32_t pqk_int8_supported(int32_t fmt, int64_t k, const pqk_qparams* params);
/* Packs n > 0 rows for the int8 matmul into a new *out (free with pqk_packed_free); *out is
 * NULL after any failure. */
PQK_API pqk_status pqk_pack(int32_t fmt, const void* q, const void* s, const void* z, int64_t n, int64_t k,
                            const pqk_qparams* params, pqk_packed** out);
PQK_API void pqk_packed_free(pqk_packed* w);
PQK_API int64_t pqk_packed_nbytes(const pqk_packed* w);

/* compute="int8": activations quantized per block of 32 (dx = amax/127, xq = rint(x / dx)),
 * integer dot products; bit-identical across variants and thread counts. x: m rows, row
 * stride ldx floats; y: m rows, row stride ldy floats; bias may be NULL.
 * NaN/Inf in x, or |x| so large that the fp32 products of the block scales and dx could
 * overflow (from 2^(e - 127), e from the weight's largest scale and min: 2^102 for q4_0 with
 * fp16 scales up to 65504) -> PQK_ERR_NONFINITE. */
PQK_API pqk_status pqk_matmul_int8(int32_t isa, const pqk_packed* w, const float* x, int64_t m, int64_t ldx,
                                   const float* bias, float* y, int64_t ldy);
/* Low-rank adapters for the fused matmul: y += scale * (x . A^T) . B^T (LoRA), then y *= row_scale
 * (DoRA: m / ||W + scale*B*A|| per output row), then y += bias. A is [rank, k] row-major.
 * Bp is B [n, rank] in tiles of 16 output rows: Bp[((j / 16) * rank + r) * 16 + j % 16] = B[j, r],
 * [ceil(n/16)][rank][16] with zero padding, so each output tile reads one contiguous block. */
typedef struct pqk_lora {
  int32_t rank;
  const void* A;          /* elements of type dtype */
  const void* Bp;         /* elements of type dtype */
  float scale;
  const float* row_scale; /* [n] or NULL */
  int32_t dtype;          /* A and Bp: 0 = fp32, 1 = fp16, 2 = bf16 (widened exactly to fp32) */
} pqk_lora;

/* int8 / float matmul with adapters. row_adapter: NULL = every adapter applies to every row
 * (their terms add up; with more than one adapter, row_scale must then be NULL: a DoRA rescale
 * does not sum), else row_adapter[i] in [-1, n_adapters)
 * picks row i's adapter (-1: none). The adapter part is fp32 (shrink, then expansion added to
 * each range of output tiles right after the base kernel wrote it). */
PQK_API pqk_status pqk_matmul_int8_lora(int32_t isa, const pqk_packed* w, const float* x, int64_t m, int64_t ldx,
                                        const float* bias, float* y, int64_t ldy, const pqk_lora* adapters,
                                        int32_t n_adapters, const int32_t* row_adapter);
PQK_API pqk_status pqk_matmul_float_lora(int32_t isa, int32_t fmt, const void* q, const void* s, const void* z,
                                         int64_t n, int64_t k, const pqk_qparams* params, const float* x, int64_t m,
                                         int64_t ldx, const float* bias, float* y, int64_t ldy,
                                         const pqk_lora* adapters, int32_t n_adapters, const int32_t* row_adapter);

/* compute="float" for bfloat16 activations (x: m rows of bf16 bits, row stride ldx) on a packed
 * weight: y = x @ dequant(W).T (+ adapters, as pqk_matmul_float_lora) (+ bias) with exact
 * products and fp32 sums. Taken by 4-bit codes without a code book or a min term (q4_0,
 * int2/int3/int4) for m <= 4 on CPUs with AVX512-BF16, and (m <= 8) in the AVX2 / AVX-VNNI
 * variants by their fp32 kernel (x widened exactly; (u - o) * x fused in each multiply-add, block
 * sums then scaled, in another order);
 * PQK_ERR_UNSUPPORTED otherwise (the AVX-512 variants without AVX512-BF16 among them; q4_1 and
 * q4_k too: summing a * code * x and m * x apart could cancel far beyond the fp32 bound; and
 * weights with a non-finite scale), and for x holding 0 < |x| < 2^-100 (the instruction reads bf16
 * denormals as zero and flushes sums below 2^-126), NaN/Inf or |x| >= 2^101 (the kernel sums
 * code * x before scaling, which could overflow where the fp32 route does not): callers then
 * widen x to fp32 and use pqk_matmul_float(_lora). adapters may be NULL (n_adapters 0). */
PQK_API pqk_status pqk_matmul_float_bf16(int32_t isa, const pqk_packed* w, const uint16_t* x, int64_t m,
                                         int64_t ldx, const float* bias, float* y, int64_t ldy,
                                         const pqk_lora* adapters, int32_t n_adapters, const int32_t* row_adapter);
/* The same for float32 activations: m <= 2 for the AVX512-BF16 kernel (each x split exactly into
 * three bf16 parts, x = x1 + x2 + x3, so products stay exact), m <= 8 for the AVX2 fp32 one;
 * PQK_ERR_UNSUPPORTED for the same x (NaN/Inf, |x| >= 2^101, 0 < |x| < 2^-100; for the
 * AVX512-BF16 kernel also x that rounds to 2^101 in bf16, i.e. |x| >= (2 - 2^-8) * 2^100). */
PQK_API pqk_status pqk_matmul_float_packed(int32_t isa, const pqk_packed* w, const float* x, int64_t m,
                                           int64_t ldx, const float* bias, float* y, int64_t ldy,
                                           const pqk_lora* adapters, int32_t n_adapters,
                                           const int32_t* row_adapter);

/* compute="float": weights dequantized exactly (as pqk_dequantize) and multiplied in fp32. */
PQK_API pqk_status pqk_matmul_float(int32_t isa, int32_t fmt, const void* q, const void* s, const void* z,
                                    int64_t n, int64_t k, const pqk_qparams* params, const float* x, int64_t m,
                                    int64_t ldx, const float* bias, float* y, int64_t ldy);

#ifdef __cplusplus
}
#endif
#endif /* PYQKERN_H */
