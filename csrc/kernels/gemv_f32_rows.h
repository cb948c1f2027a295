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
// (std:: containers) is instantiated here, whose one kept copy could carry those flags.
#pragma once
#include <cstdint>
#include <cstdlib>
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

// R weight rows from r0 against M activation rows (ldx apart); one accumulator per vector of a
// chunk, so a row's operations do not depend on R (nor on the rows around it)
template <class V, class D, int R, int M>
void rows(const D& dec, const uint8_t* q, const uint8_t* s, const uint8_t* z, const pqk_row_bytes& rb, int64_t r0,
          int64_t k, const float* x, int64_t ldx, float* y, int64_t ldy, const float* bias) {
  constexpr int NV = 32 / V::N;
  using vec = typename V::vec;
  typename D::Row row[R];
  for (int r = 0; r < R; ++r)
    row[r] = dec.row(q + (r0 + r) * rb.q, s ? s + (r0 + r) * rb.s : nullptr, z ? z + (r0 + r) * rb.z : nullptr);
  vec acc[R][M][NV];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i)
      for (int v = 0; v < NV; ++v) acc[r][i][v] = V::zero();
  auto step = [&](const float* const* xc, auto&& decode) {
    vec xv[M][NV];
    for (int i = 0; i < M; ++i)
      for (int v = 0; v < NV; ++v) xv[i][v] = V::load(xc[i] + v * V::N);
    for (int r = 0; r < R; ++r) {
      vec w[NV];
      decode(row[r], w);
      for (int i = 0; i < M; ++i)
        for (int v = 0; v < NV; ++v) acc[r][i][v] = V::fma(w[v], xv[i][v], acc[r][i][v]);
    }
  };
  const int64_t nc = k / 32;
  for (int64_t st = 0; st < nc / D::kStep; ++st)
    static_for<0, D::kStep>([&](auto J) {
      const int64_t ci = st * D::kStep + J;
      const float* xc[M];
      for (int i = 0; i < M; ++i) xc[i] = x + i * ldx + 32 * ci;
      step(xc, [&](typename D::Row& r, vec* w) { dec.template chunk<J>(r, st, w); });
    });
  if constexpr (HasTail<D>::value) {
    const int n = (int)(k - 32 * nc);
    if (n) {  // x's last n elements, zero-padded to a chunk
      alignas(64) float xt[M][32] = {};
      const float* xc[M];
      for (int i = 0; i < M; ++i) {
        for (int j = 0; j < n; ++j) xt[i][j] = x[i * ldx + 32 * nc + j];
        xc[i] = xt[i];
      }
      step(xc, [&](typename D::Row& r, vec* w) { dec.tail(r, nc, n, w); });
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) {
      vec t = acc[r][i][0];
      for (int v = 1; v < NV; ++v) t = V::add(t, acc[r][i][v]);
      const float sum = V::hsum(t);
      y[i * ldy + r0 + r] = bias ? sum + bias[r0 + r] : sum;
    }
}

// rows [r0, r1): V::rows(M) at a time, then one at a time
template <class V, class D, int M>
void run_m(const D& dec, const uint8_t* q, const uint8_t* s, const uint8_t* z, const pqk_row_bytes& rb, int64_t r0,
           int64_t r1, int64_t k, const float* x, int64_t ldx, float* y, int64_t ldy, const float* bias) {
  constexpr int R = V::rows(M);
  int64_t r = r0;
  for (; r + R <= r1; r += R) rows<V, D, R, M>(dec, q, s, z, rb, r, k, x, ldx, y, ldy, bias);
  for (; r < r1; ++r) rows<V, D, 1, M>(dec, q, s, z, rb, r, k, x, ldx, y, ldy, bias);
}

// The whole call: x split per chunk of 32 into even then odd elements for a kSplitX decoder.
template <class V, class D>
bool run(const D& dec, const uint8_t* q, const uint8_t* s, const uint8_t* z, const pqk_row_bytes& rb, int64_t r0,
         int64_t r1, int64_t k, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy, const float* bias) {
  if (r0 >= r1) return true;
  // malloc, not a std:: container: an inline library template instantiated here would be compiled
  // with this folder's ISA flags, and the linker may keep that copy for baseline code too
  float* split = nullptr;
  if (D::kSplitX) {
    split = (float*)std::malloc((size_t)(m * k) * sizeof(float));
    if (!split) return false;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < k; j += 32)
        for (int t = 0; t < 16; ++t) {
          split[i * k + j + t] = x[i * ldx + j + 2 * t];
          split[i * k + j + 16 + t] = x[i * ldx + j + 2 * t + 1];
        }
    x = split;
    ldx = k;
  }
  switch (m) {
    case 1: run_m<V, D, 1>(dec, q, s, z, rb, r0, r1, k, x, ldx, y, ldy, bias); break;
    case 2: run_m<V, D, 2>(dec, q, s, z, rb, r0, r1, k, x, ldx, y, ldy, bias); break;
    case 3: run_m<V, D, 3>(dec, q, s, z, rb, r0, r1, k, x, ldx, y, ldy, bias); break;
    default: run_m<V, D, 4>(dec, q, s, z, rb, r0, r1, k, x, ldx, y, ldy, bias); break;
  }
  std::free(split);
  return true;
}

}}  // namespace pqk::gemv_f32
