// A packed weight's per-row parameters (core/packed.h) as 16 fp32 lanes, for the AVX-512
// kernels of the avx512vnni and avx512bf16 folders (each compiles it with its own flags;
// internal linkage only). Include after <immintrin.h> (and avx512_gcc12_warnings.h).
#pragma once
#include <immintrin.h>

#include "../../core/packed.h"

namespace pqk { namespace {

// 16 parameters at index pi, stored as fp32 or fp16, or two-level (q4_k, q6_k: d * q, exact)
inline __m512 load_par(const float* f32, const uint16_t* f16, const float* d, const int8_t* q, int64_t sup,
                       int64_t pi) {
  if (q)
    return _mm512_mul_ps(_mm512_load_ps(d + sup),
                         _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i*)(q + pi)))));
  return f16 ? _mm512_cvtph_ps(_mm256_load_si256((const __m256i*)(f16 + pi))) : _mm512_load_ps(f32 + pi);
}
// the scales a of the 16 rows at pi
inline __m512 load_a(const PackedWeight& w, int64_t pi) {
  return load_par(w.scale, w.scale16, w.sd, w.sq, w.sq ? w.sup_index(pi) : 0, pi);
}
// the mins m of the 16 rows at pi (formats with has_min)
inline __m512 load_m(const PackedWeight& w, int64_t pi) {
  return load_par(w.minv, w.min16, w.md, w.mq, w.mq ? w.sup_index(pi) : 0, pi);
}

}}  // namespace pqk::(anonymous)
