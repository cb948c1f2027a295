// int8-compute tile kernel over packed weights with AVX-512 VNNI (vpdpbusd: u8 weights x s8
// activations, 4 products per int32 lane, one lane per output row). Arithmetic and order
// exactly as core/packed.h (mul then add, blocks in K order), so it matches ref bit for bit.
#include "../avx512_gcc12_warnings.h"  // before <immintrin.h>
#include <immintrin.h>

#include "../../core/kernel_table.h"
#include "../../core/packed.h"
#include "../x86_avx512/asm512.h"
#include "../x86_avx512/packed_params512.h"  // load_a, load_m

namespace pqk { namespace avx512vnni {

namespace {

#ifndef PQK_VNNI_MR
#define PQK_VNNI_MR 10
#endif
constexpr int MR = PQK_VNNI_MR;  // activation rows sharing one decode of the weight block
static_assert(MR >= 1 && MR <= 16, "tile_kernel's tail switch covers 1..15 remaining rows");
// 4 activation bytes read as one int32 (folds into vpdpbusd's {1to16} memory broadcast)
typedef int32_t __attribute__((may_alias, aligned(1))) i32_unaligned;

// acc += u8 lanes of w times the 4 signed activation bytes at p, broadcast to every lane. GCC
// (12) loads the broadcast with a separate vpbroadcastd instead of vpdpbusd's {1to16} memory
// operand: one more FP-pipe op per dot product, ~25% of the GEMV loop's vector ops.
inline __m512i dpbusd_x4(__m512i acc, __m512i w, const int8_t* p) {
#if PQK_ZMM_ASM
  __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const i32_unaligned*)p));
  return acc;
#else
  return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(*(const i32_unaligned*)p));
#endif
}

// acc += (int16 low half of each lane of o) * (int16 at p), for p -> -block sum (ActQ::xn): the
// offset term -o * sum(xq) in one op (vpdpwssd; the high halves are 0 on both sides).
inline __m512i dpwssd_x1(__m512i acc, __m512i o, const int32_t* p) {
#if PQK_ZMM_ASM
  __asm__("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(o), "m"(*p));
  return acc;
#else
  return _mm512_dpwssd_epi32(acc, o, _mm512_set1_epi32(*p));
#endif
}

// R activation rows from i0 over one tile: the row loop has a constant trip count, so the R
// accumulators stay in registers (a run-time count kept them on the stack: a load and a store
// per row and block). XO: one offset for all rows (w.o_const != 0), each block's dot product
// starting from ActQ::xo; a template parameter, because a test of it in the row loop split the
// rows into separate basic blocks that GCC then did not interleave (q4_0 M=128 -15-20%).
template <bool NIB, int BLK, bool HAS_MIN, bool ROW_OFF, bool LUT, bool XO, int R>
void tile_rows(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t i0, float* y, int64_t ldy,
               const float* bias) {
  const int64_t n0 = tile * NR;
  const int nr = (int)(w.n - n0 < NR ? w.n - n0 : NR);
  const __mmask16 mask = (__mmask16)((1u << nr) - 1);
  const uint8_t* ct = w.codes + tile * w.tile_code_bytes;
  constexpr int BCB = NIB ? BLK * NR / 2 : BLK * NR;  // code bytes per block
  constexpr int PER = QBLK / BLK;
  constexpr int NQ = BLK / 4;                           // quads (registers) per block
  const __m512i lo4 = _mm512_set1_epi8(0x0F);
  const __m512i vlut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)w.lut16));
  const int64_t nkb = w.k / QBLK;
  __m512 acc[R];
#pragma GCC unroll 16
  for (int ii = 0; ii < R; ++ii) acc[ii] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < nkb; ++kb) {
    for (int sub = 0; sub < PER; ++sub) {
      const int64_t b = kb * PER + sub;
      const uint8_t* cb = ct + b * BCB;
      __m512i W[NQ > 8 ? NQ : 8];
      if (NIB) {
        for (int j = 0; j < 4; ++j) {
          __m512i p = _mm512_load_si512((const void*)(cb + 64 * j));
          PQK_IN_ZMM(p);  // one load for both nibbles (see gemv_rows)
          W[j] = _mm512_and_si512(p, lo4);
          W[j + 4] = _mm512_and_si512(_mm512_srli_epi16(p, 4), lo4);
          if (LUT) {
            W[j] = _mm512_shuffle_epi8(vlut, W[j]);
            W[j + 4] = _mm512_shuffle_epi8(vlut, W[j + 4]);
          }
        }
      } else {
        for (int j = 0; j < NQ; ++j) W[j] = _mm512_load_si512((const void*)(cb + 64 * j));
      }
      const int64_t pi = w.par_index(tile, b);
      const __m512 vscale = load_a(w, pi);
      __m512 vmin = _mm512_setzero_ps();
      __m512i voff = _mm512_setzero_si512();
      if (HAS_MIN) vmin = load_m(w, pi);
      if (ROW_OFF) voff = _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i*)(w.offs + pi)));
#pragma GCC unroll 16
      for (int ii = 0; ii < R; ++ii) {
        const int64_t i = i0 + ii;
        const int8_t* xb = a.row_q(i) + b * BLK;
        const int32_t* xs16 = a.row_s(i);
        const int32_t xs = BLK == 32 ? xs16[2 * kb] + xs16[2 * kb + 1] : xs16[b];
        const float dx = a.row_d(i)[kb];
        // two independent chains (even / odd quads): vpdpbusd latency, not throughput, bounds
        // one long chain. Block 32: the first starts from -o * sum(xq): for one o for all rows
        // (q4_0) that value is in ActQ::xo and its broadcast is a load, no vector op (M=128
        // q4_0 6% faster); for an o per row, one vpdpwssd (see ActQ::xn) instead of a multiply
        // and a subtract per row.
        __m512i c0 = _mm512_setzero_si512(), c1 = _mm512_setzero_si512();
        if (BLK == 32 && ROW_OFF) c0 = dpwssd_x1(c0, voff, a.row_n(i) + kb);
        else if (BLK == 32 && XO) c0 = _mm512_set1_epi32(a.row_o(i)[kb]);
#pragma GCC unroll 8
        for (int j = 0; j < NQ; j += 2) {
          c0 = dpbusd_x4(c0, W[j], xb + 4 * j);
          c1 = dpbusd_x4(c1, W[j + 1], xb + 4 * j + 4);
        }
        __m512i isum = _mm512_add_epi32(c0, c1);
        // block 16 (q6_k): o * xs with vpmaddwd: o sits in the low int16 of its lane, the high
        // one is 0, and |xs| <= 16 * 127 fits int16, so the product is exact
        if (BLK != 32) {
          if (ROW_OFF) isum = _mm512_sub_epi32(isum, _mm512_madd_epi16(voff, _mm512_set1_epi32((uint16_t)xs)));
          else isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(w.o_const * xs));
        }
        const __m512 da = _mm512_mul_ps(vscale, _mm512_set1_ps(dx));
        acc[ii] = _mm512_add_ps(acc[ii], _mm512_mul_ps(_mm512_cvtepi32_ps(isum), da));
        if (HAS_MIN) {
          const float mx = dx * (float)xs;
          acc[ii] = _mm512_add_ps(acc[ii], _mm512_mul_ps(vmin, _mm512_set1_ps(mx)));
        }
      }
    }
  }
  const __m512 vbias = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int ii = 0; ii < R; ++ii)
    _mm512_mask_storeu_ps(y + (i0 + ii) * ldy + n0, mask, bias ? _mm512_add_ps(acc[ii], vbias) : acc[ii]);
}

// rows [m0, m1) over one tile: groups of MR rows, then the remaining 1..MR-1
template <bool NIB, int BLK, bool HAS_MIN, bool ROW_OFF, bool LUT, bool XO>
void tile_groups(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
                 const float* bias) {
  int64_t i0 = m0;
  for (; i0 + MR <= m1; i0 += MR) tile_rows<NIB, BLK, HAS_MIN, ROW_OFF, LUT, XO, MR>(w, tile, a, i0, y, ldy, bias);
  switch (m1 - i0) {
#define PQK_ROWS(r) \
  case r: return tile_rows<NIB, BLK, HAS_MIN, ROW_OFF, LUT, XO, (r < MR ? r : 1)>(w, tile, a, i0, y, ldy, bias);
    PQK_ROWS(1) PQK_ROWS(2) PQK_ROWS(3) PQK_ROWS(4) PQK_ROWS(5) PQK_ROWS(6) PQK_ROWS(7) PQK_ROWS(8) PQK_ROWS(9)
    PQK_ROWS(10) PQK_ROWS(11) PQK_ROWS(12) PQK_ROWS(13) PQK_ROWS(14) PQK_ROWS(15)
#undef PQK_ROWS
    default: return;
  }
}

// w.o_const (block 32, one offset for all rows) made a compile-time XO for tile_rows
template <bool NIB, int BLK, bool HAS_MIN, bool ROW_OFF, bool LUT = false>
void tile_kernel(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
                 const float* bias) {
  if constexpr (BLK == 32 && !ROW_OFF)
    if (w.o_const != 0) return tile_groups<NIB, BLK, HAS_MIN, ROW_OFF, LUT, true>(w, tile, a, m0, m1, y, ldy, bias);
  tile_groups<NIB, BLK, HAS_MIN, ROW_OFF, LUT, false>(w, tile, a, m0, m1, y, ldy, bias);
}

// GEMV-oriented variant for plain nibble formats (no LUT) and R = 1 or 2 activation rows: the
// high nibbles are used in place as 16*hi (P & 0xF0) in their own accumulator and shifted down
// once per block: the sum is a multiple of 16, so (sum >> 4) is exact and the integer result is
// the same as tile_rows'. Saves the per-register shift of the decode, which dominates when few
// activation rows share it. Each 64-byte code register is loaded once for both its masks and
// both rows: left to itself GCC folds the load into each vpandd, and loads (2 per cycle on Zen
// 4/5, with the activation broadcasts) then bound the loop. Codes in L1, cycles per block:
// 1 row ~9.7 -> ~7.6, 2 rows ~20.5 -> ~13 (with the row pointers hoisted and PE below).
// PE: blocks per parameter group as a constant (0: w.par_every at run time). 1 (q4_0, q4_1,
// q4_k) folds the group loop away; 4 (int2/3/4 group 128, the usual GPTQ / AWQ / ORT group)
// unrolls it: int4 g128, 1 row, codes in L2 ~9.1 -> ~7.9 cycles a block, 4096x4096 from L3
// 85-92 -> 77-91 us (kernel harness; from DRAM unchanged).
template <bool HAS_MIN, bool ROW_OFF, bool XO, int R, int PE>
inline void gemv_rows(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t i0, float* y, int64_t ldy,
                      __mmask16 mask, const float* bias) {
  const uint8_t* ct = w.codes + tile * w.tile_code_bytes;
  const __m512i lo4 = _mm512_set1_epi8(0x0F), hi4 = _mm512_set1_epi8((char)0xF0);
  const int64_t nkb = w.k / QBLK;
  // row pointers once: recomputed per group (per block for q4_0) they cost ~2.5 cycles a block
  const int8_t* xq[R];
  const float* dxr[R];
  const int32_t* xo[R];  // -o * sum(xq) (XO: q4_0) or -sum(xq) as int16 (ROW_OFF)
  const int32_t* xs[R];
  __m512 acc[R];
  for (int r = 0; r < R; ++r) {
    xq[r] = a.row_q(i0 + r);
    dxr[r] = a.row_d(i0 + r);
    xo[r] = ROW_OFF ? a.row_n(i0 + r) : XO ? a.row_o(i0 + r) : nullptr;
    xs[r] = a.row_s(i0 + r);
    acc[r] = _mm512_setzero_ps();
  }
  // blocks by parameter group (int4 g128: 4 blocks share a, o): no division per block, and the
  // group's parameters are loaded once
  const int64_t pe = PE ? PE : w.par_every;
  for (int64_t g = 0, b = 0; b < nkb; ++g) {
    const int64_t pi = (tile * w.npar + g) * NR;
    const __m512 va = load_a(w, pi);
    const __m512i vo = ROW_OFF ? _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i*)(w.offs + pi))) : _mm512_setzero_si512();
    __m512 vmin = _mm512_setzero_ps();
    if (HAS_MIN) vmin = load_m(w, pi);
#pragma GCC unroll 4
    for (int64_t bi = 0; bi < pe; ++bi, ++b) {
      const uint8_t* cb = ct + b * (32 * NR / 2);
      // the low-nibble sum starts from -o * sum(xq) (as in tile_rows); the high nibbles, used
      // in place as 16*hi, get their own accumulator and one shift
      __m512i il[R], ih[R];
      for (int r = 0; r < R; ++r) {
        il[r] = _mm512_setzero_si512();
        ih[r] = _mm512_setzero_si512();
        if (ROW_OFF) il[r] = dpwssd_x1(il[r], vo, xo[r] + b);
        else if (XO) il[r] = _mm512_set1_epi32(xo[r][b]);
      }
      for (int j = 0; j < 4; ++j) {
        __m512i p = _mm512_load_si512((const void*)(cb + 64 * j));
        PQK_IN_ZMM(p);  // one load, in a register (see above)
        const __m512i pl = _mm512_and_si512(p, lo4), ph = _mm512_and_si512(p, hi4);
        for (int r = 0; r < R; ++r) {
          const int8_t* xb = xq[r] + b * 32;
          il[r] = dpbusd_x4(il[r], pl, xb + 4 * j);
          ih[r] = dpbusd_x4(ih[r], ph, xb + 16 + 4 * j);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512i isum = _mm512_add_epi32(il[r], _mm512_srai_epi32(ih[r], 4));
        const float dx = dxr[r][b];
        const __m512 da = _mm512_mul_ps(va, _mm512_set1_ps(dx));
        acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(_mm512_cvtepi32_ps(isum), da));
        if (HAS_MIN) {
          const float mx = dx * (float)(xs[r][2 * b] + xs[r][2 * b + 1]);
          acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(vmin, _mm512_set1_ps(mx)));
        }
      }
    }
  }
  const __m512 vbias = bias ? _mm512_maskz_loadu_ps(mask, bias + tile * NR) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r)
    _mm512_mask_storeu_ps(y + (i0 + r) * ldy + tile * NR, mask, bias ? _mm512_add_ps(acc[r], vbias) : acc[r]);
}

// rows [m0, m1) in pairs (one pass over the tile's codes for both), then the odd one
template <bool HAS_MIN, bool ROW_OFF, bool XO, int PE>
void gemv_pairs(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
                const float* bias) {
  const int nr = (int)(w.n - tile * NR < NR ? w.n - tile * NR : NR);
  const __mmask16 mask = (__mmask16)((1u << nr) - 1);
  int64_t i = m0;
  for (; i + 2 <= m1; i += 2) gemv_rows<HAS_MIN, ROW_OFF, XO, 2, PE>(w, tile, a, i, y, ldy, mask, bias);
  if (i < m1) gemv_rows<HAS_MIN, ROW_OFF, XO, 1, PE>(w, tile, a, i, y, ldy, mask, bias);
}

template <bool HAS_MIN, bool ROW_OFF, bool XO>
void tile_kernel_gemv_xo(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y,
                         int64_t ldy, const float* bias) {
  if (w.par_every == 1) return gemv_pairs<HAS_MIN, ROW_OFF, XO, 1>(w, tile, a, m0, m1, y, ldy, bias);
  if (!HAS_MIN && w.par_every == 4) return gemv_pairs<HAS_MIN, ROW_OFF, XO, 4>(w, tile, a, m0, m1, y, ldy, bias);
  gemv_pairs<HAS_MIN, ROW_OFF, XO, 0>(w, tile, a, m0, m1, y, ldy, bias);
}

template <bool HAS_MIN, bool ROW_OFF>
void tile_kernel_gemv(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y,
                      int64_t ldy, const float* bias) {
  if (!ROW_OFF && w.o_const != 0) return tile_kernel_gemv_xo<HAS_MIN, ROW_OFF, true>(w, tile, a, m0, m1, y, ldy, bias);
  tile_kernel_gemv_xo<HAS_MIN, ROW_OFF, false>(w, tile, a, m0, m1, y, ldy, bias);
}

}  // namespace

void gemm_int8(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
               const float* bias) {
  if (w.nibbles && !w.lut && m1 - m0 <= 2) {
    if (w.has_min) return tile_kernel_gemv<true, false>(w, tile, a, m0, m1, y, ldy, bias);
    if (w.row_offset) return tile_kernel_gemv<false, true>(w, tile, a, m0, m1, y, ldy, bias);
    return tile_kernel_gemv<false, false>(w, tile, a, m0, m1, y, ldy, bias);
  }
  if (w.nibbles) {
    if (w.has_min) return tile_kernel<true, 32, true, false>(w, tile, a, m0, m1, y, ldy, bias);
    if (w.lut) return tile_kernel<true, 32, false, false, true>(w, tile, a, m0, m1, y, ldy, bias);
    if (w.row_offset) return tile_kernel<true, 32, false, true>(w, tile, a, m0, m1, y, ldy, bias);
    return tile_kernel<true, 32, false, false>(w, tile, a, m0, m1, y, ldy, bias);
  }
  if (w.blk == 16) return tile_kernel<false, 16, false, false>(w, tile, a, m0, m1, y, ldy, bias);
  return tile_kernel<false, 32, false, false>(w, tile, a, m0, m1, y, ldy, bias);
}

}}  // namespace pqk::avx512vnni
