// compute="float" at decode size (m <= GEMV_F32_MAX_M activation rows) straight from a format's
// canonical row bytes, for the formats decoded by a table lookup or a widening (nf4, fp4, iq4_nl,
// q8_0, int8). Each weight is decoded in registers to the float dequantize_row gives (the same
// product: code * absmax, d * kvalue, f32(q) * d), then fused-multiply-added against x. The
// dequantize-a-chunk path this replaces stored every weight and read it back: nf4 at
// (1,4096,4096) took 1.05 ms, half of it in those stores.
//
// Per weight row and activation row two accumulators (the two 16-element halves of each chunk of
// 32), summed at the end; a row's result does not depend on which rows share its pass.
#include "../avx512_gcc12_warnings.h"  // before <immintrin.h>
#include <immintrin.h>

#include <type_traits>
#include <vector>

#include "../../core/kernel_table.h"
#include "../common.h"
#include "simd512.h"

namespace pqk { namespace avx512 {

namespace {

inline __m512i zext16(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
inline __m512 sext16(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
// the fp16 at p in every lane (exact): a broadcast load and one conversion
inline __m512 bcast_f16(const uint8_t* p) {
  short h;
  __builtin_memcpy(&h, p, 2);
  return _mm512_cvtph_ps(_mm256_set1_epi16(h));
}

// bitsandbytes nf4 / fp4: fp32 absmax per block of p.group (a power of two >= 32), element 2i the
// high nibble of byte i. x comes split per chunk of 32 (even elements, then odd ones).
struct Bnb4 {
  static constexpr bool kSplitX = true;
  __m512 book;
  int shift;  // log2(chunks of 32 per block)
  struct Row { const uint8_t* q; const uint8_t* s; __m512 tab; };
  Row row(const uint8_t* q, const uint8_t* s) const { return Row{q, s, _mm512_setzero_ps()}; }
  void chunk(Row& r, int64_t ci, __m512& w0, __m512& w1) const {
    if ((ci & ((int64_t{1} << shift) - 1)) == 0)  // table[c] = book[c] * absmax, as dequantize_row_nf4
      r.tab = _mm512_mul_ps(book, _mm512_set1_ps(load_f32(r.s + 4 * (ci >> shift))));
    const __m512i c = zext16(r.q + 16 * ci);
    w0 = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), r.tab);
    w1 = _mm512_permutexvar_ps(c, r.tab);  // vpermps reads the low 4 bits: the low nibble
  }
};

// ggml iq4_nl: blocks of 18 bytes (fp16 d, 16 code bytes), element j the low nibble of byte j,
// element j + 16 its high nibble
struct Iq4nl {
  static constexpr bool kSplitX = false;
  __m512 kv;
  struct Row { const uint8_t* q; };
  Row row(const uint8_t* q, const uint8_t*) const { return Row{q}; }
  void chunk(Row& r, int64_t ci, __m512& w0, __m512& w1) const {
    const uint8_t* b = r.q + ci * IQ4NL_BYTES;
    const __m512 tab = _mm512_mul_ps(bcast_f16(b), kv);  // d * kvalue, as the dequantizer
    const __m512i c = zext16(b + 2);
    w0 = _mm512_permutexvar_ps(c, tab);
    w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), tab);
  }
};

// ggml q8_0: blocks of 34 bytes (fp16 d, 32 int8 codes), weight f32(q) * d
struct Q80 {
  static constexpr bool kSplitX = false;
  struct Row { const uint8_t* q; };
  Row row(const uint8_t* q, const uint8_t*) const { return Row{q}; }
  void chunk(Row& r, int64_t ci, __m512& w0, __m512& w1) const {
    const uint8_t* b = r.q + ci * Q8_0_BYTES;
    const __m512 d = bcast_f16(b);
    w0 = _mm512_mul_ps(sext16(b + 2), d);
    w1 = _mm512_mul_ps(sext16(b + 18), d);
  }
};

// int8: k codes per row and one fp32 scale, weight f32(q) * scale; k need not be a multiple of 32
struct Int8 {
  static constexpr bool kSplitX = false;
  struct Row { const uint8_t* q; __m512 s; };
  Row row(const uint8_t* q, const uint8_t* s) const { return Row{q, _mm512_set1_ps(load_f32(s))}; }
  void chunk(Row& r, int64_t ci, __m512& w0, __m512& w1) const {
    w0 = _mm512_mul_ps(sext16(r.q + 32 * ci), r.s);
    w1 = _mm512_mul_ps(sext16(r.q + 32 * ci + 16), r.s);
  }
  // the last n (< 32) elements at chunk ci; lanes past them are zero
  void tail(Row& r, int64_t ci, int n, __m512& w0, __m512& w1) const {
    const uint32_t m = (1u << n) - 1u;
    const __mmask16 m0 = (__mmask16)m, m1 = (__mmask16)(m >> 16);
    const uint8_t* p = r.q + 32 * ci;
    w0 = _mm512_maskz_mul_ps(m0, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m0, p))), r.s);
    w1 = _mm512_maskz_mul_ps(m1, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m1, p + 16))), r.s);
  }
};

template <class D, class = void>
struct HasTail : std::false_type {};
template <class D>
struct HasTail<D, decltype(void(&D::tail))> : std::true_type {};

// R weight rows from r0 against M activation rows (x rows ldx apart)
template <class D, int R, int M>
void rows(const D& dec, const uint8_t* q, const uint8_t* s, const pqk_row_bytes& rb, int64_t r0, int64_t k,
          const float* x, int64_t ldx, float* y, int64_t ldy, const float* bias) {
  typename D::Row row[R];
  for (int r = 0; r < R; ++r) row[r] = dec.row(q + (r0 + r) * rb.q, s ? s + (r0 + r) * rb.s : nullptr);
  __m512 acc[R][M][2];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) acc[r][i][0] = acc[r][i][1] = _mm512_setzero_ps();
  const int64_t nc = k / 32;
  for (int64_t ci = 0; ci < nc; ++ci) {
    __m512 xv[M][2];
    for (int i = 0; i < M; ++i) {
      xv[i][0] = _mm512_loadu_ps(x + i * ldx + 32 * ci);
      xv[i][1] = _mm512_loadu_ps(x + i * ldx + 32 * ci + 16);
    }
    for (int r = 0; r < R; ++r) {
      __m512 w0, w1;
      dec.chunk(row[r], ci, w0, w1);
      for (int i = 0; i < M; ++i) {
        acc[r][i][0] = _mm512_fmadd_ps(w0, xv[i][0], acc[r][i][0]);
        acc[r][i][1] = _mm512_fmadd_ps(w1, xv[i][1], acc[r][i][1]);
      }
    }
  }
  if constexpr (HasTail<D>::value) {
    const int n = (int)(k - 32 * nc);
    if (n) {
      const uint32_t m = (1u << n) - 1u;
      __m512 xv[M][2];
      for (int i = 0; i < M; ++i) {
        xv[i][0] = _mm512_maskz_loadu_ps((__mmask16)m, x + i * ldx + 32 * nc);
        xv[i][1] = _mm512_maskz_loadu_ps((__mmask16)(m >> 16), x + i * ldx + 32 * nc + 16);
      }
      for (int r = 0; r < R; ++r) {
        __m512 w0, w1;
        dec.tail(row[r], nc, n, w0, w1);
        for (int i = 0; i < M; ++i) {
          acc[r][i][0] = _mm512_fmadd_ps(w0, xv[i][0], acc[r][i][0]);
          acc[r][i][1] = _mm512_fmadd_ps(w1, xv[i][1], acc[r][i][1]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) {
      const float v = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][i][0], acc[r][i][1]));
      y[i * ldy + r0 + r] = bias ? v + bias[r0 + r] : v;
    }
}

// rows [r0, r1): R at a time (8 accumulator chains or more), then one at a time
template <class D, int M>
void run_m(const D& dec, const uint8_t* q, const uint8_t* s, const pqk_row_bytes& rb, int64_t r0, int64_t r1,
           int64_t k, const float* x, int64_t ldx, float* y, int64_t ldy, const float* bias) {
  constexpr int R = M == 1 ? 4 : 2;
  int64_t r = r0;
  for (; r + R <= r1; r += R) rows<D, R, M>(dec, q, s, rb, r, k, x, ldx, y, ldy, bias);
  for (; r < r1; ++r) rows<D, 1, M>(dec, q, s, rb, r, k, x, ldx, y, ldy, bias);
}

template <class D>
void run(const D& dec, const uint8_t* q, const uint8_t* s, const pqk_row_bytes& rb, int64_t r0, int64_t r1, int64_t k,
         const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy, const float* bias) {
  std::vector<float> split;
  if (D::kSplitX) {  // each chunk of 32 as its 16 even elements, then its 16 odd ones
    split.resize((size_t)(m * k));
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < k; j += 32) {
        const __m512 a = _mm512_loadu_ps(x + i * ldx + j), b = _mm512_loadu_ps(x + i * ldx + j + 16);
        _mm512_storeu_ps(split.data() + i * k + j, _mm512_permutex2var_ps(a, ev, b));
        _mm512_storeu_ps(split.data() + i * k + j + 16, _mm512_permutex2var_ps(a, od, b));
      }
    x = split.data();
    ldx = k;
  }
  switch (m) {
    case 1: return run_m<D, 1>(dec, q, s, rb, r0, r1, k, x, ldx, y, ldy, bias);
    case 2: return run_m<D, 2>(dec, q, s, rb, r0, r1, k, x, ldx, y, ldy, bias);
    case 3: return run_m<D, 3>(dec, q, s, rb, r0, r1, k, x, ldx, y, ldy, bias);
    default: return run_m<D, 4>(dec, q, s, rb, r0, r1, k, x, ldx, y, ldy, bias);
  }
}

}  // namespace

void gemv_f32_nf4(const uint8_t* q, const uint8_t* s, const pqk_row_bytes& rb, int64_t r0, int64_t r1, int64_t k,
                  const pqk_qparams& p, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy,
                  const float* bias) {
  run(Bnb4{_mm512_loadu_ps(kNF4), __builtin_ctzll((unsigned long long)p.group / 32)}, q, s, rb, r0, r1, k, x, ldx, m, y, ldy, bias);
}

void gemv_f32_fp4(const uint8_t* q, const uint8_t* s, const pqk_row_bytes& rb, int64_t r0, int64_t r1, int64_t k,
                  const pqk_qparams& p, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy,
                  const float* bias) {
  run(Bnb4{_mm512_loadu_ps(kFP4), __builtin_ctzll((unsigned long long)p.group / 32)}, q, s, rb, r0, r1, k, x, ldx, m, y, ldy, bias);
}

void gemv_f32_iq4_nl(const uint8_t* q, const uint8_t* s, const pqk_row_bytes& rb, int64_t r0, int64_t r1, int64_t k,
                     const pqk_qparams&, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy,
                     const float* bias) {
  const __m512 kv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)kIQ4NL)));
  run(Iq4nl{kv}, q, s, rb, r0, r1, k, x, ldx, m, y, ldy, bias);
}

void gemv_f32_q8_0(const uint8_t* q, const uint8_t* s, const pqk_row_bytes& rb, int64_t r0, int64_t r1, int64_t k,
                   const pqk_qparams&, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy,
                   const float* bias) {
  run(Q80{}, q, s, rb, r0, r1, k, x, ldx, m, y, ldy, bias);
}

void gemv_f32_int8(const uint8_t* q, const uint8_t* s, const pqk_row_bytes& rb, int64_t r0, int64_t r1, int64_t k,
                   const pqk_qparams&, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy,
                   const float* bias) {
  run(Int8{}, q, s, rb, r0, r1, k, x, ldx, m, y, ldy, bias);
}

}}  // namespace pqk::avx512
