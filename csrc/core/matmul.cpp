// matmul drivers: int8 compute over packed weights, float compute over canonical rows.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <string>
#include <vector>

#include "capi_util.h"
#include "kernel_table.h"
#include "pack.h"
#include "threadpool.h"

struct pqk_packed {
  pqk::PackedWeight w;
};

namespace pqk {
namespace {

void check_x_finite(const float* x, int64_t m, int64_t k, int64_t ldx) {
  std::atomic<int64_t> bad{INT64_MAX};
  parallel_for(m, std::max<int64_t>(1, 65536 / k), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      if (!row_finite(x + i * ldx, k)) {
        int64_t cur = bad.load();
        while (i < cur && !bad.compare_exchange_weak(cur, i)) {}
        return;
      }
  });
  if (bad.load() != INT64_MAX)
    throw Error(PQK_ERR_NONFINITE, "x contains NaN or Inf (row " + std::to_string(bad.load()) +
                                       "); compute=int8 cannot quantize it; use compute=float");
}

constexpr int64_t M_CHUNK = 128;  // activation rows per pass over the weights (L2-sized)

}  // namespace
}  // namespace pqk

using namespace pqk;

extern "C" {

int32_t pqk_int8_supported(int32_t fmt, int64_t k, const pqk_qparams* params) {
  if (!params || fmt < 0 || fmt >= PQK_FORMAT_COUNT || k <= 0) return 0;
  pqk_qparams p = *params;
  try { row_bytes(fmt, k, p); } catch (...) { return 0; }
  return int8_compute_supported(fmt, k, p) ? 1 : 0;
}

pqk_status pqk_pack(int32_t fmt, const void* q, const void* s, const void* z, int64_t n, int64_t k,
                    const pqk_qparams* params, pqk_packed** out) {
  return guarded([&] {
    if (!params || !out || !q) throw Error(PQK_ERR_ARG, "NULL argument");
    *out = nullptr;
    pqk_qparams p = *params;
    pqk_row_bytes rb = row_bytes(fmt, k, p);
    if (n <= 0) throw Error(PQK_ERR_SHAPE, "n must be positive");
    if ((rb.s && !s) || (rb.z && !z)) throw Error(PQK_ERR_ARG, "NULL scale/zero buffer");
    auto* h = new pqk_packed();
    try {
      pack_weight(fmt, (const uint8_t*)q, (const uint8_t*)s, (const uint8_t*)z, n, k, p, h->w);
    } catch (...) {
      delete h;
      throw;
    }
    *out = h;
  });
}

void pqk_packed_free(pqk_packed* w) { delete w; }
int64_t pqk_packed_nbytes(const pqk_packed* w) { return w ? (int64_t)w->w.nbytes() : 0; }

pqk_status pqk_matmul_int8(int32_t isa, const pqk_packed* wp, const float* x, int64_t m, int64_t ldx,
                           const float* bias, float* y, int64_t ldy) {
  return guarded([&] {
    if (!wp) throw Error(PQK_ERR_ARG, "packed weight is NULL");
    const PackedWeight& w = wp->w;
    if (m < 0) throw Error(PQK_ERR_SHAPE, "m < 0");
    if (m == 0) return;
    if (!x || !y) throw Error(PQK_ERR_ARG, "NULL x/y");
    if (ldx < w.k || ldy < w.n) throw Error(PQK_ERR_SHAPE, "row stride smaller than the row");
    const KernelTable& t = kernel_table(resolve_isa(isa));
    if (!t.quantize_act || !t.gemm_int8) throw Error(PQK_ERR_INTERNAL, "int8 matmul kernels not registered");
    check_x_finite(x, m, w.k, ldx);
    for (int64_t c0 = 0; c0 < m; c0 += M_CHUNK) {
      const int64_t mc = std::min(M_CHUNK, m - c0);
      ActQ a;
      a.m = mc; a.k = w.k;
      a.xq.resize((size_t)(mc * w.k));
      a.dx.resize((size_t)(mc * (w.k / QBLK)));
      a.xs.resize((size_t)(mc * (w.k / 16)));
      parallel_for(mc, std::max<int64_t>(1, 16384 / w.k), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i)
          t.quantize_act(x + (c0 + i) * ldx, w.k, a.xq.data() + i * w.k, a.dx.data() + i * (w.k / QBLK),
                         a.xs.data() + i * (w.k / 16));
      });
      float* yc = y + c0 * ldy;
      parallel_for(w.n_tiles, 1, [&](int64_t b, int64_t e) {
        for (int64_t tile = b; tile < e; ++tile) t.gemm_int8(w, tile, a, 0, mc, yc, ldy, bias);
      });
    }
  });
}

pqk_status pqk_matmul_float(int32_t isa, int32_t fmt, const void* q, const void* s, const void* z, int64_t n,
                            int64_t k, const pqk_qparams* params, const float* x, int64_t m, int64_t ldx,
                            const float* bias, float* y, int64_t ldy) {
  return guarded([&] {
    if (!params) throw Error(PQK_ERR_ARG, "params is NULL");
    pqk_qparams p = *params;
    pqk_row_bytes rb = row_bytes(fmt, k, p);
    if (m < 0 || n <= 0) throw Error(PQK_ERR_SHAPE, "bad m/n");
    if (m == 0) return;
    if (!q || !x || !y || (rb.s && !s) || (rb.z && !z)) throw Error(PQK_ERR_ARG, "NULL buffer");
    if (ldx < k || ldy < n) throw Error(PQK_ERR_SHAPE, "row stride smaller than the row");
    const KernelTable& t = kernel_table(resolve_isa(isa));
    dequantize_row_fn deq = t.dequantize[fmt];
    if (!deq) throw Error(PQK_ERR_UNSUPPORTED, "dequantize not implemented for this format");
    if (!t.gemm_f32) throw Error(PQK_ERR_INTERNAL, "float matmul kernel not registered");
    const uint8_t* Q = (const uint8_t*)q; const uint8_t* S = (const uint8_t*)s; const uint8_t* Z = (const uint8_t*)z;
    // Rows of W in groups of FR, dequantized into a per-thread buffer, then fp32 dots.
    constexpr int FR = 8;
    const int64_t groups = (n + FR - 1) / FR;
    parallel_for(groups, 1, [&](int64_t g0, int64_t g1) {
      std::vector<float> wbuf((size_t)(FR * k));
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t r0 = g * FR;
        const int nr = (int)std::min<int64_t>(FR, n - r0);
        for (int r = 0; r < nr; ++r)
          deq(Q + (r0 + r) * rb.q, S ? S + (r0 + r) * rb.s : nullptr, Z ? Z + (r0 + r) * rb.z : nullptr, k,
              wbuf.data() + (size_t)r * k, p);
        t.gemm_f32(wbuf.data(), nr, k, x, ldx, m, y + r0, ldy, bias ? bias + r0 : nullptr);
      }
    });
  });
}

}  // extern "C"
