// compute="float" at decode size (m <= GEMV_F32_MAX_M activation rows) straight from a format's
// canonical row bytes, AVX2 (+FMA, F16C): every format but int2 / int3, the same decoders as
// ../x86_avx512/gemv_f32.cpp on 8 lanes (row loop: ../gemv_f32_rows.h). Each weight is decoded in
// registers to the float dequantize_row gives, then fused-multiply-added against x. A 16-entry
// table is two 8-entry vpermps and a blend on bit 3 of the code.
#include <immintrin.h>

#include <type_traits>

#include "../../core/kernel_table.h"
#include "../common.h"
#include "../gemv_f32_rows.h"
#include "kernels256.h"
#include "simd256.h"

namespace pqk { namespace avx2 {

namespace {

struct V256 {
  using vec = __m256;
  static constexpr int N = 8;
  // One weight row at a time. Two at M = 1 (8 accumulators) did not fit 16 registers beside the
  // decoder's: GCC kept accumulators on the stack, a store-to-load round trip per FMA chain and
  // chunk; one row: q4_0 M = 1 2.1 -> 1.5 ms (4096x4096, one thread, min, a Zen 3). M = 2 keeps
  // 4 accumulators per activation row (2 measured 3.4 -> 2.4 ms for int4-g128, but M = 1 and 2
  // must sum a row in the same order: x[i] alone gives the bits row i gets in a pair).
  static constexpr int rows(int) { return 1; }
  static constexpr int accs(int m) { return m <= 2 ? 4 : 2; }
  static vec zero() { return _mm256_setzero_ps(); }
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static float hsum(vec a) {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
  }
};

inline __m256i zext8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
inline __m256 sext8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
inline __m256 bcast_f16(const uint8_t* p) {  // the fp16 at p in every lane (exact)
  short h;
  __builtin_memcpy(&h, p, 2);
  return _mm256_cvtph_ps(_mm_set1_epi16(h));
}
inline __m256 iota_lo() { return _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7); }
inline __m256 iota_hi() { return _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15); }

// a 16-entry table in two registers (entries 0..7, 8..15)
struct Tab16 {
  __m256 lo, hi;
  // table[idx & 15] per lane (vpermps reads the low 3 bits; bit 3 moved to the sign picks the half)
  __m256 operator()(__m256i idx) const {
    const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), sel);
  }
  __m256 upper(__m256i idx) const { return (*this)(idx); }  // idx <= 15 already
  Tab16 mul(__m256 s) const { return Tab16{_mm256_mul_ps(lo, s), _mm256_mul_ps(hi, s)}; }
};
inline __m256 lane(__m256 v, int j) { return _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(j)); }

// (c - o) * d for a linear format's code c as fma(f32(c), d, -o * d): c * d and o * d are exact
// (4-bit integers times an fp16 value), so this rounds the exact (c - o) * d once, as the
// table entry does, in two ops instead of the table's two permutes and a blend. A d that is Inf
// or NaN takes the table (fma would give Inf - Inf = NaN where the table has +-Inf). A zero
// weight (c == o) comes out +0 where the table has -0 for a negative d: equal values; only the
// sign of a sum that is exactly zero can differ.
struct Lin16 {
  __m256 d, e;  // finite d: e = -o * d; else e = o (the table is built per use: rare)
  bool finite;
  __m256 table(__m256i idx) const {
    return Tab16{_mm256_mul_ps(_mm256_sub_ps(iota_lo(), e), d), _mm256_mul_ps(_mm256_sub_ps(iota_hi(), e), d)}(idx);
  }
  __m256 operator()(__m256i idx) const {  // the low 4 bits of idx
    if (__builtin_expect(!finite, 0)) return table(idx);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(idx, _mm256_set1_epi32(15))), d, e);
  }
  __m256 upper(__m256i idx) const {  // idx <= 15 already (a byte shifted down by 4): no mask
    if (__builtin_expect(!finite, 0)) return table(idx);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(idx), d, e);
  }
};
inline Lin16 lin16(const uint8_t* scale_f16, float o) {
  uint16_t h;
  __builtin_memcpy(&h, scale_f16, 2);
  const __m256 d = bcast_f16(scale_f16);
  const bool finite = (h & 0x7C00) != 0x7C00;  // -o * d: exact, one multiply
  return Lin16{d, finite ? _mm256_mul_ps(d, _mm256_set1_ps(-o)) : _mm256_set1_ps(o), finite};
}

// 16 code bytes, two codes each -> w[0..3]: first nibbles of bytes 0..7, 8..15, then second ones
template <class Tab>
inline void nibbles(const uint8_t* p, bool high_first, const Tab& t, __m256* w) {
  const __m256i a = zext8(p), b = zext8(p + 8);
  const __m256i a4 = _mm256_srli_epi32(a, 4), b4 = _mm256_srli_epi32(b, 4);
  // a4, b4 (a byte shifted down by 4) need no mask: t.upper
  w[0] = high_first ? t.upper(a4) : t(a);
  w[1] = high_first ? t.upper(b4) : t(b);
  w[2] = high_first ? t(a) : t.upper(a4);
  w[3] = high_first ? t(b) : t.upper(b4);
}

// nf4 / fp4 (high nibble first, fp32 absmax per group) and int4 (low nibble first, fp16 scale and
// a zero per group); x split per chunk into even then odd elements; groups of whole chunks
template <class TabOf, bool HighFirst>
struct GroupNib {
  static constexpr bool kSplitX = true;
  static constexpr int kStep = 1;
  TabOf tab_of;
  int64_t cpg;  // chunks of 32 per group
  struct Row { const uint8_t* q; const uint8_t* s; const uint8_t* z; typename TabOf::Table tab; int64_t left, g; };
  Row row(const uint8_t* q, const uint8_t* s, const uint8_t* z) const { return Row{q, s, z, {}, 0, -1}; }
  template <int J>
  void chunk(Row& r, int64_t ci, __m256* w) const {
    if (r.left-- == 0) {
      r.tab = tab_of(r.s, r.z, ++r.g);
      r.left = cpg - 1;
    }
    nibbles(r.q + 16 * ci, HighFirst, r.tab, w);
  }
};
// Lin16 without its test for a non-finite d: an Inf or NaN d makes every weight of its group
// NaN (c * Inf - o * Inf), so the rows' results come out NaN, and fast_then_tested computes
// those rows again with Lin16
struct Lin16F {
  __m256 d, e;  // e = -o * d
  __m256 operator()(__m256i idx) const {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(idx, _mm256_set1_epi32(15))), d, e);
  }
  __m256 upper(__m256i idx) const { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(idx), d, e); }
};
template <bool SYM>  // Int4Tab with Lin16F: the same (c - o) * d for a finite d, rounded once
struct Int4FiniteTab {
  using Table = Lin16F;
  Lin16F operator()(const uint8_t* s, const uint8_t* z, int64_t g) const {
    const __m256 d = bcast_f16(s + 2 * g);
    return Lin16F{d, _mm256_mul_ps(d, _mm256_set1_ps(SYM ? -8.0f : -(float)z[g]))};
  }
};

// GroupNib for a group of CPG chunks known at compile time (int4 group 128: 4; nf4 block 64: 2):
// a step is a group, its table made at its first chunk and its chunks unrolled, without
// GroupNib's countdown and reload test per chunk. The same decoded weights and FMAs in the same
// order, so the same bits (figures: fast_then_tested).
template <class TabOf, bool HighFirst, int CPG>
struct GroupNibK {
  static constexpr bool kSplitX = true;
  static constexpr int kStep = CPG;
  TabOf tab_of;
  struct Row { const uint8_t* q; const uint8_t* s; const uint8_t* z; typename TabOf::Table tab; };
  Row row(const uint8_t* q, const uint8_t* s, const uint8_t* z) const { return Row{q, s, z, {}}; }
  template <int J>
  void chunk(Row& r, int64_t g, __m256* w) const {
    if constexpr (J == 0) r.tab = tab_of(r.s, r.z, g);
    nibbles(r.q + 16 * (g * CPG + J), HighFirst, r.tab, w);
  }
};
struct BookTab {  // book[c] * absmax, as dequantize_row_nf4
  using Table = Tab16;
  Tab16 book;
  Tab16 operator()(const uint8_t* s, const uint8_t*, int64_t g) const {
    float a;
    __builtin_memcpy(&a, s + 4 * g, 4);
    return book.mul(_mm256_set1_ps(a));
  }
};
struct Int4Tab {  // f32(c - zero) * scale as Lin16 (zero <= 255: zero * scale is exact too). The
  // table (two permutes and a blend per 8 codes) had measured 15-19% faster at M = 2 and 4 on a
  // Zen 5; on a Zen 3 it is the slower one at M = 1, 2, 4 (4.0 / 4.2 / 5.5 -> 1.5 / 3.3 / 4.4-5.4 ms)
  using Table = Lin16;
  bool sym;
  Lin16 operator()(const uint8_t* s, const uint8_t* z, int64_t g) const {
    return lin16(s + 2 * g, (float)(sym ? 8 : z[g]));
  }
};

// ggml blocks of 32 with a per-block table (element j low nibble of byte j, j + 16 high); STEP
// blocks per step (2: unrolled, half the loop's own instructions per block; k / 32 even)
template <int BYTES, int CODES, class TabOf, int STEP = 1>
struct Ggml32 {
  static constexpr bool kSplitX = false;
  static constexpr int kStep = STEP;
  TabOf tab_of;
  struct Row { const uint8_t* q; };
  Row row(const uint8_t* q, const uint8_t*, const uint8_t*) const { return Row{q}; }
  template <int J>
  void chunk(Row& r, int64_t sp, __m256* w) const {
    const uint8_t* b = r.q + (sp * STEP + J) * BYTES;
    nibbles(b + CODES, false, tab_of(b), w);
  }
};
struct Q40Tab {  // f32(c - 8) * d, linear (Lin16): 4096x4096, one thread, M = 1 / 3 / 4 / 8: 1.20 /
  // 1.70 / 1.90 / 3.48 -> 1.00 / 1.33 / 1.55 / 3.30 ms against the table
  Lin16 operator()(const uint8_t* b) const { return lin16(b, 8.0f); }
};
struct Q40FastTab {  // Q40Tab with Lin16F (see fast_then_tested)
  Lin16F operator()(const uint8_t* b) const {
    const __m256 d = bcast_f16(b);
    return Lin16F{d, _mm256_mul_ps(d, _mm256_set1_ps(-8.0f))};
  }
};
struct Q41Tab {  // d * f32(c) + m
  Tab16 operator()(const uint8_t* b) const {
    const __m256 d = bcast_f16(b), m = bcast_f16(b + 2);
    return Tab16{_mm256_add_ps(_mm256_mul_ps(d, iota_lo()), m), _mm256_add_ps(_mm256_mul_ps(d, iota_hi()), m)};
  }
};
struct Iq4nlTab {  // d * kvalue[c]
  Tab16 kv;
  Tab16 operator()(const uint8_t* b) const {
    const __m256 d = bcast_f16(b);
    return Tab16{_mm256_mul_ps(d, kv.lo), _mm256_mul_ps(d, kv.hi)};
  }
};

struct Q80 {  // f32(q) * d
  static constexpr bool kSplitX = false;
  static constexpr int kStep = 1;
  struct Row { const uint8_t* q; };
  Row row(const uint8_t* q, const uint8_t*, const uint8_t*) const { return Row{q}; }
  template <int J>
  void chunk(Row& r, int64_t ci, __m256* w) const {
    const uint8_t* b = r.q + ci * Q8_0_BYTES;
    const __m256 d = bcast_f16(b);
    for (int v = 0; v < 4; ++v) w[v] = _mm256_mul_ps(sext8(b + 2 + 8 * v), d);
  }
};

// q4_k: as the AVX-512 decoder, a super-block per step; its 8 (d * sc, dmin * m) in two registers
struct Q4K {
  static constexpr bool kSplitX = false;
  static constexpr int kStep = 8;
  struct Row { const uint8_t* q; __m256 dsc, dm; };
  Row row(const uint8_t* q, const uint8_t*, const uint8_t*) const {
    return Row{q, _mm256_setzero_ps(), _mm256_setzero_ps()};
  }
  template <int J>
  void chunk(Row& r, int64_t sb, __m256* w) const {
    const uint8_t* b = r.q + sb * Q4_K_BYTES;
    if constexpr (J == 0) {
      alignas(32) float dsc[8], dm[8];
      const float d = load_f16v(b), dmin = load_f16v(b + 2);
      for (int t = 0; t < 8; ++t) {
        int sc, mn;
        q4k_scale_min(b + 4, t, &sc, &mn);
        dsc[t] = d * (float)sc;
        dm[t] = dmin * (float)mn;
      }
      r.dsc = _mm256_load_ps(dsc);
      r.dm = _mm256_load_ps(dm);
    }
    const __m256 ds = lane(r.dsc, J), m = lane(r.dm, J);
    const Tab16 t{_mm256_sub_ps(_mm256_mul_ps(ds, iota_lo()), m), _mm256_sub_ps(_mm256_mul_ps(ds, iota_hi()), m)};
    const uint8_t* qs = b + 16 + 32 * (J >> 1);
    for (int v = 0; v < 4; ++v) {
      __m256i c = zext8(qs + 8 * v);
      if constexpr (J & 1) c = _mm256_srli_epi32(c, 4);
      w[v] = t(c);
    }
  }
};

// q6_k: as the AVX-512 decoder; the 16 products d * sc per super-block in two registers
struct Q6K {
  static constexpr bool kSplitX = false;
  static constexpr int kStep = 8;
  struct Row { const uint8_t* q; __m256 ds[2]; };
  Row row(const uint8_t* q, const uint8_t*, const uint8_t*) const { return Row{q, {}}; }
  template <int J>
  void chunk(Row& r, int64_t sb, __m256* w) const {
    const uint8_t* b = r.q + sb * Q6_K_BYTES;
    constexpr int h = J >> 2, i = J & 3;
    if constexpr (J == 0) {
      const __m256 d = bcast_f16(b + 208);
      r.ds[0] = _mm256_mul_ps(d, sext8(b + 192));
      r.ds[1] = _mm256_mul_ps(d, sext8(b + 200));
    }
    const __m256i l = _mm256_loadu_si256((const __m256i*)(b + 64 * h + 32 * (i & 1)));
    const __m256i hb = _mm256_loadu_si256((const __m256i*)(b + 128 + 32 * h));
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
    const __m256i nib = _mm256_and_si256((i >> 1) ? _mm256_srli_epi16(l, 4) : l, m4);
    const __m256i top = _mm256_and_si256(_mm256_srli_epi16(hb, 2 * i), m2);
    const __m256i c = _mm256_sub_epi8(_mm256_or_si256(nib, _mm256_slli_epi16(top, 4)), _mm256_set1_epi8(32));
    constexpr int s0 = 8 * h + 2 * i;  // scale of elements 0..15; s0 + 1 for 16..31
    const __m256 d0 = lane(r.ds[s0 >> 3], s0 & 7), d1 = lane(r.ds[(s0 + 1) >> 3], (s0 + 1) & 7);
    const __m128i c0 = _mm256_castsi256_si128(c), c1 = _mm256_extracti128_si256(c, 1);
    const __m128i part[4] = {c0, _mm_srli_si128(c0, 8), c1, _mm_srli_si128(c1, 8)};
    for (int v = 0; v < 4; ++v) w[v] = _mm256_mul_ps(v < 2 ? d0 : d1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part[v])));
  }
};

struct Int8 {  // f32(q) * scale, one fp32 scale per row; any k
  static constexpr bool kSplitX = false;
  static constexpr int kStep = 1;
  struct Row { const uint8_t* q; __m256 s; };
  Row row(const uint8_t* q, const uint8_t* s, const uint8_t*) const {
    float f;
    __builtin_memcpy(&f, s, 4);
    return Row{q, _mm256_set1_ps(f)};
  }
  template <int J>
  void chunk(Row& r, int64_t ci, __m256* w) const {
    for (int v = 0; v < 4; ++v) w[v] = _mm256_mul_ps(sext8(r.q + 32 * ci + 8 * v), r.s);
  }
  void tail(Row& r, int64_t ci, int n, __m256* w) const {  // codes past n read as 0: weight 0
    alignas(32) uint8_t c[32] = {};
    for (int j = 0; j < n; ++j) c[j] = r.q[32 * ci + j];
    for (int v = 0; v < 4; ++v) w[v] = _mm256_mul_ps(sext8(c + 8 * v), r.s);
  }
};

using V = V256;
Tab16 book(const float* b) { return Tab16{_mm256_loadu_ps(b), _mm256_loadu_ps(b + 8)}; }
Tab16 iq4nl_kv() {
  return Tab16{_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)kIQ4NL))),
               _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(kIQ4NL + 8))))};
}

#define PQK_ARGS q, s, z, rb, r0, r1, k, x, ldx, m, y, ldy, bias
#define PQK_PARAMS                                                                                       \
  const uint8_t *q, const uint8_t *s, const uint8_t *z, const pqk_row_bytes &rb, int64_t r0, int64_t r1, \
      int64_t k, const float *x, int64_t ldx, int64_t m, float *y, int64_t ldy, const float *bias

// Rows [r0, r1) with the decoder `fast`, whose tables skip Lin16's test for a non-finite scale
// (Lin16F), then each weight row with a result that is not finite (such a scale makes it NaN;
// an Inf in x or a sum that overflows does too) again with `tested`: every result is the tested
// decoder's, bit for bit. Callgrind, M = 1, 4096 columns: int4 g128 27.2 -> 20.8 instructions
// per 32 weights (with GroupNibK), q4_0 31.4 -> 23.4 (with two blocks per step); the loop is
// bound by instructions issued, so time follows (one thread on a Zen 3, 4096x4096, C ABI, min of
// 300 calls: int4 1.64-1.72 -> 1.32-1.48 ms, q4_0 1.39-1.99 -> 1.30-1.38).
template <class Fast, class Tested>
bool fast_then_tested(const Fast& fast, const Tested& tested, PQK_PARAMS) {
  if (!gemv_f32::run<V>(fast, PQK_ARGS)) return false;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t i = 0; i < m; ++i) {
      const float v = y[i * ldy + r];
      if (v - v != 0.0f) {  // Inf or NaN
        if (!gemv_f32::run<V>(tested, q, s, z, rb, r, r + 1, k, x, ldx, m, y, ldy, bias)) return false;
        break;
      }
    }
  return true;
}

// GroupNibK for CPG chunks per group, or GroupNib (cpg at run time) for CPG = 0
template <bool HighFirst, int CPG, class TabOf>
auto group_dec(const TabOf& t, int64_t cpg) {
  if constexpr (CPG != 0) return GroupNibK<TabOf, HighFirst, CPG>{t};
  else return GroupNib<TabOf, HighFirst>{t, cpg};
}
template <bool HighFirst, int CPG, class TabOf>
bool run_groups(const TabOf& t, int64_t cpg, PQK_PARAMS) {
  if constexpr (std::is_same<TabOf, Int4Tab>::value) {  // symmetric: a constant offset
    if (t.sym) return fast_then_tested(group_dec<HighFirst, CPG>(Int4FiniteTab<true>{}, cpg), group_dec<HighFirst, CPG>(t, cpg), PQK_ARGS);
    return fast_then_tested(group_dec<HighFirst, CPG>(Int4FiniteTab<false>{}, cpg), group_dec<HighFirst, CPG>(t, cpg), PQK_ARGS);
  }
  return gemv_f32::run<V>(group_dec<HighFirst, CPG>(t, cpg), PQK_ARGS);
}

// The grouped nibble formats' kernel for cpg chunks per group (see gemv_f32_entries.inc)
template <bool HighFirst, class TabOf>
bool run_group_nib(const TabOf& t, int64_t cpg, PQK_PARAMS) {
  switch (cpg) {
    case 2: return run_groups<HighFirst, 2>(t, cpg, PQK_ARGS);
    case 4: return run_groups<HighFirst, 4>(t, cpg, PQK_ARGS);
    default: return run_groups<HighFirst, 0>(t, cpg, PQK_ARGS);
  }
}

// q4_0 (see gemv_f32_entries.inc): blocks two per step where k / 32 is even
bool run_q4_0(PQK_PARAMS) {
  using Tested = Ggml32<Q4_0_BYTES, 2, Q40Tab>;
  if ((k / 32) % 2 == 0) return fast_then_tested(Ggml32<Q4_0_BYTES, 2, Q40FastTab, 2>{}, Tested{}, PQK_ARGS);
  return fast_then_tested(Ggml32<Q4_0_BYTES, 2, Q40FastTab>{}, Tested{}, PQK_ARGS);
}

#undef PQK_PARAMS
#undef PQK_ARGS

}  // namespace

#include "../gemv_f32_entries.inc"

}}  // namespace pqk::avx2
