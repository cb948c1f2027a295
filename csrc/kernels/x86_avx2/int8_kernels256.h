// int8-compute kernels over packed weights on 256-bit vectors, shared by the avx2 folder and the
// avxvnni folder, each compiling them with its own flags; everything here has internal linkage.
// DP is the folder's dot product: DP::kVnni (one vpdpbusd per quad, int32 sums) and
// DP::dot(acc, u8, s8) = acc + the 4-product sums per lane. The VNNI intrinsic appears only in
// the avxvnni folder, so this header compiles where the compiler has no AVX-VNNI (GCC < 11).
// Same packed layout and float arithmetic as core/packed.h, so every instantiation is
// bit-identical to ref.
//
// maddubs multiplies u8 x s8 into saturating int16 pairs. Codes <= 63 (nibbles, q6_k) cannot
// saturate (2*63*127 < 32767). Codes with offset 128 (q8_0, int8, nf4, iq4_nl) use the signed
// code c = u ^ 0x80 (= u - 128) instead: dot(c, xq) is already the exact isum, and the
// abs/sign trick keeps every pair <= 2*128*127 (vpdpbusd takes the same operands).
#pragma once
#include <immintrin.h>

#include <cstdlib>
#include <new>
#include <type_traits>

#include "../../core/kernel_table.h"
#include "../../core/packed.h"

namespace pqk { namespace {

constexpr int MR = 4;

// 8 per-row parameters at index pi, stored as fp32 or fp16, or two-level (q4_k, q6_k: d * q,
// exact; see packed.h). These helpers take no DP, so a copy GCC left out of line would carry no
// folder's namespace in its name (tests/test_isa_isolation.py): always inlined.
inline __attribute__((always_inline)) __m256 load_par(const float* f32, const uint16_t* f16, const float* d,
                                                      const int8_t* q, int64_t sup, int64_t pi) {
  if (q)
    return _mm256_mul_ps(_mm256_load_ps(d + sup),
                         _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + pi)))));
  return f16 ? _mm256_cvtph_ps(_mm_load_si128((const __m128i*)(f16 + pi))) : _mm256_load_ps(f32 + pi);
}
inline __attribute__((always_inline)) __m256 load_a(const PackedWeight& w, int64_t pi) {
  return load_par(w.scale, w.scale16, w.sd, w.sq, w.sq ? w.sup_index(pi) : 0, pi);
}
inline __attribute__((always_inline)) __m256 load_m(const PackedWeight& w, int64_t pi) {
  return load_par(w.minv, w.min16, w.md, w.mq, w.mq ? w.sup_index(pi) : 0, pi);
}

// 8 per-row zero points (asymmetric int2/3/4) as int32 lanes
inline __attribute__((always_inline)) __m256i load_offs(const PackedWeight& w, int64_t pi) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(w.offs + pi)));
}

// A block's float step for 8 tile rows and one activation row, as ref takes it (core/packed.h):
// acc + isum * (scale * dx), then + min * (dx * block sum of x) where the format has a min
template <bool HAS_MIN>
inline __attribute__((always_inline)) __m256 block_step(__m256 acc, __m256i isum, __m256 vscale, float dx,
                                                        __m256 vmin, float xm) {
  acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(vscale, _mm256_set1_ps(dx))));
  return HAS_MIN ? _mm256_add_ps(acc, _mm256_mul_ps(vmin, _mm256_set1_ps(xm))) : acc;
}

// One 16-row tile's per-row parameters (f32 / f16 / d, q as load_par takes them) as fp32
// [npar][NR]: the weight's own array where it is fp32, else decoded into buf, the same values
// load_par gives, once per tile rather than once per group of activation rows and block.
inline __attribute__((always_inline)) const float* tile_params(const PackedWeight& w, int64_t tile, const float* f32,
                                                               const uint16_t* f16, const float* d, const int8_t* q,
                                                               float* buf) {
  const int64_t p0 = tile * w.npar * NR;
  if (!q && !f16) return f32 + p0;
  for (int64_t p = 0; p < w.npar * NR; p += 8)
    _mm256_store_ps(buf + p, load_par(f32, f16, d, q, q ? w.sup_index(p0 + p) : 0, p0 + p));
  return buf;
}

// f(i0, R) for the activation rows [m0, m1): groups of 4 rows, then the 1-3 left (R an
// std::integral_constant, so each kernel's row loops have constant trip counts)
template <class F>
inline void row_groups(int64_t m0, int64_t m1, F f) {
  int64_t i0 = m0;
  for (; i0 + 4 <= m1; i0 += 4) f(i0, std::integral_constant<int, 4>());
  switch (m1 - i0) {
    case 1: return f(i0, std::integral_constant<int, 1>());
    case 2: return f(i0, std::integral_constant<int, 2>());
    case 3: return f(i0, std::integral_constant<int, 3>());
    default: return;
  }
}

// y for R activation rows from i0 and the tile's rows 8h .. 8h + 7 (those below nr), + bias
template <class DP, int R>  // DP: the folder's type, in the name of each folder's copy
inline void store_half(const __m256* acc, int h, int nr, int64_t i0, int64_t n0, float* y, int64_t ldy,
                       const float* bias) {
  for (int ii = 0; ii < R; ++ii) {
    alignas(32) float out[8];
    _mm256_store_ps(out, acc[ii]);
    for (int r = 0; r < 8; ++r) {
      const int row = 8 * h + r;
      if (row >= nr) break;
      y[(i0 + ii) * ldy + n0 + row] = bias ? out[r] + bias[n0 + row] : out[r];
    }
  }
}

// R activation rows from i0 over one tile (R a constant, so no run-time trip count keeps the row
// loop's accumulators on the stack)
template <class DP, bool NIB, int BLK, bool HAS_MIN, bool ROW_OFF, bool LUT, bool SIGNED, int R>
void tile_rows(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t i0, float* y, int64_t ldy,
               const float* bias) {
  const int64_t n0 = tile * NR;
  const int nr = (int)(w.n - n0 < NR ? w.n - n0 : NR);
  const uint8_t* ct = w.codes + tile * w.tile_code_bytes;
  constexpr int BCB = NIB ? BLK * NR / 2 : BLK * NR;
  constexpr int PER = QBLK / BLK;
  constexpr int NQ = BLK / 4;
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  const __m256i ones16 = _mm256_set1_epi16(1);
  const __m256i flip = _mm256_set1_epi8((char)0x80);
  alignas(16) uint8_t lut_s[16];
  for (int i = 0; i < 16; ++i) lut_s[i] = (uint8_t)(w.lut16[i] ^ (SIGNED ? 0x80 : 0));
  const __m256i vlut = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)lut_s));
  const int64_t nkb = w.k / QBLK;

  for (int h = 0; h < 2; ++h) {  // rows 0-7, then rows 8-15 of the tile
    __m256 acc[R];
#pragma GCC unroll 8
    for (int ii = 0; ii < R; ++ii) acc[ii] = _mm256_setzero_ps();
    int64_t g = 0, g_end = w.par_every;  // parameter group of block b (no division per block)
    for (int64_t kb = 0; kb < nkb; ++kb) {
      for (int sub = 0; sub < PER; ++sub) {
        const int64_t b = kb * PER + sub;
        if (b == g_end) { ++g; g_end += w.par_every; }
        const uint8_t* cb = ct + b * BCB + 32 * h;
        __m256i W[8];
        if (NIB) {
          for (int j = 0; j < 4; ++j) {
            __m256i p = _mm256_load_si256((const __m256i*)(cb + 64 * j));
            W[j] = _mm256_and_si256(p, lo4);
            W[j + 4] = _mm256_and_si256(_mm256_srli_epi16(p, 4), lo4);
            if (LUT) {
              W[j] = _mm256_shuffle_epi8(vlut, W[j]);
              W[j + 4] = _mm256_shuffle_epi8(vlut, W[j + 4]);
            }
          }
        } else {
          for (int j = 0; j < NQ; ++j) {
            W[j] = _mm256_load_si256((const __m256i*)(cb + 64 * j));
            if (SIGNED) W[j] = _mm256_xor_si256(W[j], flip);
          }
        }
        __m256i Wabs[8];
        if (SIGNED)
          for (int j = 0; j < NQ; ++j) Wabs[j] = _mm256_abs_epi8(W[j]);
        const int64_t pi = (tile * w.npar + g) * NR + 8 * h;
        const __m256 vscale = load_a(w, pi);
        const __m256 vmin = HAS_MIN ? load_m(w, pi) : _mm256_setzero_ps();
        const __m256i voff = ROW_OFF ? load_offs(w, pi) : _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int ii = 0; ii < R; ++ii) {
          const int64_t i = i0 + ii;
          const int8_t* xb = a.row_q(i) + b * BLK;
          const int32_t* xs16 = a.row_s(i);
          const int32_t xs = BLK == 32 ? xs16[2 * kb] + xs16[2 * kb + 1] : xs16[b];
          const float dx = a.row_d(i)[kb];
          __m256i isum = _mm256_setzero_si256();
          if constexpr (DP::kVnni) {
            for (int j = 0; j < NQ; ++j) {
              int32_t quad;
              __builtin_memcpy(&quad, xb + 4 * j, 4);
              const __m256i xv = _mm256_set1_epi32(quad);
              isum = SIGNED ? DP::dot(isum, Wabs[j], _mm256_sign_epi8(xv, W[j]))
                            : DP::dot(isum, W[j], xv);
            }
          } else {  // maddubs, unsigned codes only (signed ones: tile_rows_sgn; most nibbles: tile_rows_nib)
            static_assert(!SIGNED, "maddubs signed codes go to tile_rows_sgn");
            for (int j = 0; j < NQ; ++j) {
              int32_t quad;
              __builtin_memcpy(&quad, xb + 4 * j, 4);
              const __m256i p16 = _mm256_maddubs_epi16(W[j], _mm256_set1_epi32(quad));
              isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p16, ones16));
            }
          }
          if (!SIGNED) {
            if (ROW_OFF) isum = _mm256_sub_epi32(isum, _mm256_mullo_epi32(voff, _mm256_set1_epi32(xs)));
            else isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(w.o_const * xs));
          }
          const __m256 da = _mm256_mul_ps(vscale, _mm256_set1_ps(dx));
          acc[ii] = _mm256_add_ps(acc[ii], _mm256_mul_ps(_mm256_cvtepi32_ps(isum), da));
          if (HAS_MIN) {
            const float mx = dx * (float)xs;
            acc[ii] = _mm256_add_ps(acc[ii], _mm256_mul_ps(vmin, _mm256_set1_ps(mx)));
          }
        }
      }
    }
    store_half<DP, R>(acc, h, nr, i0, n0, y, ldy, bias);
  }
}

// maddubs (no VNNI) for nibble codes without a code book (q4_0, q4_1, q4_k, int4): tile_rows'
// integer and float operations in another order. Each 32-byte load (8 rows x quads j and j + 4)
// is split into its two nibble registers and used by the R rows at once, so only those, R int16
// block sums per half and the broadcast are live (tile_rows keeps the 8 decoded registers of a
// block beside them, more than 16 ymm, and GCC spilled in the innermost loop), and the offset
// term comes from ActQ's per-block xn / xo instead of scalar sums and a vpmulld per row and
// block. Both halves of the tile (rows 0-7 and 8-15) go through one pass: each broadcast of an
// activation quad feeds two maddubs, and the tile's code lines and the rows' activations are read
// once, not once per half (a half's 32 bytes share each 64-byte line with the other's). The
// accumulators then live on the stack (one load and store per row, half and block). M = 128,
// 4096x4096, one thread on a Zen 3, min of 3 s: q4_0 36-51 -> 30 ms (in rows) -> 26.5 ms (both
// halves), int4-g128 37-51 -> 30 -> 26, q4_k 47-64 -> 39 -> 37 -> 28 (its two-level scales and
// mins decoded once per tile, tile_params, and dx * block sum once per row, ActQ::xm). The same
// exact integer sums and the same float steps per row, so the same bits.
template <class DP, bool HAS_MIN, bool ROW_OFF, bool PAIR, int R>  // DP (MaddubsDot): the folder in the name
void tile_rows_nib(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t i0, float* y, int64_t ldy,
                   const float* bias, const float* ps, const float* pm,  // ps, pm: tile_params
                   const int32_t* po) {  // PAIR and ROW_OFF: o in both int16 of each lane, [npar][NR]
  const int64_t n0 = tile * NR;
  const int nr = (int)(w.n - n0 < NR ? w.n - n0 : NR);
  const uint8_t* ct = w.codes + tile * w.tile_code_bytes;
  constexpr int BCB = QBLK * NR / 2;
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  const __m256i ones16 = _mm256_set1_epi16(1);
  const int64_t nkb = w.k / QBLK;
  const int8_t* xq[R];
  const float* dxr[R];
  const int32_t* xnr[R];
  const int32_t* xo_row[R];
  const float* xmr[R];  // dx * block sum, filled where HAS_MIN
  const int32_t* xpr[R];  // ActQ::xp, filled where PAIR
  const bool has_xo = !a.xo.empty();  // filled where o_const != 0
  for (int ii = 0; ii < R; ++ii) {
    xq[ii] = a.row_q(i0 + ii);
    dxr[ii] = a.row_d(i0 + ii);
    xnr[ii] = a.row_n(i0 + ii);
    xo_row[ii] = has_xo ? a.row_o(i0 + ii) : nullptr;
    xmr[ii] = HAS_MIN ? a.row_m(i0 + ii) : nullptr;
    xpr[ii] = PAIR ? a.row_p(i0 + ii) : nullptr;
  }
  __m256 acc[2][R];  // [h][row]: tile rows 8h .. 8h + 7
  for (int h = 0; h < 2; ++h)
    for (int ii = 0; ii < R; ++ii) acc[h][ii] = _mm256_setzero_ps();
  int64_t g = 0, g_end = w.par_every;
  for (int64_t b = 0; b < nkb; ++b) {
    if (b == g_end) { ++g; g_end += w.par_every; }
    const uint8_t* cb = ct + b * BCB;
    __m256i p16[2][R];
    if (PAIR) {
      // the offset term first: -o * (sums of x over positions p % 4 in {0, 1} and {2, 3}) in the
      // low and high int16 of each lane, the lanes whose maddubs pairs those positions feed. Each
      // pair sum ends at sum (c - o) * x over 16 elements, |.| <= 16 * 15 * 127, so int16 holds
      // it exactly (the partial sums may wrap: the adds are modulo 2^16)
      for (int ii = 0; ii < R; ++ii) {
        const __m256i xv = _mm256_set1_epi32(xpr[ii][b]);
        if (ROW_OFF) {
          p16[0][ii] = _mm256_mullo_epi16(_mm256_load_si256((const __m256i*)(po + g * NR)), xv);
          p16[1][ii] = _mm256_mullo_epi16(_mm256_load_si256((const __m256i*)(po + g * NR + 8)), xv);
        } else {
          p16[0][ii] = p16[1][ii] = xv;
        }
      }
    } else {
      for (int h = 0; h < 2; ++h)
        for (int ii = 0; ii < R; ++ii) p16[h][ii] = _mm256_setzero_si256();
    }
    for (int j = 0; j < 4; ++j) {
      __m256i p0 = _mm256_load_si256((const __m256i*)(cb + 64 * j));
      __m256i p1 = _mm256_load_si256((const __m256i*)(cb + 64 * j + 32));
      __asm__("" : "+x"(p0), "+x"(p1));  // one load each, in a register
      const __m256i wl0 = _mm256_and_si256(p0, lo4), wh0 = _mm256_and_si256(_mm256_srli_epi16(p0, 4), lo4);
      const __m256i wl1 = _mm256_and_si256(p1, lo4), wh1 = _mm256_and_si256(_mm256_srli_epi16(p1, 4), lo4);
      for (int ii = 0; ii < R; ++ii) {
        int32_t ql, qh;
        __builtin_memcpy(&ql, xq[ii] + b * QBLK + 4 * j, 4);
        __builtin_memcpy(&qh, xq[ii] + b * QBLK + 16 + 4 * j, 4);
        // codes <= 15: a pair sum is <= 2*15*127 and all 8 of a block <= 30480, so they add
        // exactly in int16; one madd per block instead of one per quad
        const __m256i xl = _mm256_set1_epi32(ql);
        p16[0][ii] = _mm256_add_epi16(p16[0][ii], _mm256_maddubs_epi16(wl0, xl));
        p16[1][ii] = _mm256_add_epi16(p16[1][ii], _mm256_maddubs_epi16(wl1, xl));
        const __m256i xh = _mm256_set1_epi32(qh);
        p16[0][ii] = _mm256_add_epi16(p16[0][ii], _mm256_maddubs_epi16(wh0, xh));
        p16[1][ii] = _mm256_add_epi16(p16[1][ii], _mm256_maddubs_epi16(wh1, xh));
        // keeps the sums in this order: GCC otherwise reassociates the int16 adds into a tree
        // whose 32 products per block are all live at once, and spills them
        __asm__("" : "+x"(p16[0][ii]), "+x"(p16[1][ii]));
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 vscale = _mm256_load_ps(ps + g * NR + 8 * h);
      const __m256 vmin = HAS_MIN ? _mm256_load_ps(pm + g * NR + 8 * h) : _mm256_setzero_ps();
      const __m256i voff = ROW_OFF && !PAIR ? load_offs(w, (tile * w.npar + g) * NR + 8 * h) : _mm256_setzero_si256();
      for (int ii = 0; ii < R; ++ii) {
        const float dx = dxr[ii][b];
        __m256i isum = _mm256_madd_epi16(p16[h][ii], ones16);
        // - o * (block sum of x), exact, from ActQ's per-block terms: xn (-sum as int16, the
        // high half 0) against o in each lane's low int16, or xo = -o_const * sum
        if (PAIR) {  // already in p16
        } else if (ROW_OFF) {
          isum = _mm256_add_epi32(isum, _mm256_madd_epi16(voff, _mm256_set1_epi32(xnr[ii][b])));
        } else if (has_xo) {
          isum = _mm256_add_epi32(isum, _mm256_set1_epi32(xo_row[ii][b]));
        }
        acc[h][ii] = block_step<HAS_MIN>(acc[h][ii], isum, vscale, dx, vmin, HAS_MIN ? xmr[ii][b] : 0.0f);
      }
    }
  }
  store_half<DP, R>(acc[0], 0, nr, i0, n0, y, ldy, bias);
  store_half<DP, R>(acc[1], 1, nr, i0, n0, y, ldy, bias);
}

// The nibble GEMM for many rows (ActQ::xu filled): the tile's codes first as signed bytes
// s = c - o (c for the min formats), up to 512 blocks at a time, 576 bytes per block: two int16
// start vectors, then for each quad j the low nibbles of rows 0-7, 8-15, then the high ones. The
// rows then take x + 128 (xu) as maddubs' unsigned operand and s as its signed one, so a group
// of 4 rows loads the codes instead of unpacking them: the and / shift and the offset term were
// 28 (q4_0) to 36 (int4 with zero points) of tile_rows_nib's ~230 vector ops per block and group,
// ops that by llvm-mca's Zen 3 model share its 4 vector pipes with the maddubs.
// sum (x + 128) s = sum x s + 128 sum s: the start vectors hold -128 * (sum of s over the 16
// elements of each int16 lane), so each lane ends at sum x s over its 16 elements:
// |.| <= 16 * 15 * 127 fits int16 (the partial sums may wrap: the adds are modulo 2^16); a pair
// of products is <= 2 * 255 * 15, so maddubs does not saturate. Needs |s| <= 15: offsets <= 15,
// else tile_rows_nib. The same exact block sums and float steps per row, so the same bits.
// M = 128, 4096x4096, alternate calls against tile_rows_nib, median time ratio: q4_0 0.91,
// int4-g128 0.92, q4_1 0.98, q4_k ~1.0 at 1 thread; q4_0 0.90, int4-g128 0.92 at 2.
constexpr int SU_BLOCK = 64 + 8 * 64;  // bytes per block of unpacked codes

// blocks [b0, b1) of the tile into cu (SU_BLOCK bytes each); ob[g][h]: the offset bytes of the
// rows of half h in parameter group g (each row's 4 bytes of a lane), or null (none: min formats)
inline __attribute__((always_inline)) void unpack_su(const PackedWeight& w, int64_t tile, int64_t b0, int64_t b1,
                                                     const __m256i* ob, uint8_t* cu) {
  const uint8_t* ct = w.codes + tile * w.tile_code_bytes;
  const __m256i lo4 = _mm256_set1_epi8(0x0F), one8 = _mm256_set1_epi8(1);
  int64_t g = b0 / w.par_every, g_end = (g + 1) * w.par_every;
  for (int64_t b = b0; b < b1; ++b) {
    if (b == g_end) { ++g; g_end += w.par_every; }
    uint8_t* u = cu + (b - b0) * SU_BLOCK;
    __m256i sum[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int j = 0; j < 4; ++j)
      for (int h = 0; h < 2; ++h) {
        const __m256i p = _mm256_load_si256((const __m256i*)(ct + b * (QBLK * NR / 2) + 64 * j + 32 * h));
        __m256i l = _mm256_and_si256(p, lo4), hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), lo4);
        if (ob) {
          l = _mm256_sub_epi8(l, ob[2 * g + h]);
          hi = _mm256_sub_epi8(hi, ob[2 * g + h]);
        }
        _mm256_store_si256((__m256i*)(u + 64 + 128 * j + 32 * h), l);
        _mm256_store_si256((__m256i*)(u + 64 + 128 * j + 64 + 32 * h), hi);
        sum[h] = _mm256_add_epi16(sum[h], _mm256_maddubs_epi16(one8, l));  // pair sums of s
        sum[h] = _mm256_add_epi16(sum[h], _mm256_maddubs_epi16(one8, hi));
      }
    for (int h = 0; h < 2; ++h)  // -128 * sum, |sum| <= 16 * 15
      _mm256_store_si256((__m256i*)(u + 32 * h), _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(sum[h], 7)));
  }
}

// R activation rows from i0 over blocks [b0, b1) of one tile from its unpacked codes cu (above);
// part: the rows' acc over the blocks before b0 (b0 > 0) / to go on after b1 (b1 < the last)
template <class DP, bool HAS_MIN, int R>  // DP (MaddubsDot): the folder in the name
void tile_rows_su(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t i0, float* y, int64_t ldy,
                  const float* bias, const float* ps, const float* pm, const uint8_t* cu, int64_t b0, int64_t b1,
                  __m256* part) {
  const int64_t n0 = tile * NR;
  const int nr = (int)(w.n - n0 < NR ? w.n - n0 : NR);
  const __m256i ones16 = _mm256_set1_epi16(1);
  const uint8_t* xu[R];
  const float* dxr[R];
  const float* xmr[R];  // dx * block sum, filled where HAS_MIN
  for (int ii = 0; ii < R; ++ii) {
    xu[ii] = a.row_u(i0 + ii);
    dxr[ii] = a.row_d(i0 + ii);
    xmr[ii] = HAS_MIN ? a.row_m(i0 + ii) : nullptr;
  }
  __m256 acc[2][R];  // [h][row]: tile rows 8h .. 8h + 7
  for (int h = 0; h < 2; ++h)
    for (int ii = 0; ii < R; ++ii) acc[h][ii] = b0 ? part[h * R + ii] : _mm256_setzero_ps();
  int64_t g = b0 / w.par_every, g_end = (g + 1) * w.par_every;
  for (int64_t b = b0; b < b1; ++b) {
    if (b == g_end) { ++g; g_end += w.par_every; }
    const uint8_t* u = cu + (b - b0) * SU_BLOCK;
    __m256i p16[2][R];
    const __m256i st0 = _mm256_load_si256((const __m256i*)u), st1 = _mm256_load_si256((const __m256i*)(u + 32));
    for (int ii = 0; ii < R; ++ii) {
      p16[0][ii] = st0;
      p16[1][ii] = st1;
    }
    for (int j = 0; j < 4; ++j)
      for (int hi = 0; hi < 2; ++hi) {  // x bytes 4j .. 4j + 3 (low nibbles), then 16 + 4j .. (high)
        const __m256i s0 = _mm256_load_si256((const __m256i*)(u + 64 + 128 * j + 64 * hi));
        const __m256i s1 = _mm256_load_si256((const __m256i*)(u + 64 + 128 * j + 64 * hi + 32));
        for (int ii = 0; ii < R; ++ii) {
          int32_t q;
          __builtin_memcpy(&q, xu[ii] + b * QBLK + 16 * hi + 4 * j, 4);
          const __m256i xv = _mm256_set1_epi32(q);
          p16[0][ii] = _mm256_add_epi16(p16[0][ii], _mm256_maddubs_epi16(xv, s0));
          p16[1][ii] = _mm256_add_epi16(p16[1][ii], _mm256_maddubs_epi16(xv, s1));
          // keeps the sums in this order: GCC otherwise reassociates the int16 adds into a tree
          // whose 32 products per block are all live at once, and spills them
          __asm__("" : "+x"(p16[0][ii]), "+x"(p16[1][ii]));
        }
      }
    for (int h = 0; h < 2; ++h) {
      const __m256 vscale = _mm256_load_ps(ps + g * NR + 8 * h);
      const __m256 vmin = HAS_MIN ? _mm256_load_ps(pm + g * NR + 8 * h) : _mm256_setzero_ps();
      for (int ii = 0; ii < R; ++ii) {
        const __m256i isum = _mm256_madd_epi16(p16[h][ii], ones16);
        acc[h][ii] = block_step<HAS_MIN>(acc[h][ii], isum, vscale, dxr[ii][b], vmin, HAS_MIN ? xmr[ii][b] : 0.0f);
      }
    }
  }
  if (b1 < w.k / QBLK) {
    for (int h = 0; h < 2; ++h)
      for (int ii = 0; ii < R; ++ii) part[h * R + ii] = acc[h][ii];
    return;
  }
  store_half<DP, R>(acc[0], 0, nr, i0, n0, y, ldy, bias);
  store_half<DP, R>(acc[1], 1, nr, i0, n0, y, ldy, bias);
}

template <class DP, bool HAS_MIN, bool ROW_OFF>
void tile_kernel_nib(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y,
                     int64_t ldy, const float* bias) {
  // Every offset of the tile <= 15, as the codes (min formats: none): then s = c - o fits
  // |s| <= 15 and no int16 pair sum leaves int16, which both fast paths need: tile_rows_su where
  // the driver filled xu (many rows), else tile_rows_nib with the offset term as the start of its
  // pair sums where it filled xp. Otherwise tile_rows_nib adds that term after the pair sums.
  const int64_t nkb = w.k / QBLK, npn = w.npar * NR;
  bool small_o = ROW_OFF || w.o_const <= 15;
  if (ROW_OFF && (!a.xu.empty() || !a.xp.empty()))
    for (int64_t p = 0; p < npn && small_o; ++p) small_o = w.offs[tile * npn + p] <= 15;
  const bool su = small_o && !a.xu.empty() && nkb > 0, pair = small_o && !a.xp.empty();
  // Up to 512 blocks (K 16384, 288 KiB) unpacked at a time, in L2: each range of blocks costs
  // every group of rows a load and store of its acc, and ranges of 32 blocks (in L1) measured
  // slower than the whole of K = 4096 (q4_0 M = 128: 0.96 against 0.91 of tile_rows_nib's time)
  const int64_t kb = su ? (nkb < 512 ? nkb : 512) : 0;
  // One buffer (posix_memalign, not a std:: container: no library template instantiated with
  // these flags): the unpacked blocks, then (su) the offset bytes per group and half and the
  // rows' acc between block ranges; the fp32 scales and mins (tile_params); o in both int16 of
  // each lane (pair, ROW_OFF)
  const size_t su_bytes = su ? (size_t)(kb * SU_BLOCK + 2 * w.npar * 32 + 2 * (m1 - m0) * 32) : 0;
  void* mem = nullptr;
  if (posix_memalign(&mem, 64, su_bytes + (size_t)(3 * npn) * sizeof(float)) != 0) throw std::bad_alloc();
  uint8_t* cu = (uint8_t*)mem;
  __m256i* ob = (__m256i*)(cu + kb * SU_BLOCK);
  __m256* part = (__m256*)(ob + 2 * w.npar);
  float* buf = (float*)(cu + su_bytes);
  const float* ps = tile_params(w, tile, w.scale, w.scale16, w.sd, w.sq, buf);
  const float* pm = HAS_MIN ? tile_params(w, tile, w.minv, w.min16, w.md, w.mq, buf + npn) : nullptr;
  int32_t* po = (int32_t*)(buf + 2 * npn);
  if (su) {
    if (!HAS_MIN)
      for (int64_t g = 0; g < w.npar; ++g)
        for (int h = 0; h < 2; ++h)
          ob[2 * g + h] = ROW_OFF ? _mm256_mullo_epi32(load_offs(w, (tile * w.npar + g) * NR + 8 * h),
                                                       _mm256_set1_epi32(0x01010101))  // o in each byte of its lane
                                  : _mm256_set1_epi8((char)w.o_const);
    for (int64_t b0 = 0; b0 < nkb; b0 += kb) {
      const int64_t b1 = b0 + kb < nkb ? b0 + kb : nkb;
      unpack_su(w, tile, b0, b1, HAS_MIN ? nullptr : ob, cu);
      row_groups(m0, m1, [&](int64_t i0, auto r) {
        tile_rows_su<DP, HAS_MIN, decltype(r)::value>(w, tile, a, i0, y, ldy, bias, ps, pm, cu, b0, b1,
                                                      part + 2 * (i0 - m0));
      });
    }
  } else {
    if (pair && ROW_OFF)
      for (int64_t p = 0; p < npn; ++p) {
        const int32_t o = w.offs[tile * npn + p];
        po[p] = o | (o << 16);
      }
    row_groups(m0, m1, [&](int64_t i0, auto r) {
      if (pair) tile_rows_nib<DP, HAS_MIN, ROW_OFF, true, decltype(r)::value>(w, tile, a, i0, y, ldy, bias, ps, pm, po);
      else tile_rows_nib<DP, HAS_MIN, ROW_OFF, false, decltype(r)::value>(w, tile, a, i0, y, ldy, bias, ps, pm, po);
    });
  }
  std::free(mem);
}

// maddubs (no VNNI) for signed codes: 8-bit (q8_0, int8) and code books (nf4, iq4_nl: NIB):
// tile_rows' integer and float operations in another order. One code register (a quad of the
// block for 8 rows) at a time with its |c|, used by the R rows at once: per row and quad a
// broadcast, a sign, a maddubs and a madd into the int32 block sum (pair sums reach 2*128*127,
// so they cannot add in int16 as the nibbles' do). tile_rows keeps the block's 8 code and 8
// |code| registers beside the rows' sums and accumulators, and GCC spilled in the innermost
// loop. The same exact integer sums and float steps per row, so the same bits.
template <class DP, bool NIB, int R>  // DP (MaddubsDot): the folder in the name
void tile_rows_sgn(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t i0, float* y, int64_t ldy,
                   const float* bias) {
  const int64_t n0 = tile * NR;
  const int nr = (int)(w.n - n0 < NR ? w.n - n0 : NR);
  const uint8_t* ct = w.codes + tile * w.tile_code_bytes;
  constexpr int BCB = NIB ? QBLK * NR / 2 : QBLK * NR;
  const __m256i lo4 = _mm256_set1_epi8(0x0F), ones16 = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
  alignas(16) uint8_t lut_s[16];
  for (int i = 0; i < 16; ++i) lut_s[i] = (uint8_t)(w.lut16[i] ^ 0x80);
  const __m256i vlut = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)lut_s));
  const int64_t nkb = w.k / QBLK;
  const int8_t* xq[R];
  const float* dxr[R];
  for (int ii = 0; ii < R; ++ii) {
    xq[ii] = a.row_q(i0 + ii);
    dxr[ii] = a.row_d(i0 + ii);
  }
  for (int h = 0; h < 2; ++h) {  // rows 0-7, then rows 8-15 of the tile
    __m256 acc[R];
    for (int ii = 0; ii < R; ++ii) acc[ii] = _mm256_setzero_ps();
    int64_t g = 0, g_end = w.par_every;
    for (int64_t b = 0; b < nkb; ++b) {
      if (b == g_end) { ++g; g_end += w.par_every; }
      const uint8_t* cb = ct + b * BCB + 32 * h;
      __m256i isum[R];
      for (int ii = 0; ii < R; ++ii) isum[ii] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {  // quad j: x bytes 4j .. 4j + 3 of the block
        __m256i c;
        if (NIB) {  // quads 0-3 in the low nibbles of the 4 registers, 4-7 in the high ones
          const __m256i p = _mm256_load_si256((const __m256i*)(cb + 64 * (j & 3)));
          c = _mm256_shuffle_epi8(vlut, _mm256_and_si256(j < 4 ? p : _mm256_srli_epi16(p, 4), lo4));
        } else {
          c = _mm256_xor_si256(_mm256_load_si256((const __m256i*)(cb + 64 * j)), flip);
        }
        const __m256i cabs = _mm256_abs_epi8(c);
        for (int ii = 0; ii < R; ++ii) {
          int32_t quad;
          __builtin_memcpy(&quad, xq[ii] + b * QBLK + 4 * j, 4);
          const __m256i p16 = _mm256_maddubs_epi16(cabs, _mm256_sign_epi8(_mm256_set1_epi32(quad), c));
          isum[ii] = _mm256_add_epi32(isum[ii], _mm256_madd_epi16(p16, ones16));
          __asm__("" : "+x"(isum[ii]));  // in this order: GCC otherwise sums a tree of spilled terms
        }
      }
      const __m256 vscale = load_a(w, (tile * w.npar + g) * NR + 8 * h);
      for (int ii = 0; ii < R; ++ii) {
        const __m256 da = _mm256_mul_ps(vscale, _mm256_set1_ps(dxr[ii][b]));
        acc[ii] = _mm256_add_ps(acc[ii], _mm256_mul_ps(_mm256_cvtepi32_ps(isum[ii]), da));
      }
    }
    store_half<DP, R>(acc, h, nr, i0, n0, y, ldy, bias);
  }
}

template <class DP, bool NIB>
void tile_kernel_sgn(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y,
                     int64_t ldy, const float* bias) {
  row_groups(m0, m1, [&](int64_t i0, auto r) {
    tile_rows_sgn<DP, NIB, decltype(r)::value>(w, tile, a, i0, y, ldy, bias);
  });
}

// rows [m0, m1) over one tile: groups of MR rows, then the remaining ones
template <class DP, bool NIB, int BLK, bool HAS_MIN, bool ROW_OFF, bool LUT, bool SIGNED>
void tile_kernel(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
                 const float* bias) {
  static_assert(MR == 4, "row_groups takes 4 rows at a time");
  row_groups(m0, m1, [&](int64_t i0, auto r) {
    tile_rows<DP, NIB, BLK, HAS_MIN, ROW_OFF, LUT, SIGNED, decltype(r)::value>(w, tile, a, i0, y, ldy, bias);
  });
}

// GEMV path for nibble codes without a code book (q4_0, q4_1, q4_k, int2/3/4): R = 1 or 2
// activation rows, both halves of the tile at once, the tile's bytes decoded as they stream and
// shared by the rows (the tile kernel above keeps MR rows' accumulators and the decoded block in
// arrays, which spill with 16 ymm registers). maddubs: block sums in int16 as above. VNNI: the
// high nibbles are used in place as 16*hi (P & 0xF0) in their own int32 sums, shifted down once
// per block (the sum is a multiple of 16, so the shift is exact): no shift per register. Each
// code register is loaded once (GCC otherwise folds the load into every op that reads it). The
// same integer and float operations as tile_rows, so the same bits. PE1: one block per
// parameter group (q4_0, q4_1), the group loop folded away.
template <class DP, bool HAS_MIN, bool ROW_OFF, int R, bool PE1>
void gemv_rows(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t i0, float* y, int64_t ldy,
               const float* bias, int nr) {
  const uint8_t* ct = w.codes + tile * w.tile_code_bytes;
  const __m256i lo4 = _mm256_set1_epi8(0x0F), hi4 = _mm256_set1_epi8((char)0xF0), ones16 = _mm256_set1_epi16(1);
  const int8_t* xq[R];
  const int32_t* xs16[R];
  const float* dxr[R];
  __m256 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) {
    xq[r] = a.row_q(i0 + r);
    xs16[r] = a.row_s(i0 + r);
    dxr[r] = a.row_d(i0 + r);
    acc0[r] = acc1[r] = _mm256_setzero_ps();
  }
  const int64_t nkb = w.k / QBLK, pe = PE1 ? 1 : w.par_every;
  for (int64_t g = 0, b = 0; b < nkb; ++g) {
    const int64_t pi = (tile * w.npar + g) * NR;
    const __m256 va0 = load_a(w, pi), va1 = load_a(w, pi + 8);
    __m256 vm0 = _mm256_setzero_ps(), vm1 = vm0;
    if (HAS_MIN) { vm0 = load_m(w, pi); vm1 = load_m(w, pi + 8); }
    __m256i vo0 = _mm256_setzero_si256(), vo1 = vo0;  // o in the low int16 of each lane
    if (ROW_OFF) {
      vo0 = load_offs(w, pi);
      vo1 = load_offs(w, pi + 8);
    }
    for (const int64_t be = b + pe; b < be; ++b) {
      const uint8_t* cb = ct + b * (QBLK * NR / 2);
      // the block 8 ahead (2 KiB; past the tile it is the next tile's, past the end a prefetch
      // does not fault): from memory (the decode stack larger than L3, a model's layers) the
      // hardware prefetcher alone left a Zen 3 at 21-23 ms (1 thread) / 11-12.4 ms (2) for 8
      // 11008x4096 q4_0 GEMVs, with it 15.5 / 8-9.9 (1 KiB and 4 KiB ahead did less); from L3
      // no difference measured
      for (int l = 0; l < 4; ++l) _mm_prefetch((const char*)(cb + 2048 + 64 * l), _MM_HINT_T0);
      // VNNI: int32 sums straight from the dot products (h* for the high nibbles); else int16 sums
      __m256i s0[R], s1[R], h0[R], h1[R];
      for (int r = 0; r < R; ++r) s0[r] = s1[r] = h0[r] = h1[r] = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        __m256i p0 = _mm256_load_si256((const __m256i*)(cb + 64 * j));
        __m256i p1 = _mm256_load_si256((const __m256i*)(cb + 64 * j + 32));
        __asm__("" : "+x"(p0), "+x"(p1));  // one load each, in registers
        const __m256i l0 = _mm256_and_si256(p0, lo4), l1 = _mm256_and_si256(p1, lo4);
        const __m256i u0 = DP::kVnni ? _mm256_and_si256(p0, hi4) : _mm256_and_si256(_mm256_srli_epi16(p0, 4), lo4);
        const __m256i u1 = DP::kVnni ? _mm256_and_si256(p1, hi4) : _mm256_and_si256(_mm256_srli_epi16(p1, 4), lo4);
        for (int r = 0; r < R; ++r) {
          int32_t ql, qh;
          __builtin_memcpy(&ql, xq[r] + b * QBLK + 4 * j, 4);
          __builtin_memcpy(&qh, xq[r] + b * QBLK + 16 + 4 * j, 4);
          const __m256i xl = _mm256_set1_epi32(ql), xh = _mm256_set1_epi32(qh);
          if constexpr (DP::kVnni) {
            s0[r] = DP::dot(s0[r], l0, xl);
            h0[r] = DP::dot(h0[r], u0, xh);
            s1[r] = DP::dot(s1[r], l1, xl);
            h1[r] = DP::dot(h1[r], u1, xh);
          } else {
            s0[r] = _mm256_add_epi16(s0[r], _mm256_add_epi16(_mm256_maddubs_epi16(l0, xl), _mm256_maddubs_epi16(u0, xh)));
            s1[r] = _mm256_add_epi16(s1[r], _mm256_add_epi16(_mm256_maddubs_epi16(l1, xl), _mm256_maddubs_epi16(u1, xh)));
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        __m256i i0s, i1s;
        if constexpr (DP::kVnni) {
          i0s = _mm256_add_epi32(s0[r], _mm256_srai_epi32(h0[r], 4));
          i1s = _mm256_add_epi32(s1[r], _mm256_srai_epi32(h1[r], 4));
        } else {
          i0s = _mm256_madd_epi16(s0[r], ones16);
          i1s = _mm256_madd_epi16(s1[r], ones16);
        }
        const int32_t xs = xs16[r][2 * b] + xs16[r][2 * b + 1];
        if (ROW_OFF) {  // o * xs: o and |xs| <= 32 * 127 both fit int16, high halves 0: exact
          const __m256i vx = _mm256_set1_epi32((int32_t)(uint16_t)(int16_t)xs);
          i0s = _mm256_sub_epi32(i0s, _mm256_madd_epi16(vo0, vx));
          i1s = _mm256_sub_epi32(i1s, _mm256_madd_epi16(vo1, vx));
        } else if (w.o_const != 0) {
          const __m256i vox = _mm256_set1_epi32(w.o_const * xs);
          i0s = _mm256_sub_epi32(i0s, vox);
          i1s = _mm256_sub_epi32(i1s, vox);
        }
        const float dx = dxr[r][b];
        const __m256 vdx = _mm256_set1_ps(dx);
        acc0[r] = _mm256_add_ps(acc0[r], _mm256_mul_ps(_mm256_cvtepi32_ps(i0s), _mm256_mul_ps(va0, vdx)));
        acc1[r] = _mm256_add_ps(acc1[r], _mm256_mul_ps(_mm256_cvtepi32_ps(i1s), _mm256_mul_ps(va1, vdx)));
        if (HAS_MIN) {
          const __m256 mx = _mm256_set1_ps(dx * (float)xs);
          acc0[r] = _mm256_add_ps(acc0[r], _mm256_mul_ps(vm0, mx));
          acc1[r] = _mm256_add_ps(acc1[r], _mm256_mul_ps(vm1, mx));
        }
      }
    }
  }
  const int64_t n0 = tile * NR;
  for (int r = 0; r < R; ++r) {
    alignas(32) float out[16];
    _mm256_store_ps(out, acc0[r]);
    _mm256_store_ps(out + 8, acc1[r]);
    float* yr = y + (i0 + r) * ldy + n0;
    for (int c = 0; c < nr; ++c) yr[c] = bias ? out[c] + bias[n0 + c] : out[c];
  }
}

// rows [m0, m1) in pairs (one pass over the tile's codes for both), then the odd one
template <class DP, bool HAS_MIN, bool ROW_OFF, bool PE1>
void gemv_pairs(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
                const float* bias) {
  const int nr = (int)(w.n - tile * NR < NR ? w.n - tile * NR : NR);
  int64_t i = m0;
  for (; i + 2 <= m1; i += 2) gemv_rows<DP, HAS_MIN, ROW_OFF, 2, PE1>(w, tile, a, i, y, ldy, bias, nr);
  if (i < m1) gemv_rows<DP, HAS_MIN, ROW_OFF, 1, PE1>(w, tile, a, i, y, ldy, bias, nr);
}

template <class DP, bool HAS_MIN, bool ROW_OFF>
void tile_gemv(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
               const float* bias) {
  if (w.par_every == 1) return gemv_pairs<DP, HAS_MIN, ROW_OFF, true>(w, tile, a, m0, m1, y, ldy, bias);
  gemv_pairs<DP, HAS_MIN, ROW_OFF, false>(w, tile, a, m0, m1, y, ldy, bias);
}

template <class DP>
void gemm_int8_256(const PackedWeight& w, int64_t tile, const ActQ& a, int64_t m0, int64_t m1, float* y, int64_t ldy,
                   const float* bias) {
  if (w.nibbles && !w.lut && m1 - m0 <= 2 && !(w.has_min && w.row_offset)) {
    if (w.has_min) return tile_gemv<DP, true, false>(w, tile, a, m0, m1, y, ldy, bias);
    if (w.row_offset) return tile_gemv<DP, false, true>(w, tile, a, m0, m1, y, ldy, bias);
    return tile_gemv<DP, false, false>(w, tile, a, m0, m1, y, ldy, bias);
  }
  // without VNNI the signed codes (code books, 8-bit) and the nibbles take their own kernels, so
  // tile_rows is instantiated for them only with VNNI
  if constexpr (!DP::kVnni) {
    if (w.nibbles && w.lut) return tile_kernel_sgn<DP, true>(w, tile, a, m0, m1, y, ldy, bias);
    if (!w.nibbles && w.blk != 16) return tile_kernel_sgn<DP, false>(w, tile, a, m0, m1, y, ldy, bias);
    if (w.nibbles && !(w.has_min && w.row_offset)) {
      if (w.has_min) return tile_kernel_nib<DP, true, false>(w, tile, a, m0, m1, y, ldy, bias);
      if (w.row_offset) return tile_kernel_nib<DP, false, true>(w, tile, a, m0, m1, y, ldy, bias);
      return tile_kernel_nib<DP, false, false>(w, tile, a, m0, m1, y, ldy, bias);
    }
  } else {
    if (w.nibbles && w.lut)
      return tile_kernel<DP, true, 32, false, false, true, true>(w, tile, a, m0, m1, y, ldy, bias);
    if (!w.nibbles && w.blk != 16)
      return tile_kernel<DP, false, 32, false, false, false, true>(w, tile, a, m0, m1, y, ldy, bias);
  }
  if (w.nibbles) {
    if (w.has_min) return tile_kernel<DP, true, 32, true, false, false, false>(w, tile, a, m0, m1, y, ldy, bias);
    if (w.row_offset) return tile_kernel<DP, true, 32, false, true, false, false>(w, tile, a, m0, m1, y, ldy, bias);
    return tile_kernel<DP, true, 32, false, false, false, false>(w, tile, a, m0, m1, y, ldy, bias);
  }
  return tile_kernel<DP, false, 16, false, false, false, false>(w, tile, a, m0, m1, y, ldy, bias);  // blk 16 (q6_k)
}

}}  // namespace pqk::(anonymous)
