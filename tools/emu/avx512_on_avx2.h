// Test-only (tools/x86_emu_check.sh): force-included into the AVX-512 and AVX-VNNI folders when
// they are compiled for a CPU without those extensions (-DPYQKERN_EMULATE_AVX512=<SIMDe include
// dir>). SIMDe maps each intrinsic to AVX2 or scalar code of the same meaning, so the kernels'
// logic (masks, lane orders, tails, integer sums) runs and is checked against ref where the CPU
// cannot run the real instructions (this Zen 3; QEMU 7.2 has no AVX-512). Speed means nothing
// there. Below: what SIMDe 0.8.2 lacks, written from Intel's definitions, and the operations
// the kernels issue as inline asm (PQK_SIMDE_EMULATION selects these instead).
#pragma once
#include <immintrin.h>
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PQK_SIMDE_EMULATION 1

static inline simde__m128i pqk_emu_cvtepi32_epi8(simde__m512i a) {  // truncation
  simde__m512i_private p = simde__m512i_to_private(a);
  simde__m128i_private r;
  for (int i = 0; i < 16; ++i) r.i8[i] = (int8_t)p.i32[i];
  return simde__m128i_from_private(r);
}
static inline simde__m128i pqk_emu_cvtepi16_epi8_256(simde__m256i a) {  // truncation
  simde__m256i_private p = simde__m256i_to_private(a);
  simde__m128i_private r;
  for (int i = 0; i < 16; ++i) r.i8[i] = (int8_t)p.i16[i];
  return simde__m128i_from_private(r);
}
static inline simde__m512i pqk_emu_cvtepu8_epi32(simde__m128i a) {
  simde__m128i_private p = simde__m128i_to_private(a);
  simde__m512i_private r;
  for (int i = 0; i < 16; ++i) r.i32[i] = (int32_t)(uint8_t)p.i8[i];
  return simde__m512i_from_private(r);
}
static inline simde__m512i pqk_emu_cvtepi8_epi32(simde__m128i a) {
  simde__m128i_private p = simde__m128i_to_private(a);
  simde__m512i_private r;
  for (int i = 0; i < 16; ++i) r.i32[i] = (int32_t)p.i8[i];
  return simde__m512i_from_private(r);
}
// GCC's sequence: the upper half added onto the lower, down to one lane
static inline float pqk_emu_reduce_add_ps(simde__m512 a) {
  simde__m512_private p = simde__m512_to_private(a);
  float v[16];
  for (int i = 0; i < 16; ++i) v[i] = p.f32[i];
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) v[i] = v[i] + v[i + w];
  return v[0];
}
// GCC's min / max reduction: the upper half against the lower, then lanes {2,3,0,1}, then
// {1,0}; each step vmaxps / vminps, which returns its second operand for a NaN or two zeros
// (SIMDe 0.8.2 keeps the first extreme it meets and skips NaN: -0.0 vs +0.0 and NaN differ)
static inline float pqk_emu_maxf(float a, float b) { return a > b ? a : b; }
static inline float pqk_emu_minf(float a, float b) { return a < b ? a : b; }
static inline float pqk_emu_reduce_minmax_ps(simde__m512 a, float (*op)(float, float)) {
  simde__m512_private p = simde__m512_to_private(a);
  float t[8], u[4], w[4];
  for (int i = 0; i < 8; ++i) t[i] = op(p.f32[i + 8], p.f32[i]);
  for (int i = 0; i < 4; ++i) u[i] = op(t[i + 4], t[i]);
  for (int i = 0; i < 4; ++i) w[i] = op(u[i], u[i ^ 2]);
  return op(w[0], w[1]);
}
#undef _mm512_reduce_max_ps
#undef _mm512_reduce_min_ps
#define _mm512_reduce_max_ps(a) pqk_emu_reduce_minmax_ps(a, pqk_emu_maxf)
#define _mm512_reduce_min_ps(a) pqk_emu_reduce_minmax_ps(a, pqk_emu_minf)
static inline int32_t pqk_emu_reduce_add_epi32(simde__m512i a) {
  simde__m512i_private p = simde__m512i_to_private(a);
  uint32_t s = 0;
  for (int i = 0; i < 16; ++i) s += (uint32_t)p.i32[i];
  return (int32_t)s;
}
static inline int64_t pqk_emu_reduce_add_epi64(simde__m512i a) {
  simde__m512i_private p = simde__m512i_to_private(a);
  uint64_t s = 0;
  for (int i = 0; i < 8; ++i) s += (uint64_t)p.i64[i];
  return (int64_t)s;
}
static inline simde__m512i pqk_emu_maskz_loadu_epi32(simde__mmask16 k, const void* mem) {
  simde__m512i_private r;
  for (int i = 0; i < 16; ++i) {
    int32_t v = 0;
    if ((k >> i) & 1) memcpy(&v, (const char*)mem + 4 * i, 4);
    r.i32[i] = v;
  }
  return simde__m512i_from_private(r);
}
static inline simde__m128i pqk_emu_maskz_loadu_epi8(simde__mmask16 k, const void* mem) {
  simde__m128i_private r;
  for (int i = 0; i < 16; ++i) r.i8[i] = ((k >> i) & 1) ? ((const int8_t*)mem)[i] : 0;
  return simde__m128i_from_private(r);
}
static inline void pqk_emu_mask_storeu_epi8(void* mem, simde__mmask16 k, simde__m128i a) {
  simde__m128i_private p = simde__m128i_to_private(a);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) ((int8_t*)mem)[i] = p.i8[i];
}
// SIMDe 0.8.2's _mm512_abs_ps keeps the sign of -0.0 (vandps clears it)
static inline simde__m512 pqk_emu_abs_ps(simde__m512 a) {
  return simde_mm512_castsi512_ps(simde_mm512_and_si512(simde_mm512_castps_si512(a), simde_mm512_set1_epi32(0x7fffffff)));
}
#undef _mm512_abs_ps
#define _mm512_abs_ps(a) pqk_emu_abs_ps(a)
// masked loads and stores touch only the selected elements: the kernels use them at the ends of
// buffers (SIMDe 0.8.2's _mm512_mask_storeu_ps writes all 64 bytes)
static inline simde__m512 pqk_emu_maskz_loadu_ps(simde__mmask16 k, const void* mem) {
  simde__m512_private r;
  for (int i = 0; i < 16; ++i) {
    float v = 0.0f;
    if ((k >> i) & 1) memcpy(&v, (const char*)mem + 4 * i, 4);
    r.f32[i] = v;
  }
  return simde__m512_from_private(r);
}
static inline void pqk_emu_mask_storeu_ps(void* mem, simde__mmask16 k, simde__m512 a) {
  simde__m512_private p = simde__m512_to_private(a);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) memcpy((char*)mem + 4 * i, &p.f32[i], 4);
}
static inline simde__m256i pqk_emu_maskz_loadu_epi16(simde__mmask16 k, const void* mem) {
  simde__m256i_private r;
  for (int i = 0; i < 16; ++i) {
    int16_t v = 0;
    if ((k >> i) & 1) memcpy(&v, (const char*)mem + 2 * i, 2);
    r.i16[i] = v;
  }
  return simde__m256i_from_private(r);
}
#undef _mm512_maskz_loadu_ps
#undef _mm512_mask_storeu_ps
#undef _mm256_maskz_loadu_epi16
#undef _mm512_maskz_loadu_epi32
#undef _mm_maskz_loadu_epi8
#undef _mm_mask_storeu_epi8
// aligned loads and stores fault on real AVX-512 when the address is not a multiple of 64 (32
// for ymm); SIMDe's are plain copies, so check here
static inline const void* pqk_emu_aligned(const void* p, unsigned align) {
  if ((uintptr_t)p % align) {
    fprintf(stderr, "pqk emulation: aligned %u-byte access at %p (would fault)\n", align, p);
    abort();
  }
  return p;
}
#undef _mm512_load_ps
#undef _mm512_load_si512
#undef _mm512_store_ps
#undef _mm256_load_si256
#define _mm512_load_ps(p) simde_mm512_load_ps(pqk_emu_aligned(p, 64))
#define _mm512_load_si512(p) simde_mm512_load_si512(pqk_emu_aligned(p, 64))
#define _mm512_store_ps(p, a) simde_mm512_store_ps((void*)pqk_emu_aligned(p, 64), a)
#define _mm256_load_si256(p) simde_mm256_load_si256((const simde__m256i*)pqk_emu_aligned(p, 32))
#define _mm512_maskz_loadu_ps(k, p) pqk_emu_maskz_loadu_ps(k, p)
#define _mm512_mask_storeu_ps(p, k, a) pqk_emu_mask_storeu_ps(p, k, a)
#define _mm256_maskz_loadu_epi16(k, p) pqk_emu_maskz_loadu_epi16(k, p)
#define _mm512_cvtepi32_epi8(a) pqk_emu_cvtepi32_epi8(a)
#define _mm256_cvtepi16_epi8(a) pqk_emu_cvtepi16_epi8_256(a)
#define _mm512_cvtepu8_epi32(a) pqk_emu_cvtepu8_epi32(a)
#define _mm512_cvtepi8_epi32(a) pqk_emu_cvtepi8_epi32(a)
#define _mm512_kor(a, b) ((simde__mmask16)((a) | (b)))  // the kernels' _kor_mask16 is GCC's alias of it
#define _mm512_reduce_add_ps(a) pqk_emu_reduce_add_ps(a)
#define _mm512_reduce_add_epi32(a) pqk_emu_reduce_add_epi32(a)
#define _mm512_reduce_add_epi64(a) pqk_emu_reduce_add_epi64(a)
#define _mm512_maskz_loadu_epi32(k, p) pqk_emu_maskz_loadu_epi32(k, p)
#define _mm_maskz_loadu_epi8(k, p) pqk_emu_maskz_loadu_epi8(k, p)
#define _mm_mask_storeu_epi8(p, k, a) pqk_emu_mask_storeu_epi8(p, k, a)

// VEX vpdpbusd (AVX-VNNI): per int32 lane, acc + the four u8 x s8 products, exact (wrapping)
static inline simde__m256i pqk_emu_dpbusd_avx(simde__m256i acc, simde__m256i u, simde__m256i s) {
  simde__m256i_private a = simde__m256i_to_private(acc), pu = simde__m256i_to_private(u),
                       ps = simde__m256i_to_private(s);
  for (int i = 0; i < 8; ++i) {
    int32_t t = 0;
    for (int j = 0; j < 4; ++j) t += (int32_t)(uint8_t)pu.i8[4 * i + j] * (int32_t)ps.i8[4 * i + j];
    a.i32[i] = (int32_t)((uint32_t)a.i32[i] + (uint32_t)t);
  }
  return simde__m256i_from_private(a);
}
#define _mm256_dpbusd_avx_epi32(acc, u, s) pqk_emu_dpbusd_avx(acc, u, s)

// vdpbf16ps with the bf16 pair `pair` broadcast: per lane acc = fma(w.odd, pair.hi, acc), then
// fma(w.even, pair.lo, acc) (Intel's order), rounded to nearest even; denormal inputs read as
// zero and denormal results flushed to zero, as the instruction does whatever MXCSR says
static inline float pqk_emu_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  if ((u & 0x7F800000u) == 0) u &= 0x80000000u;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static inline float pqk_emu_ftz(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7F800000u) == 0) u &= 0x80000000u;
  memcpy(&f, &u, 4);
  return f;
}
static inline simde__m512 pqk_emu_dpbf16_pair(simde__m512 acc, simde__m512i w, uint32_t pair) {
  simde__m512_private a = simde__m512_to_private(acc);
  simde__m512i_private pw = simde__m512i_to_private(w);
  const float lo = pqk_emu_bf16((uint16_t)pair), hi = pqk_emu_bf16((uint16_t)(pair >> 16));
  for (int i = 0; i < 16; ++i) {
    const uint32_t wi = (uint32_t)pw.i32[i];
    float t = pqk_emu_ftz(a.f32[i]);
    t = pqk_emu_ftz(fmaf(pqk_emu_bf16((uint16_t)(wi >> 16)), hi, t));
    t = pqk_emu_ftz(fmaf(pqk_emu_bf16((uint16_t)wi), lo, t));
    a.f32[i] = t;
  }
  return simde__m512_from_private(a);
}
