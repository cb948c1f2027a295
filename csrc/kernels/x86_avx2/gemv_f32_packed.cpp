// compute="float" GEMV over the packed 4-bit codes (AVX2 + FMA + F16C): the fp32 counterpart of
// ../x86_avx512bf16/gemv_bf16.cpp for CPUs without AVX512-BF16, the same kind of sums:
// y = sum over blocks of a_b * (sum over the block of (u - o) * x), each product exact (fused in
// the multiply-add), fp32 sums (the additions within a block in another order than there).
//
// Codes stay where the packed layout (core/packed.h) puts them: 8 rows per 256-bit half of a
// block register, one 32-bit lane per row, 8 nibbles per lane. Nibble q of a lane sits at bit 4q,
// so masking it out (vpand) leaves u * 2^4q, and subtracting o * 2^4q leaves (u - o) * 2^4q, an
// integer of at most 4 significant bits that vcvtdq2ps converts exactly; the driver scales x by
// 2^-4q beforehand (gemv_f32p_shift in kernel_table.h), so the product is (u - o) * x exactly.
// The top nibble is shifted down instead ((u - o) * 2^28 would not fit an int32). That is four
// operations per 8 weights (and, sub, convert, fused multiply-add) plus one broadcast of x shared
// by the 16 rows, where decoding each weight to its dequantized float first takes a second
// multiply-add and the nibble unpacking of the canonical bytes (gemv_f32.cpp).
#include <immintrin.h>

#include "../../core/kernel_table.h"
#include "../../core/packed.h"
#include "int8_kernels256.h"  // load_a, load_offs

namespace pqk { namespace avx2 {

namespace {

// MR activation rows share each decoded code register; NA accumulators per row and half split
// the chain of 32 multiply-adds of a block (4-cycle latency each). At MR = 1, 2 were faster than
// 1 and 4 (4096x4096, one thread, alternate calls, median time ratio against NA = 2: NA = 4 q4_0
// 1.03, int4-g128 1.10; NA = 1 1.13, 1.14): 4 left the masks and offsets no registers.
template <int MR, bool ROW_OFF>
void tile_f32p(const PackedWeight& w, int64_t tile, const float* x, int64_t ldx, float* y, int64_t ldy,
               const float* bias) {
  constexpr int NA = MR == 1 ? 2 : 1;
  const int64_t n0 = tile * NR;
  const int nr = (int)(w.n - n0 < NR ? w.n - n0 : NR);
  const int64_t nkb = w.k / QBLK, pe = w.par_every;
  const uint8_t* ct = w.codes + tile * w.tile_code_bytes;
  // o * 2^4q per half and nibble q (q = 7: o), as vpsubd memory operands
  alignas(32) int32_t off[2][8][8];
  auto set_off = [&](int h, __m256i o) {
    for (int q = 0; q < 7; ++q) _mm256_store_si256((__m256i*)off[h][q], _mm256_slli_epi32(o, 4 * q));
    _mm256_store_si256((__m256i*)off[h][7], o);
  };
  if (!ROW_OFF) set_off(0, _mm256_set1_epi32(w.o_const)), set_off(1, _mm256_set1_epi32(w.o_const));
  __m256 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t g = 0, b = 0; b < nkb; ++g) {
    const int64_t pi = (tile * w.npar + g) * NR;
    if (ROW_OFF) set_off(0, load_offs(w, pi)), set_off(1, load_offs(w, pi + 8));
    const __m256 va0 = load_a(w, pi), va1 = load_a(w, pi + 8);
    for (const int64_t be = b + pe; b < be; ++b) {
      const uint8_t* cb = ct + b * (QBLK * NR / 2);
      __m256 s[MR][2][NA];
      for (int i = 0; i < MR; ++i)
        for (int a = 0; a < NA; ++a) s[i][0][a] = s[i][1][a] = _mm256_setzero_ps();
      // unrolled, so every accumulator index is a constant and the accumulators stay in registers
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256i v0 = _mm256_load_si256((const __m256i*)(cb + 64 * j));
        const __m256i v1 = _mm256_load_si256((const __m256i*)(cb + 64 * j + 32));
#pragma GCC unroll 8
        for (int q = 0; q < 8; ++q) {
          __m256i t0, t1;
          if (q == 7) {
            t0 = _mm256_srli_epi32(v0, 28);
            t1 = _mm256_srli_epi32(v1, 28);
          } else {
            const __m256i mq = _mm256_set1_epi32(15 << (4 * q));
            t0 = _mm256_and_si256(v0, mq);
            t1 = _mm256_and_si256(v1, mq);
          }
          const __m256 f0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(t0, _mm256_load_si256((const __m256i*)off[0][q])));
          const __m256 f1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(t1, _mm256_load_si256((const __m256i*)off[1][q])));
          // nibble q of register j: byte q / 2, low or high half of the block
          const int64_t kk = b * QBLK + 4 * j + q / 2 + 16 * (q & 1);
          const int a = (j * 8 + q) % NA;
          for (int i = 0; i < MR; ++i) {
            const __m256 xb = _mm256_broadcast_ss(x + i * ldx + kk);
            s[i][0][a] = _mm256_fmadd_ps(f0, xb, s[i][0][a]);
            s[i][1][a] = _mm256_fmadd_ps(f1, xb, s[i][1][a]);
          }
        }
      }
      for (int i = 0; i < MR; ++i) {
        __m256 s0 = s[i][0][0], s1 = s[i][1][0];
        for (int a = 1; a < NA; ++a) s0 = _mm256_add_ps(s0, s[i][0][a]), s1 = _mm256_add_ps(s1, s[i][1][a]);
        acc[i][0] = _mm256_fmadd_ps(s0, va0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(s1, va1, acc[i][1]);
      }
    }
  }
  alignas(32) float out[2][8];
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(out[0], acc[i][0]);
    _mm256_store_ps(out[1], acc[i][1]);
    float* yr = y + i * ldy + n0;
    for (int r = 0; r < nr; ++r) yr[r] = bias ? out[r / 8][r % 8] + bias[n0 + r] : out[r / 8][r % 8];
  }
}

template <int MR>
void dispatch(const PackedWeight& w, int64_t tile, const float* x, int64_t ldx, float* y, int64_t ldy,
              const float* bias) {
  if (w.row_offset) return tile_f32p<MR, true>(w, tile, x, ldx, y, ldy, bias);
  tile_f32p<MR, false>(w, tile, x, ldx, y, ldy, bias);
}

}  // namespace

bool gemv_f32p(const PackedWeight& w, int64_t tile, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy,
               const float* bias) {
  if (!w.nibbles || w.lut || w.blk != QBLK || w.has_min || w.sq) return false;
  if (m < 1 || m > 8) return false;
  // 5..8 rows: two passes over the tile's codes, 4 rows then the rest (more rows per pass would
  // leave the accumulators no registers)
  for (int64_t i0 = 0; i0 < m; i0 += 4) {
    const float* xi = x + i0 * ldx;
    float* yi = y + i0 * ldy;
    switch (m - i0 < 4 ? m - i0 : 4) {
      case 1: dispatch<1>(w, tile, xi, ldx, yi, ldy, bias); break;
      case 2: dispatch<2>(w, tile, xi, ldx, yi, ldy, bias); break;
      case 3: dispatch<3>(w, tile, xi, ldx, yi, ldy, bias); break;
      default: dispatch<4>(w, tile, xi, ldx, yi, ldy, bias); break;
    }
  }
  return true;
}

}}  // namespace pqk::avx2
