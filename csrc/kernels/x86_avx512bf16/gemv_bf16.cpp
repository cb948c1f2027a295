// compute="float" GEMV for bfloat16 activations over the packed 4-bit codes (AVX512-BF16).
//
// A code minus its offset (u - o, -15..15) and a bf16 activation are both exact bf16 values, so
// each product is exact in fp32 and vdpbf16ps adds two of them per lane: this is the float
// result of x (widened exactly) times the dequantized weight, with fp32 sums taken per block
// and then scaled (y = sum_b a_b * sum_k (u - o) x), a different order from the fp32 path under
// the same bound. Not for formats with a min term m (q4_1, q4_k): a_b * sum(u x) + m_b * sum(x)
// cancels where a * u + m does, beyond that bound. vdpbf16ps reads bf16 denormals as zero and flushes denormal
// results: the caller sends rows with denormal x elsewhere; partial sums below 2^-126 may flush.
// fp32 activations come split exactly into three bf16 parts (x = x1 + x2 + x3: 8 + 8 + 8
// significant bits), each multiplied exactly: three dot products instead of one, still far
// fewer operations than widening every code to fp32 for an FMA.
//
// Codes: the packed layout of core/packed.h (register j of a block holds k = 4j..4j+3 of the 16
// rows in the low nibbles, k = 16+4j.. in the high ones). vpshufb spreads bytes 0,1 and 2,3 of
// each row lane into 16-bit words, and vpermw maps a word's low 5 bits to a bf16 through a
// 32-entry table, so decoding 128 codes into four bf16 pair registers costs 8 shuffles.
#include "../avx512_gcc12_warnings.h"  // before <immintrin.h>
#include <immintrin.h>

#include "../../core/kernel_table.h"
#include "../../core/packed.h"
#include "../x86_avx512/asm512.h"
#include "../x86_avx512/packed_params512.h"  // load_a

namespace pqk { namespace avx512bf16 {

namespace {

typedef uint32_t __attribute__((may_alias, aligned(2))) u32_bf16pair;

// acc += w (16 lanes x 2 bf16) . (the bf16 pair at p, broadcast). GCC 12 does not fold the
// broadcast into the {1to16} memory operand by itself.
inline __m512 dp_pair(__m512 acc, __m512i w, const uint16_t* p) {
#if PQK_ZMM_ASM
  __asm__("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const u32_bf16pair*)p));
  return acc;
#elif defined(PQK_SIMDE_EMULATION)  // SIMDe has no cast to __m512bh
  return pqk_emu_dpbf16_pair(acc, w, *(const u32_bf16pair*)p);
#else
  return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)_mm512_set1_epi32((int)*(const u32_bf16pair*)p));
#endif
}

inline uint16_t bf16_of(float f) {  // exact for the small integers used here
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return (uint16_t)(u >> 16);
}

// vpshufb controls: within each 128-bit lane, row lane r's bytes 0,1 (a) or 2,3 (b) -> two
// zero-extended 16-bit words
// (constexpr: built at compile time, not by a static initializer, which would run this folder's
// AVX-512 code when the library loads on any CPU)
struct Spread {
  alignas(64) int8_t a[64] = {};
  alignas(64) int8_t b[64] = {};
  constexpr Spread() {
    for (int l = 0; l < 4; ++l)
      for (int r = 0; r < 4; ++r)
        for (int t = 0; t < 2; ++t) {
          a[l * 16 + r * 4 + t * 2] = (int8_t)(r * 4 + t);
          b[l * 16 + r * 4 + t * 2] = (int8_t)(r * 4 + 2 + t);
          a[l * 16 + r * 4 + t * 2 + 1] = b[l * 16 + r * 4 + t * 2 + 1] = (int8_t)0x80;
        }
  }
};
constexpr Spread kSpread;

// MR activation rows share each decoded register. ROW_OFF: o per row and group (subtracted in
// bytes, table of -16..15); else o constant (folded into the table, high-nibble parity ignored).
// NP bf16 parts per activation (1: bf16 x; 3: fp32 x split exactly, x = x1 + x2 + x3), part p of
// row i at x + p * ps + i * ldx, each with its own accumulators.
template <int MR, int NP, bool ROW_OFF>
void gemv_tile(const PackedWeight& w, int64_t tile, const uint16_t* x, int64_t ldx, int64_t ps, float* y,
               int64_t ldy, const float* bias) {
  const int64_t n0 = tile * NR;
  const int nr = (int)(w.n - n0 < NR ? w.n - n0 : NR);
  const __mmask16 mask = (__mmask16)((1u << nr) - 1);
  const int64_t nkb = w.k / QBLK;
  const uint8_t* ct = w.codes + tile * w.tile_code_bytes;
  alignas(64) uint16_t tab[32];
  for (int i = 0; i < 32; ++i)
    tab[i] = bf16_of(ROW_OFF ? (float)(i < 16 ? i : i - 32) : (float)((i & 15) - w.o_const));
  const __m512i vtab = _mm512_load_si512(tab);
  const __m512i IA = _mm512_load_si512(kSpread.a), IB = _mm512_load_si512(kSpread.b);
  const __m512i lo4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t pe = w.par_every;
  for (int64_t g = 0, b = 0; b < nkb; ++g) {
    const int64_t pi = (tile * w.npar + g) * NR;
    const __m512 va = load_a(w, pi);
    __m512i ob = _mm512_setzero_si512();  // o in every byte of its row lane
    if (ROW_OFF)
      ob = _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_load_si128((const __m128i*)(w.offs + pi))),
                              _mm512_set1_epi32(0x01010101));
    for (const int64_t be = b + pe; b < be; ++b) {
      const uint8_t* cb = ct + b * (QBLK * NR / 2);
      __m512 s0[MR][NP], s1[MR][NP];
      for (int i = 0; i < MR; ++i)
        for (int p = 0; p < NP; ++p) s0[i][p] = s1[i][p] = _mm512_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        const __m512i P = _mm512_load_si512((const void*)(cb + 64 * j));
        __m512i al, bl, ah, bh;
        if (ROW_OFF) {
          const __m512i L = _mm512_sub_epi8(_mm512_and_si512(P, lo4), ob);
          const __m512i H = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(P, 4), lo4), ob);
          al = _mm512_permutexvar_epi16(_mm512_shuffle_epi8(L, IA), vtab);
          bl = _mm512_permutexvar_epi16(_mm512_shuffle_epi8(L, IB), vtab);
          ah = _mm512_permutexvar_epi16(_mm512_shuffle_epi8(H, IA), vtab);
          bh = _mm512_permutexvar_epi16(_mm512_shuffle_epi8(H, IB), vtab);
        } else {
          const __m512i A = _mm512_shuffle_epi8(P, IA), B = _mm512_shuffle_epi8(P, IB);
          al = _mm512_permutexvar_epi16(A, vtab);
          bl = _mm512_permutexvar_epi16(B, vtab);
          ah = _mm512_permutexvar_epi16(_mm512_srli_epi16(A, 4), vtab);
          bh = _mm512_permutexvar_epi16(_mm512_srli_epi16(B, 4), vtab);
        }
        for (int i = 0; i < MR; ++i)
          for (int p = 0; p < NP; ++p) {
            const uint16_t* xb = x + p * ps + i * ldx + b * QBLK + 4 * j;
            s0[i][p] = dp_pair(s0[i][p], al, xb);
            s1[i][p] = dp_pair(s1[i][p], bl, xb + 2);
            s0[i][p] = dp_pair(s0[i][p], ah, xb + 16);
            s1[i][p] = dp_pair(s1[i][p], bh, xb + 18);
          }
      }
      for (int i = 0; i < MR; ++i) {
        __m512 sb = _mm512_add_ps(s0[i][0], s1[i][0]);
        for (int p = 1; p < NP; ++p) sb = _mm512_add_ps(sb, _mm512_add_ps(s0[i][p], s1[i][p]));
        acc[i] = _mm512_fmadd_ps(sb, va, acc[i]);
      }
    }
  }
  const __m512 vb = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
  for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(y + i * ldy + n0, mask, _mm512_add_ps(acc[i], vb));
}

template <int MR, int NP>
void dispatch(const PackedWeight& w, int64_t tile, const uint16_t* x, int64_t ldx, int64_t ps, float* y, int64_t ldy,
              const float* bias) {
  if (w.row_offset) return gemv_tile<MR, NP, true>(w, tile, x, ldx, ps, y, ldy, bias);
  gemv_tile<MR, NP, false>(w, tile, x, ldx, ps, y, ldy, bias);
}

}  // namespace

bool gemv_bf16(const PackedWeight& w, int64_t tile, const uint16_t* x, int64_t ldx, int64_t m, int parts,
               int64_t part_stride, float* y, int64_t ldy, const float* bias) {
  if (!w.nibbles || w.lut || w.blk != QBLK || w.has_min) return false;
  const int64_t ps = part_stride;
  if (parts == 1) {
    switch (m) {
      case 1: dispatch<1, 1>(w, tile, x, ldx, ps, y, ldy, bias); return true;
      case 2: dispatch<2, 1>(w, tile, x, ldx, ps, y, ldy, bias); return true;
      case 3: dispatch<3, 1>(w, tile, x, ldx, ps, y, ldy, bias); return true;
      case 4: dispatch<4, 1>(w, tile, x, ldx, ps, y, ldy, bias); return true;
      default: return false;
    }
  }
  if (parts == 3) {
    switch (m) {
      case 1: dispatch<1, 3>(w, tile, x, ldx, ps, y, ldy, bias); return true;
      case 2: dispatch<2, 3>(w, tile, x, ldx, ps, y, ldy, bias); return true;
      default: return false;
    }
  }
  return false;
}

void register_kernels(KernelTable& t) { t.gemv_bf16 = gemv_bf16; }

}}  // namespace pqk::avx512bf16
