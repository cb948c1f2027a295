// Adapter kernels (AVX-512). Expansion: 16 output columns per vector, the same per-lane
// operations and order as ref::lora_expand (rank r into FMA chain r % 4, chains added as
// (c0 + c1) + (c2 + c3), then scale, DoRA factor and bias), so results are identical.
// Shrink: fp32 dot products (4 adapter rows share each load of x), FMA, any order (the same for
// every split of the rank columns).
// A and B may be fp32, fp16 (vcvtph2ps) or bf16 (shift into the high half): widened exactly.
#include "../avx512_gcc12_warnings.h"  // before <immintrin.h>
#include <immintrin.h>

#include "../../core/kernel_table.h"

namespace pqk { namespace avx512 {

namespace {

// 16 elements at p + i (masked), widened to fp32
template <int DT>
inline __m512 load16t(const void* p, int64_t i, __mmask16 mk) {
  if (DT == 0) return _mm512_maskz_loadu_ps(mk, (const float*)p + i);
  const __m256i h = _mm256_maskz_loadu_epi16(mk, (const uint16_t*)p + i);
  if (DT == 1) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// out[u] = sum_r ta[r] * Bp[b0 + u * stride + 16 r + lane] for U tiles (stride elements apart):
// rank r into FMA chain r % 4 of its tile, then (c0 + c1) + (c2 + c3). The U tiles' chains are
// independent and interleave: a tile's 4 chains and final adds alone leave the FMA pipes idle.
template <int DT, int U>
inline void rank_sums(const float* ta, const void* Bp, int64_t b0, int64_t stride, int rank, __mmask16 mk,
                      __m512* out) {
  __m512 c[U][4];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) c[u][0] = c[u][1] = c[u][2] = c[u][3] = _mm512_setzero_ps();
  int r = 0;
  for (; r + 4 <= rank; r += 4)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const __m512 tq = _mm512_set1_ps(ta[r + q]);
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u)
        c[u][q] = _mm512_fmadd_ps(tq, load16t<DT>(Bp, b0 + u * stride + (r + q) * 16, mk), c[u][q]);
    }
  // the last rank % 4 ranks (constant indices: a variable one keeps c in memory)
#pragma GCC unroll 3
  for (int q = 0; q < 3; ++q)
    if (r + q < rank)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u)
        c[u][q] = _mm512_fmadd_ps(_mm512_set1_ps(ta[r + q]), load16t<DT>(Bp, b0 + u * stride + (r + q) * 16, mk), c[u][q]);
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) out[u] = _mm512_add_ps(_mm512_add_ps(c[u][0], c[u][1]), _mm512_add_ps(c[u][2], c[u][3]));
}

// bf16 B, even rank, one full 16-column tile: one 64-byte load holds ranks r and r+1 of the 16
// rows as 32-bit lanes (row 2j, row 2j+1) of rank r in lanes j < 8, of rank r+1 in lanes j >= 8.
// Shifting a lane left by 16 widens its even row, masking the low half widens its odd row: two
// ALU ops per two ranks instead of two zero-extending shuffles and two shifts. tv[p] holds
// t[2p] in lanes 0-7 and t[2p+1] in lanes 8-15, so lane j < 8 of an accumulator fed by even
// pairs (ranks 4q, 4q+1) is chain 0 of its row and lane j >= 8 chain 1; odd pairs give chains
// 2 and 3. Each chain sees its ranks in the same order as rank_sums, so the sum is bit-identical.
// U tiles (stride elements apart) at a time, as rank_sums.
template <int U>
inline void rank_sums_bf16_pairs(const __m512* tv, const uint16_t* Bt, int64_t stride, int rank, __m512* out) {
  const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
  __m512 e01[U], o01[U], e23[U], o23[U];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) e01[u] = o01[u] = e23[u] = o23[u] = _mm512_setzero_ps();
  int p = 0;
  for (; 2 * p + 4 <= rank; p += 2)
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const __m512i P0 = _mm512_loadu_si512((const void*)(Bt + u * stride + 32 * p));
      const __m512i P1 = _mm512_loadu_si512((const void*)(Bt + u * stride + 32 * p + 32));
      e01[u] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(P0, 16)), tv[p], e01[u]);
      o01[u] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(P0, hi)), tv[p], o01[u]);
      e23[u] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(P1, 16)), tv[p + 1], e23[u]);
      o23[u] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(P1, hi)), tv[p + 1], o23[u]);
    }
  if (2 * p < rank)  // rank % 4 == 2: one more even pair
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const __m512i P0 = _mm512_loadu_si512((const void*)(Bt + u * stride + 32 * p));
      e01[u] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(P0, 16)), tv[p], e01[u]);
      o01[u] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(P0, hi)), tv[p], o01[u]);
    }
  // lanes 0-7: even rows, lanes 8-15: odd rows; c0 + c1 then + (c2 + c3)
  const __m512i rows = _mm512_set_epi32(15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0);
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) {
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(e01[u], o01[u], 0x44), _mm512_shuffle_f32x4(e01[u], o01[u], 0xEE));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(e23[u], o23[u], 0x44), _mm512_shuffle_f32x4(e23[u], o23[u], 0xEE));
    out[u] = _mm512_permutexvar_ps(rows, _mm512_add_ps(s01, s23));
  }
}

constexpr int kPairMaxRank = 128;  // tv on the stack: rank / 2 vectors

// tv[p] = (t[2p] in lanes 0-7, t[2p+1] in lanes 8-15) for rank_sums_bf16_pairs
inline void pair_vectors(const float* ta, int rank, __m512* tv) {
  for (int p = 0; p < rank / 2; ++p)
    tv[p] = _mm512_mask_blend_ps((__mmask16)0xFF00, _mm512_set1_ps(ta[2 * p]), _mm512_set1_ps(ta[2 * p + 1]));
}

// One adapter over the columns [n0, n0 + nr) of row i (v = y (+ scale * acc) (* row_scale)
// (+ bias when last)): up to rank 32 whole tiles two at a time (the bf16 pair path for even
// ranks), then single and partial ones (B tiles are padded to 16 rows, so a short last tile
// reads only its own block). 512 columns, B from L2, bf16 / fp16 / fp32 B: rank 8 0.20 / 0.17 /
// 0.19 -> 0.14 / 0.12 / 0.17 us, rank 16 0.30 / 0.28 / 0.29 -> 0.22 / 0.20 / 0.25, rank 32
// 0.51 / 0.44 / 0.59 -> 0.39 / 0.35 / 0.53; at rank 64 one tile has work enough (two: +3-7%).
template <int DT>
void expand_one(const pqk_lora& ad, const float* ta, int64_t n0, int nr, float* yr, const float* bias,
                int64_t n_tiles) {
  const bool pairs = DT == 2 && ad.rank % 2 == 0 && ad.rank <= kPairMaxRank;
  __m512 tv[DT == 2 ? kPairMaxRank / 2 : 1];
  if (pairs) pair_vectors(ta, ad.rank, tv);
  const __m512 vs = _mm512_set1_ps(ad.scale);
  const int64_t ts = (int64_t)ad.rank * 16;  // B elements per 16-column tile
  // B 16 tiles ahead (at most 16 KB): in a model B comes from DRAM once per token, a stream too
  // short for the hardware prefetcher to reach speed. Rank 16 at 4096, 8 layers from DRAM,
  // per layer, 1 / 2 threads: bf16 +23.6 / +10.8 -> +20.4 / +9.3 us, fp32 +30.5 / +17.9 ->
  // +25.6 / +14.4 (was 2 tiles ahead for 16-bit B, 8 for fp32; the 16-bit A prefetch in
  // shrink_rows is part of these figures); one layer in L3, 1 thread: -0.4 to -0.9 us.
  const int64_t bytes = ts * (DT == 0 ? 4 : 2);
  const int64_t ahead = bytes * 16 <= 16384 ? 16 : (16384 / bytes > 2 ? 16384 / bytes : 2);
  auto prefetch = [&](int64_t tile) {
    const char* nb = (const char*)ad.Bp + (tile + ahead) * bytes;
    if (tile + ahead < n_tiles)
      for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(nb + o, _MM_HINT_T0);
  };
  // v = y + scale * acc (* row_scale) (+ bias) for the columns of mk from n
  auto store = [&](__m512 acc, int64_t n, float* yp, __mmask16 mk) {
    __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(mk, yp), _mm512_mul_ps(vs, acc));
    if (ad.row_scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mk, ad.row_scale + n));
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, bias + n));
    _mm512_mask_storeu_ps(yp, mk, v);
  };
  int c0 = 0;
  if (n0 % 16 == 0 && ad.rank <= 32)
    for (; c0 + 32 <= nr; c0 += 32) {
      const int64_t tile = (n0 + c0) / 16;
      prefetch(tile);
      prefetch(tile + 1);
      __m512 acc[2];
      if (pairs) rank_sums_bf16_pairs<2>(tv, (const uint16_t*)ad.Bp + tile * ts, ts, ad.rank, acc);
      else rank_sums<DT, 2>(ta, ad.Bp, tile * ts, ts, ad.rank, (__mmask16)0xFFFF, acc);
      store(acc[0], n0 + c0, yr + c0, (__mmask16)0xFFFF);
      store(acc[1], n0 + c0 + 16, yr + c0 + 16, (__mmask16)0xFFFF);
    }
  while (c0 < nr) {
    const int64_t n = n0 + c0;
    const int cn = nr - c0 < 16 - (int)(n % 16) ? nr - c0 : 16 - (int)(n % 16);
    const __mmask16 mk = (__mmask16)((1u << cn) - 1);
    const int64_t b0 = (n / 16) * ts + n % 16;  // one contiguous [rank][16] block
    prefetch(n / 16);
    __m512 acc;
    if (pairs && n % 16 == 0) rank_sums_bf16_pairs<1>(tv, (const uint16_t*)ad.Bp + b0, ts, ad.rank, &acc);
    else rank_sums<DT, 1>(ta, ad.Bp, b0, ts, ad.rank, mk, &acc);
    store(acc, n, yr + c0, mk);
    c0 += cn;
  }
}

}  // namespace

namespace {

// dot(x[0:k], A[r + g, 0:k]) for the G rows from r (4 at a time, then 1): each row has two FMA
// chains (the 16-element halves of every 32), the last full 16 and the masked tail go to the
// first, then a + b and the lanes. Every row gets these operations whatever G, so a column's
// value does not depend on how the columns were split into calls (threads). A is widened by
// load16t (bf16: zero-extend and shift): faster here than widening 32 bf16 at once into even /
// odd lanes, whose x permutes took a third of the time (rank 16 bf16 at 4096, A in L2: 1.5 ->
// 1.0 us, the rate L2 delivers A at).
template <int DT, int G>
inline void shrink_rows(const void* A, int64_t r, int64_t k, const float* x, float* t) {
  const int64_t k16 = k & ~(int64_t)15;
  const __mmask16 tail = (__mmask16)((1u << (k - k16)) - 1);
  __m512 a[G], b[G];
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) a[g] = b[g] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= k16; j += 32) {
    // each row (a separate stream, 8-16 KB apart at K = 4096) 1 KB ahead, the step's 64 (16-bit
    // A) or 128 bytes (fp32); the hardware prefetcher alone leaves these short strided streams
    // below the L3's and DRAM's rate (rank 16 at 4096, one cached layer, fp32: about -0.4 us of
    // the shrink; 16-bit A: see expand_one's figures)
    constexpr int ES = DT == 0 ? 4 : 2;
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 2
      for (int o = 0; o < 32 * ES; o += 64) _mm_prefetch((const char*)A + ((r + g) * k + j) * ES + 1024 + o, _MM_HINT_T0);
    const __m512 x0 = _mm512_loadu_ps(x + j), x1 = _mm512_loadu_ps(x + j + 16);
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      a[g] = _mm512_fmadd_ps(x0, load16t<DT>(A, (r + g) * k + j, 0xFFFF), a[g]);
      b[g] = _mm512_fmadd_ps(x1, load16t<DT>(A, (r + g) * k + j + 16, 0xFFFF), b[g]);
    }
  }
  if (j < k16) {
    const __m512 x0 = _mm512_loadu_ps(x + j);
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) a[g] = _mm512_fmadd_ps(x0, load16t<DT>(A, (r + g) * k + j, 0xFFFF), a[g]);
  }
  if (tail) {
    const __m512 x0 = _mm512_maskz_loadu_ps(tail, x + k16);
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) a[g] = _mm512_fmadd_ps(x0, load16t<DT>(A, (r + g) * k + k16, tail), a[g]);
  }
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) t[g] = _mm512_reduce_add_ps(_mm512_add_ps(a[g], b[g]));
}

template <int DT>
void shrink_rows_t(const void* A, int64_t r0, int64_t r1, int64_t k, const float* x, float* t) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) shrink_rows<DT, 4>(A, r, k, x, t + (r - r0));
  for (; r < r1; ++r) shrink_rows<DT, 1>(A, r, k, x, t + (r - r0));
}

}  // namespace

void lora_shrink(const pqk_lora& ad, int64_t r0, int64_t r1, int64_t k, const float* x, float* t) {
  if (ad.dtype == 0) shrink_rows_t<0>(ad.A, r0, r1, k, x, t);
  else if (ad.dtype == 1) shrink_rows_t<1>(ad.A, r0, r1, k, x, t);
  else shrink_rows_t<2>(ad.A, r0, r1, k, x, t);
}

void lora_expand(const LoraArgs& L, int64_t m0, int64_t m1, int64_t n0, int nr, float* y, int64_t ldy) {
  // adapter by adapter over the columns (y holds v between adapters: the same per-value order
  // as ref, whose v stays in a register)
  for (int64_t i = m0; i < m1; ++i) {
    const float* ti = L.t + i * L.t_cols;
    float* yr = y + i * ldy + n0;
    int a0 = 0, a1 = L.n_ad;
    if (L.row_adapter) { a0 = L.row_adapter[i]; a1 = a0 + 1; }
    if (a0 < 0 || a0 >= a1) {  // no adapter on this row: bias only
      if (L.bias)
        for (int c0 = 0; c0 < nr; c0 += 16) {
          const __mmask16 mk = (__mmask16)(nr - c0 >= 16 ? 0xFFFF : (1u << (nr - c0)) - 1);
          _mm512_mask_storeu_ps(yr + c0, mk, _mm512_add_ps(_mm512_maskz_loadu_ps(mk, yr + c0),
                                                         _mm512_maskz_loadu_ps(mk, L.bias + n0 + c0)));
        }
      continue;
    }
    for (int a = a0; a < a1; ++a) {
      const pqk_lora& ad = L.ad[a];
      const float* ta = ti + (L.row_adapter ? 0 : L.t_off[a]);
      const float* bias = a + 1 == a1 ? L.bias : nullptr;
      if (ad.dtype == 0) expand_one<0>(ad, ta, n0, nr, yr, bias, (L.n + 15) / 16);
      else if (ad.dtype == 1) expand_one<1>(ad, ta, n0, nr, yr, bias, (L.n + 15) / 16);
      else expand_one<2>(ad, ta, n0, nr, yr, bias, (L.n + 15) / 16);
    }
  }
}

}}  // namespace pqk::avx512
