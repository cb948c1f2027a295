// The row loop of the compute="float" decode kernels (gemv_f32 slot) of the x86 folders:
// y[i, r] (+ bias[r]) = sum over chunks of 32 of the decoded weights times x, for weight rows
// [r0, r1) and m <= GEMV_F32_MAX_M activation rows.
//
// A folder supplies a vector type V (lanes, load, fused multiply-add, horizontal sum) and one
// decoder per format: D::Row row(q, s, z) for a weight row's bytes, D::chunk<J>(row, step, w)
// writing the 32 weights of chunk step * D::kStep + J as 32 / V::N vectors (element order, or
// for D::kSplitX the chunk's 16 even elements then its 16 odd ones), and optionally
// D::tail(row, chunk, n, w) for a last chunk of n < 32 elements (lanes past n zero).
//
// Instantiated only with a folder's own internal-linkage V and D, so each instantiation stays in
// the translation unit (and ISA flags) it was compiled with; no inline function of a library
// (std:: containers, std::min) is instantiated here, whose one kept copy could carry those flags.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../core/kernel_table.h"

namespace pqk { namespace gemv_f32 {

// chunks of 32 per parameter group for the grouped nibble formats (nf4 / fp4 block, int4 group or
// the whole row), or 0 for parameters the decode kernels do not take (groups of 16, groups or a
// row not a multiple of 32): those keep the dequantize-a-chunk path
static inline int64_t group_chunks(int64_t k, int64_t g) { return g >= 32 && g % 32 == 0 && k % g == 0 ? g / 32 : 0; }

// f(std::integral_constant<int, J>) for J = B .. E-1, each J a compile-time constant
template <int B, int E, class F>
inline void static_for(F&& f) {
  if constexpr (B < E) {
    f(std::integral_constant<int, B>{});
    static_for<B + 1, E>(f);
  }
}

template <class D, class = void>
struct HasTail : std::false_type {};
template <class D>
struct HasTail<D, decltype(void(&D::tail))> : std::true_type {};

// One weight row's running state: the decoder's row state and its accumulators (V::accs(M) per
// activation row; vector v of a chunk goes to accumulator v % NA). Kept across K blocks, so a
// row's operations are those of one pass over K whatever the blocking, R, or rows around it.
template <class V, class D, int M>
struct RowState {
  typename D::Row row;
  typename V::vec acc[M][V::accs(M)];
};

// Chunks [c0, c1) of R weight rows (states st[0..R)) against M activation rows, and the int8-style
// tail chunk if `tail`: the states loaded into registers, advanced, stored back. xp: x packed by
// chunks, chunk ci of activation row i at xp + (ci * M + i) * 32 (the tail chunk zero-padded).
template <class V, class D, int R, int M>
void rows(const D& dec, RowState<V, D, M>* st, int64_t c0, int64_t c1, bool tail, int64_t k, const float* xp) {
  constexpr int NV = 32 / V::N, NA = V::accs(M);
  static_assert(NV % NA == 0, "accumulators must divide the vectors of a chunk");
  using vec = typename V::vec;
  typename D::Row row[R];
  vec acc[R][M][NA];
  for (int r = 0; r < R; ++r) {
    row[r] = st[r].row;
    for (int i = 0; i < M; ++i)
      for (int a = 0; a < NA; ++a) acc[r][i][a] = st[r].acc[i][a];
  }
  auto step = [&](const float* const* xc, auto&& decode) {
    for (int r = 0; r < R; ++r) {
      vec w[NV];
      decode(row[r], w);
      for (int i = 0; i < M; ++i)  // x from memory (an FMA operand): M * NV vectors would not fit in registers
        for (int v = 0; v < NV; ++v) acc[r][i][v % NA] = V::fma(w[v], V::load(xc[i] + v * V::N), acc[r][i][v % NA]);
    }
  };
  auto xchunk = [&](int64_t ci, const float** xc) {
    for (int i = 0; i < M; ++i) xc[i] = xp + (ci * M + i) * 32;
  };
  for (int64_t sp = c0 / D::kStep; sp < c1 / D::kStep; ++sp)
    static_for<0, D::kStep>([&](auto J) {
      const float* xc[M];
      xchunk(sp * D::kStep + J, xc);
      step(xc, [&](typename D::Row& r, vec* w) { dec.template chunk<J>(r, sp, w); });
    });
  if constexpr (HasTail<D>::value) {
    const int64_t nc = k / 32;
    const int n = (int)(k - 32 * nc);
    if (tail && n) {
      const float* xc[M];
      xchunk(nc, xc);
      step(xc, [&](typename D::Row& r, vec* w) { dec.tail(r, nc, n, w); });
    }
  }
  for (int r = 0; r < R; ++r) {
    st[r].row = row[r];
    for (int i = 0; i < M; ++i)
      for (int a = 0; a < NA; ++a) st[r].acc[i][a] = acc[r][i][a];
  }
}

// rows [r0, r1) in blocks of RB; each block over K in blocks of kc elements, so the M rows of x
// for one K block stay in L1 (at M = 8 all of x is 128 KiB at K = 4096) while RB weight rows use
// them; within a block V::rows(M) weight rows at a time, then one at a time
template <class V, class D, int M>
void run_m(const D& dec, const uint8_t* q, const uint8_t* s, const uint8_t* z, const pqk_row_bytes& rb, int64_t r0,
           int64_t r1, int64_t k, const float* xp, float* y, int64_t ldy, const float* bias) {
  constexpr int R = V::rows(M), RB = 16, NA = V::accs(M);
  constexpr int64_t kL1 = 24 * 1024;  // bytes of x per K block
  const int64_t nc = k / 32, unit = 8 * D::kStep;  // K blocks of whole steps (a K-quant super-block)
  const int64_t kfit = kL1 / (M * 4 * 32) / unit * unit, kc = kfit > unit ? kfit : unit;
  RowState<V, D, M> st[RB];
  for (int64_t b0 = r0; b0 < r1; b0 += RB) {
    const int nb = (int)(r1 - b0 < RB ? r1 - b0 : RB);
    for (int r = 0; r < nb; ++r) {
      const int64_t row = b0 + r;
      st[r].row = dec.row(q + row * rb.q, s ? s + row * rb.s : nullptr, z ? z + row * rb.z : nullptr);
      for (int i = 0; i < M; ++i)
        for (int a = 0; a < NA; ++a) st[r].acc[i][a] = V::zero();
    }
    for (int64_t c0 = 0; c0 < nc || c0 == 0; c0 += kc) {
      const int64_t c1 = c0 + kc < nc ? c0 + kc : nc;
      const bool last = c1 == nc;
      int r = 0;
      for (; r + R <= nb; r += R) rows<V, D, R, M>(dec, st + r, c0, c1, last, k, xp);
      for (; r < nb; ++r) rows<V, D, 1, M>(dec, st + r, c0, c1, last, k, xp);
      if (last) break;
    }
    for (int r = 0; r < nb; ++r)
      for (int i = 0; i < M; ++i) {
        typename V::vec t = st[r].acc[i][0];
        for (int a = 1; a < NA; ++a) t = V::add(t, st[r].acc[i][a]);
        const float sum = V::hsum(t);
        y[i * ldy + b0 + r] = bias ? sum + bias[b0 + r] : sum;
      }
  }
}

// The whole call. x is first packed by chunks of 32 into a 64-byte aligned buffer (chunk ci of
// row i at (ci * m + i) * 32: the m rows' chunk side by side, each vector load one whole cache
// line whatever the caller's alignment and ldx), for a kSplitX decoder each chunk as its 16 even
// elements then its 16 odd ones, a K tail zero-padded to a chunk.
template <class V, class D>
bool run(const D& dec, const uint8_t* q, const uint8_t* s, const uint8_t* z, const pqk_row_bytes& rb, int64_t r0,
         int64_t r1, int64_t k, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy, const float* bias) {
  if (r0 >= r1) return true;
  // posix_memalign, not a std:: container: an inline library template instantiated here would be
  // compiled with this folder's ISA flags, and the linker may keep that copy for baseline code too
  const int64_t nct = (k + 31) / 32;
  float* xp = nullptr;
  if (m > 1 || D::kSplitX || k % 32) {  // one row already is its chunks in order
    // 64-byte aligned: each chunk row is two whole cache lines (with malloc's 16-byte alignment
    // every vector load split across two lines, and M = 8 ran at half speed)
    void* mem = nullptr;
    if (posix_memalign(&mem, 64, (size_t)(nct * m * 32) * sizeof(float)) != 0) return false;
    xp = (float*)mem;
    for (int64_t ci = 0; ci < nct; ++ci)
      for (int64_t i = 0; i < m; ++i) {
        float* dst = xp + (ci * m + i) * 32;
        const float* src = x + i * ldx + 32 * ci;
        const int64_t n = k - 32 * ci < 32 ? k - 32 * ci : 32;
        if (D::kSplitX) {  // n == 32: split formats have k % 32 == 0
          for (int t = 0; t < 16; ++t) {
            dst[t] = src[2 * t];
            dst[16 + t] = src[2 * t + 1];
          }
        } else {
          std::memcpy(dst, src, (size_t)n * sizeof(float));
          if (n < 32) std::memset(dst + n, 0, (size_t)(32 - n) * sizeof(float));
        }
      }
  }
  const float* xs = xp ? xp : x;
  static_for<1, GEMV_F32_MAX_M + 1>([&](auto M) {
    if (m == M) run_m<V, D, M>(dec, q, s, z, rb, r0, r1, k, xs, y, ldy, bias);
  });
  std::free(xp);
  return true;
}

}}  // namespace pqk::gemv_f32
