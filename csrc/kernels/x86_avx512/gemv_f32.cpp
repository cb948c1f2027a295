// compute="float" at decode size (m <= GEMV_F32_MAX_M activation rows) straight from a format's
// canonical row bytes, AVX-512: every format but int2 / int3. Each weight is decoded in registers
// to the float dequantize_row gives (the same products: code * absmax, f32(c - 8) * d,
// d * kvalue, f32(q) * d, ...), then fused-multiply-added against x (row loop:
// ../gemv_f32_rows.h). The dequantize-a-chunk path this replaces stored every weight and read it
// back: nf4 at (1,4096,4096) took 1.05 ms, half of it in those stores.
#include "../avx512_gcc12_warnings.h"  // before <immintrin.h>
#include <immintrin.h>

#include "../../core/kernel_table.h"
#include "../common.h"
#include "../gemv_f32_rows.h"
#include "kernels512.h"
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

// A per-group 16-entry table read with vpermps, codes two per byte, element 2i the high nibble
// (nf4 / fp4, bitsandbytes) or the low one (int4); x comes split per chunk of 32 (even elements,
// then odd ones). Groups are a whole number of chunks (the table is rebuilt every cpg chunks).
template <class Tab, bool HighFirst>
struct GroupNib {
  static constexpr bool kSplitX = true;
  static constexpr int kStep = 1;
  Tab tab_of;       // (s, z, group index) -> table
  int64_t cpg;      // chunks of 32 per group
  struct Row { const uint8_t* q; const uint8_t* s; const uint8_t* z; __m512 tab; int64_t left, g; };
  Row row(const uint8_t* q, const uint8_t* s, const uint8_t* z) const {
    return Row{q, s, z, _mm512_setzero_ps(), 0, -1};
  }
  template <int J>
  void chunk(Row& r, int64_t ci, __m512* w) const {
    if (r.left-- == 0) {
      r.tab = tab_of(r.s, r.z, ++r.g);
      r.left = cpg - 1;
    }
    const __m512i c = zext16(r.q + 16 * ci), c4 = _mm512_srli_epi32(c, 4);
    w[0] = _mm512_permutexvar_ps(HighFirst ? c4 : c, r.tab);  // vpermps reads the low 4 bits
    w[1] = _mm512_permutexvar_ps(HighFirst ? c : c4, r.tab);
  }
};

// nf4 / fp4: table[c] = book[c] * absmax (fp32 per block), as dequantize_row_nf4
struct BookTab {
  __m512 book;
  __m512 operator()(const uint8_t* s, const uint8_t*, int64_t g) const {
    return _mm512_mul_ps(book, _mm512_set1_ps(load_f32(s + 4 * g)));
  }
};
// int4: table[c] = f32(c - zero) * scale (fp16 per group; zero a byte per group, or 8)
struct Int4Tab {
  bool sym;
  __m512 operator()(const uint8_t* s, const uint8_t* z, int64_t g) const {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i c = _mm512_sub_epi32(iota, _mm512_set1_epi32(sym ? 8 : z[g]));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(c), bcast_f16(s + 2 * g));
  }
};

// ggml blocks of 32 with a 16-entry table per block (fp16 fields first, then 16 code bytes,
// element j the low nibble of byte j, element j + 16 its high nibble): q4_0, q4_1, iq4_nl
template <int BYTES, int CODES, class Tab>
struct Ggml32 {
  static constexpr bool kSplitX = false;
  static constexpr int kStep = 1;
  Tab tab_of;  // block -> table
  struct Row { const uint8_t* q; };
  Row row(const uint8_t* q, const uint8_t*, const uint8_t*) const { return Row{q}; }
  template <int J>
  void chunk(Row& r, int64_t ci, __m512* w) const {
    const uint8_t* b = r.q + ci * BYTES;
    const __m512 tab = tab_of(b);
    const __m512i c = zext16(b + CODES);
    w[0] = _mm512_permutexvar_ps(c, tab);
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), tab);
  }
};
inline __m512 iota_ps() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
struct Q40Tab {  // f32(c - 8) * d
  __m512 operator()(const uint8_t* b) const {
    return _mm512_mul_ps(_mm512_sub_ps(iota_ps(), _mm512_set1_ps(8.0f)), bcast_f16(b));
  }
};
struct Q41Tab {  // d * f32(c) + m
  __m512 operator()(const uint8_t* b) const {
    return _mm512_add_ps(_mm512_mul_ps(bcast_f16(b), iota_ps()), bcast_f16(b + 2));
  }
};
struct Iq4nlTab {  // d * kvalue[c]
  __m512 kv;
  __m512 operator()(const uint8_t* b) const { return _mm512_mul_ps(bcast_f16(b), kv); }
};

// ggml q8_0: blocks of 34 bytes (fp16 d, 32 int8 codes), weight f32(q) * d
struct Q80 {
  static constexpr bool kSplitX = false;
  static constexpr int kStep = 1;
  struct Row { const uint8_t* q; };
  Row row(const uint8_t* q, const uint8_t*, const uint8_t*) const { return Row{q}; }
  template <int J>
  void chunk(Row& r, int64_t ci, __m512* w) const {
    const uint8_t* b = r.q + ci * Q8_0_BYTES;
    const __m512 d = bcast_f16(b);
    w[0] = _mm512_mul_ps(sext16(b + 2), d);
    w[1] = _mm512_mul_ps(sext16(b + 18), d);
  }
};

inline __m512 lane(__m512 v, int j) { return _mm512_permutexvar_ps(_mm512_set1_epi32(j), v); }

// q4_k: chunk j of a 256-element super-block is sub-block j: the low (j even) or high nibbles of
// 32 code bytes, (d * sc) * f32(c) - (dmin * m) as a 16-entry table, as dequantize_row_q4_k. At a
// super-block's first chunk its 8 products d * sc and dmin * m, in lanes 0..7 of two registers.
struct Q4K {
  static constexpr bool kSplitX = false;
  static constexpr int kStep = 8;  // chunks per super-block
  struct Row { const uint8_t* q; __m512 dsc, dm; };
  Row row(const uint8_t* q, const uint8_t*, const uint8_t*) const { return Row{q, _mm512_setzero_ps(), _mm512_setzero_ps()}; }
  static void scales(const uint8_t* b, __m512& dsc, __m512& dm) {
    // 12 bytes of 6-bit fields, four lanes at a time (q4k_scale_min): sub-blocks 0..3 from the
    // low 6 bits of bytes 0..3 (scales) and 4..7 (mins); 4..7 from the nibbles of bytes 8..11 and
    // the top 2 bits of bytes 0..3 / 4..7
    uint32_t u0, u1, u2;
    __builtin_memcpy(&u0, b + 4, 4);
    __builtin_memcpy(&u1, b + 8, 4);
    __builtin_memcpy(&u2, b + 12, 4);
    const uint32_t s_lo = u0 & 0x3F3F3F3Fu, m_lo = u1 & 0x3F3F3F3Fu;
    const uint32_t s_hi = (u2 & 0x0F0F0F0Fu) | ((u0 >> 2) & 0x30303030u);
    const uint32_t m_hi = ((u2 >> 4) & 0x0F0F0F0Fu) | ((u1 >> 2) & 0x30303030u);
    const __m128i sm = _mm_set_epi32((int)m_hi, (int)m_lo, (int)s_hi, (int)s_lo);  // scales 0..7, mins 0..7
    const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sm));
    dsc = _mm512_mul_ps(bcast_f16(b), f);       // lanes 0..7: d * sc
    dm = _mm512_mul_ps(bcast_f16(b + 2), _mm512_shuffle_f32x4(f, f, 0x0E));  // lanes 0..7: dmin * m
  }
  template <int J>
  void chunk(Row& r, int64_t sb, __m512* w) const {
    const uint8_t* b = r.q + sb * Q4_K_BYTES;
    constexpr int j = J;
    if (j == 0) scales(b, r.dsc, r.dm);
    const __m512 tab = _mm512_sub_ps(_mm512_mul_ps(lane(r.dsc, j), iota_ps()), lane(r.dm, j));
    const uint8_t* qs = b + 16 + 32 * (j >> 1);
    __m512i c0 = zext16(qs), c1 = zext16(qs + 16);
    if constexpr (j & 1) {
      c0 = _mm512_srli_epi32(c0, 4);
      c1 = _mm512_srli_epi32(c1, 4);
    }
    w[0] = _mm512_permutexvar_ps(c0, tab);
    w[1] = _mm512_permutexvar_ps(c1, tab);
  }
};

// q6_k: chunk j of a super-block is quarter i = j & 3 of half h = j >> 2: nibble i >> 1 of
// ql[64h + 32(i & 1) + l] and bits 2i of qh[32h + l]; (d * sc) * f32(c - 32), one scale per 16
// elements (the super-block's 16 products d * sc computed at its first chunk, one per lane)
struct Q6K {
  static constexpr bool kSplitX = false;
  static constexpr int kStep = 8;  // chunks per super-block
  struct Row { const uint8_t* q; __m512 ds; };
  Row row(const uint8_t* q, const uint8_t*, const uint8_t*) const { return Row{q, _mm512_setzero_ps()}; }
  template <int J>
  void chunk(Row& r, int64_t sb, __m512* w) const {
    const uint8_t* b = r.q + sb * Q6_K_BYTES;
    constexpr int j = J, h = j >> 2, i = j & 3;
    if (j == 0) r.ds = _mm512_mul_ps(bcast_f16(b + 208), sext16(b + 192));
    const __m256i l = _mm256_loadu_si256((const __m256i*)(b + 64 * h + 32 * (i & 1)));
    const __m256i hb = _mm256_loadu_si256((const __m256i*)(b + 128 + 32 * h));
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
    const __m256i nib = _mm256_and_si256((i >> 1) ? _mm256_srli_epi16(l, 4) : l, m4);
    const __m256i top = _mm256_and_si256(_mm256_srli_epi16(hb, 2 * i), m2);
    const __m256i c = _mm256_sub_epi8(_mm256_or_si256(nib, _mm256_slli_epi16(top, 4)), _mm256_set1_epi8(32));
    w[0] = _mm512_mul_ps(lane(r.ds, 8 * h + 2 * i), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(c))));
    w[1] = _mm512_mul_ps(lane(r.ds, 8 * h + 2 * i + 1),
                       _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(c, 1))));
  }
};

// int8: k codes per row and one fp32 scale, weight f32(q) * scale; k need not be a multiple of 32
struct Int8 {
  static constexpr bool kSplitX = false;
  static constexpr int kStep = 1;
  struct Row { const uint8_t* q; __m512 s; };
  Row row(const uint8_t* q, const uint8_t* s, const uint8_t*) const { return Row{q, _mm512_set1_ps(load_f32(s))}; }
  template <int J>
  void chunk(Row& r, int64_t ci, __m512* w) const {
    w[0] = _mm512_mul_ps(sext16(r.q + 32 * ci), r.s);
    w[1] = _mm512_mul_ps(sext16(r.q + 32 * ci + 16), r.s);
  }
  // the last n (< 32) elements at chunk ci; lanes past them are zero
  void tail(Row& r, int64_t ci, int n, __m512* w) const {
    const uint32_t m = (1u << n) - 1u;
    const __mmask16 m0 = (__mmask16)m, m1 = (__mmask16)(m >> 16);
    const uint8_t* p = r.q + 32 * ci;
    w[0] = _mm512_maskz_mul_ps(m0, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m0, p))), r.s);
    w[1] = _mm512_maskz_mul_ps(m1, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m1, p + 16))), r.s);
  }
};

struct V512 {
  using vec = __m512;
  static constexpr int N = 16;
  static constexpr int rows(int m) { return m == 1 ? 4 : m <= 4 ? 2 : 1; }  // 8 accumulator chains or more
  static constexpr int accs(int) { return 2; }
  static vec zero() { return _mm512_setzero_ps(); }
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static float hsum(vec a) { return _mm512_reduce_add_ps(a); }
};

using V = V512;
__m512 book(const float* b) { return _mm512_loadu_ps(b); }
__m512 iq4nl_kv() { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)kIQ4NL))); }

// The grouped nibble formats' kernel for cpg chunks per group (see gemv_f32_entries.inc)
template <bool HighFirst, class TabOf>
bool run_group_nib(const TabOf& t, int64_t cpg, const uint8_t* q, const uint8_t* s, const uint8_t* z,
                   const pqk_row_bytes& rb, int64_t r0, int64_t r1, int64_t k, const float* x, int64_t ldx,
                   int64_t m, float* y, int64_t ldy, const float* bias) {
  return gemv_f32::run<V>(GroupNib<TabOf, HighFirst>{t, cpg}, q, s, z, rb, r0, r1, k, x, ldx, m, y, ldy, bias);
}

bool run_q4_0(const uint8_t* q, const uint8_t* s, const uint8_t* z, const pqk_row_bytes& rb, int64_t r0, int64_t r1,
              int64_t k, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy, const float* bias) {
  return gemv_f32::run<V>(Ggml32<Q4_0_BYTES, 2, Q40Tab>{}, q, s, z, rb, r0, r1, k, x, ldx, m, y, ldy, bias);
}

}  // namespace

#include "../gemv_f32_entries.inc"

}}  // namespace pqk::avx512
