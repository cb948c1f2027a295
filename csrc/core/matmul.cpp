// matmul drivers: int8 compute over packed weights, float compute over canonical rows.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "capi_util.h"
#include "kernel_table.h"
#include "pack.h"
#include "threadpool.h"
#include "../kernels/common.h"

struct pqk_packed {
  pqk::PackedWeight w;
};

namespace pqk {
namespace {

// compute=int8 multiplies in fp32 a * dx per block (dx = block max |x| / 127) and, for the
// mins, m * (dx * block sum). Those products and each block's term (a * dx times an integer
// block sum |isum| < 2^b: 32 x 127 x 16 < 2^16 for plain 4-bit codes, 32 x 127 x 255 < 2^20
// else) stay finite while every |x| < 2^(e - 127) for the exponent field e returned here:
// a * dx * 2^b < 2^128 with |a| < 2^ea, m * 32 * max|x| < 2^128 with |m| < 2^em, and (with mins)
// dx * 4064 < 2^128. So no Inf * 0 makes NaN of a finite result; the running sum of the terms
// can still overflow to Inf near the limit where later blocks would cancel it (as any fp32 sum
// in that order would), never to NaN (finite terms). q4_0 with fp16 scales up to 65504:
// |x| < 2^102. NaN / Inf scales or mins: e = 1 (zeros and subnormals only).
uint32_t int8_x_exp_limit(const PackedWeight& w) {
  if (!std::isfinite(w.max_a) || !std::isfinite(w.max_m)) return 1;
  // |u - o| <= 16 (codes 0..15, offsets a quantizer makes; hostile zero points go up to 255)
  const int b = w.nibbles && !w.lut && w.max_offset <= 16 && w.o_const <= 16 ? 16 : 20;
  int64_t e = w.has_min ? 249 : 255;
  int ex = 0;
  if (w.max_a > 0.0f) {
    std::frexp(w.max_a, &ex);  // |a| < 2^ex
    e = std::min<int64_t>(e, 261 - b - ex);
  }
  if (w.max_m > 0.0f) {
    std::frexp(w.max_m, &ex);
    e = std::min<int64_t>(e, 250 - ex);
  }
  return (uint32_t)std::max<int64_t>(e, 1);
}

void check_x_finite(const KernelTable& t, const float* x, int64_t m, int64_t k, int64_t ldx, const PackedWeight& w) {
  const uint32_t e = int8_x_exp_limit(w);
  std::atomic<int64_t> bad{INT64_MAX};
  parallel_for(m, std::max<int64_t>(1, 65536 / k), [&](int64_t b, int64_t end) {
    for (int64_t i = b; i < end; ++i)
      if (!t.all_finite(x + i * ldx, k, e)) {
        record_lowest(bad, i);
        return;
      }
  });
  const int64_t row = bad.load();
  if (row == INT64_MAX) return;
  if (!t.all_finite(x + row * ldx, k, 255))
    throw Error(PQK_ERR_NONFINITE, "x contains NaN or Inf (row " + std::to_string(row) +
                                       "); compute=int8 cannot quantize it; use compute=float");
  if (!std::isfinite(w.max_a) || !std::isfinite(w.max_m))  // then e == 1: any nonzero x
    throw Error(PQK_ERR_NONFINITE, "the weight has Inf or NaN scales (values beyond the format's range "
                                   "when quantized); compute=int8 cannot use them; use compute=float");
  throw Error(PQK_ERR_NONFINITE, "x has values of magnitude 2^" + std::to_string((int)e - 127) + " or more (row " +
                                     std::to_string(row) + "): with this weight's scales compute=int8's fp32 "
                                     "products could overflow; use compute=float");
}

constexpr int64_t M_CHUNK = 128;  // activation rows per pass over the weights (L2-sized)

// whether the float ranges [a, a + na) and [b, b + nb) share memory
bool overlaps(const float* a, int64_t na, const float* b, int64_t nb) {
  const uintptr_t pa = (uintptr_t)a, pb = (uintptr_t)b;
  return pb < pa + (uintptr_t)(na * 4) && pa < pb + (uintptr_t)(nb * 4);
}

// The kernels read x while they write y. When out overlaps x (C callers; Python copies x
// itself), x is copied first and x / ldx point at the copy.
void apart_from_y(const float*& x, int64_t& ldx, int64_t m, int64_t k, const float* y, int64_t ldy, int64_t n,
                  std::vector<float>& copy) {
  if (!overlaps(x, (m - 1) * ldx + k, y, (m - 1) * ldy + n)) return;
  copy.resize((size_t)(m * k));
  for (int64_t i = 0; i < m; ++i) std::memcpy(copy.data() + i * k, x + i * ldx, (size_t)k * 4);
  x = copy.data();
  ldx = k;
}

// The kernels write y before or while they read the bias: a bias inside y's extent (C callers;
// Python copies it itself) is copied first.
void bias_apart_from_y(const float*& bias, int64_t n, const float* y, int64_t m, int64_t ldy,
                       std::vector<float>& copy) {
  if (!bias || !overlaps(bias, n, y, (m - 1) * ldy + n)) return;
  copy.assign(bias, bias + n);
  bias = copy.data();
}

// Adapters of one call: validation, shrink results t = x . A^T per row, expansion args.
struct Adapters {
  const pqk_lora* ad = nullptr;
  int32_t n_ad = 0;
  const int32_t* row_adapter = nullptr;
  int64_t t_cols = 0;
  std::vector<int64_t> t_off;

  Adapters(const pqk_lora* a, int32_t n, const int32_t* rows, int64_t m)
      : ad(a), n_ad(n), row_adapter(rows) {
    if (n < 0 || (n > 0 && !a)) throw Error(PQK_ERR_ARG, "bad adapter list");
    if (rows && n == 0) throw Error(PQK_ERR_ARG, "row adapter ids given without adapters");
    int64_t sum = 0, mx = 0;
    for (int32_t i = 0; i < n; ++i) {
      if (a[i].dtype < 0 || a[i].dtype > 2) throw Error(PQK_ERR_ARG, "adapter " + std::to_string(i) + ": bad dtype");
      if (a[i].rank <= 0 || !a[i].A || !a[i].Bp) throw Error(PQK_ERR_ARG, "adapter " + std::to_string(i) + ": bad rank or NULL A/B");
      if (!std::isfinite(a[i].scale)) throw Error(PQK_ERR_ARG, "adapter " + std::to_string(i) + ": scale is NaN or Inf");
      if (!rows && n > 1 && a[i].row_scale)
        throw Error(PQK_ERR_ARG, "DoRA (row_scale) adapters cannot be summed on the same rows");
      t_off.push_back(sum);
      sum += a[i].rank;
      mx = std::max<int64_t>(mx, a[i].rank);
    }
    t_cols = rows ? mx : sum;
    check_extent(m, t_cols, "adapter shrink results (rows x summed ranks)");  // m * t_cols wrapped to 0
    if (rows)
      for (int64_t i = 0; i < m; ++i)
        if (rows[i] < -1 || rows[i] >= n)
          throw Error(PQK_ERR_ARG, "adapter id " + std::to_string(rows[i]) + " of row " + std::to_string(i) +
                                       " is out of range [-1, " + std::to_string(n) + ")");
  }
  bool active() const { return n_ad > 0; }

  // t[i, c] for row i of x (global row index gi for the adapter ids) and the t columns c in
  // [c0, c1) (all columns by default); each column is one dot product, so any split of the
  // columns gives the same numbers.
  void shrink(const KernelTable& t, const float* xrow, int64_t k, int64_t gi, float* trow, int64_t c0 = 0,
              int64_t c1 = INT64_MAX) const {
    auto part = [&](const pqk_lora& a, int64_t off) {
      const int64_t lo = std::max<int64_t>(c0, off), hi = std::min<int64_t>(c1, off + a.rank);
      if (lo < hi) t.lora_shrink(a, lo - off, hi - off, k, xrow, trow + lo);
    };
    if (row_adapter) {
      const int32_t a = row_adapter[gi];
      if (a >= 0) part(ad[a], 0);
      return;
    }
    for (int32_t a = 0; a < n_ad; ++a) part(ad[a], t_off[a]);
  }

  // The shrink for a few rows (decode) as tasks of CC rank columns each, so it is not one
  // thread's job: task j of [0, tasks(mc)) fills row j / per_row(), columns from (j % per_row()) * CC.
  static constexpr int64_t CC = 4;
  int64_t per_row() const { return (t_cols + CC - 1) / CC; }
  int64_t tasks(int64_t mc) const { return mc * per_row(); }
  void shrink_task(const KernelTable& t, const float* x, int64_t ldx, int64_t k, int64_t g0, float* T,
                   int64_t j) const {
    const int64_t i = j / per_row(), c = (j % per_row()) * CC;
    shrink(t, x + i * ldx, k, g0 + i, T + i * t_cols, c, c + CC);
  }

  // t for rows [0, mc) of x (row i at x + i*ldx, global index g0 + i): rows in parallel, or for
  // fewer rows than threads their rank columns in parallel.
  void shrink_rows(const KernelTable& t, const float* x, int64_t ldx, int64_t k, int64_t mc, int64_t g0,
                   float* T) const {
    if (mc >= get_num_threads()) {
      parallel_for(mc, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) shrink(t, x + i * ldx, k, g0 + i, T + i * t_cols);
      });
      return;
    }
    parallel_for(tasks(mc), 1, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) shrink_task(t, x, ldx, k, g0, T, j);
    });
  }

  LoraArgs args(const float* T, int64_t c0, const float* bias, int64_t nout) const {
    LoraArgs L;
    L.ad = ad; L.n_ad = n_ad; L.row_adapter = row_adapter ? row_adapter + c0 : nullptr;
    L.t = T; L.t_cols = t_cols; L.t_off = t_off.data(); L.bias = bias; L.n = nout;
    return L;
  }
};

// The shrink of a few rows (decode) shared by the ranges of one parallel_for over output tiles:
// each range first claims the rank-column tasks nobody has taken, so the threads split A's reads
// (from DRAM, in a model) instead of one of them doing it all while the others wait at the end.
// Before its expansion a range takes the shared t if every task is published, else computes its
// own copy rather than wait (the thread holding a task may have lost its core): the same code,
// so the same numbers. x must stay unchanged until the parallel_for returns (y must not overlap it).
struct SharedShrink {
  const Adapters& AD;
  const KernelTable& t;
  const float* x;
  int64_t ldx, k, mc, g0;  // rows [0, mc) of x, global row index g0 + i
  float* T;
  int64_t ntask = AD.tasks(mc);
  std::atomic<int64_t> next{0}, done{0};

  void claim() {
    if (next.load(std::memory_order_relaxed) >= ntask) return;  // all taken: no atomic write per range
    for (int64_t j; (j = next.fetch_add(1, std::memory_order_relaxed)) < ntask;) {
      AD.shrink_task(t, x, ldx, k, g0, T, j);
      done.fetch_add(1, std::memory_order_release);
    }
  }
  // expansion (with bias) of output columns [n0, n0 + nr) of every row
  void expand(const float* bias, int64_t nout, int64_t n0, int nr, float* y, int64_t ldy) const {
    if (done.load(std::memory_order_acquire) == ntask) {
      t.lora_expand(AD.args(T, g0, bias, nout), 0, mc, n0, nr, y, ldy);
      return;
    }
    std::vector<float> own((size_t)(mc * AD.t_cols));
    for (int64_t i = 0; i < mc; ++i) AD.shrink(t, x + i * ldx, k, g0 + i, own.data() + i * AD.t_cols);
    t.lora_expand(AD.args(own.data(), g0, bias, nout), 0, mc, n0, nr, y, ldy);
  }
};

void matmul_int8_impl(int32_t isa, const pqk_packed* wp, const float* x, int64_t m, int64_t ldx, const float* bias,
                      float* y, int64_t ldy, const pqk_lora* ads, int32_t n_ad, const int32_t* rows);
void matmul_float_impl(int32_t isa, int32_t fmt, const void* q, const void* s, const void* z, int64_t n, int64_t k,
                       const pqk_qparams* params, const float* x, int64_t m, int64_t ldx, const float* bias, float* y,
                       int64_t ldy, const pqk_lora* ads, int32_t n_ad, const int32_t* rows);

// finite x to bf16, round to nearest even (may round up to Inf near FLT_MAX)
inline uint16_t fp32_to_bf16_rne(float v) {
  const uint32_t u = f32_bits(v);
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Checks shared by the packed float kernels (gemv_bf16, gemv_f32p): throws UNSUPPORTED for the
// cases they do not take (callers then go the fp32 way). Returns the variant's table.
const KernelTable& packed_float_table(int32_t isa, const pqk_packed* wp, int64_t m, int64_t ldx, float* y,
                                      int64_t ldy) {
  if (!wp) throw Error(PQK_ERR_ARG, "packed weight is NULL");
  const PackedWeight& w = wp->w;
  if (m < 0) throw Error(PQK_ERR_SHAPE, "m < 0");
  const KernelTable& t = kernel_table(resolve_isa(isa));  // a bad isa is an error even for m = 0
  if (m == 0) return t;
  if (!y) throw Error(PQK_ERR_ARG, "NULL y");
  if (ldx < w.k || ldy < w.n) throw Error(PQK_ERR_SHAPE, "row stride smaller than the row");
  check_extent(m, ldx, "x");
  check_extent(m, ldy, "y");
  if (!t.gemv_bf16 && !t.gemv_f32p) throw Error(PQK_ERR_UNSUPPORTED, "no packed float kernel for this variant / CPU");
  if (!w.nibbles || w.lut || w.blk != QBLK)
    throw Error(PQK_ERR_UNSUPPORTED, "the packed float kernels take 4-bit codes without a code book");
  // a * sum(u x) + m * sum(x) per block (q4_1, q4_k) cancels where a * u + m does: a weight near
  // 0 beside a large x gave y = 0 for -6.25 (the fp32 route dequantizes each weight first)
  if (w.has_min) throw Error(PQK_ERR_UNSUPPORTED, "formats with a min term go the fp32 way");
  // a * sum((u - o) x): an Inf scale times a finite sum is Inf where a * 0 terms make the fp32
  // route's NaN
  if (!std::isfinite(w.max_a)) throw Error(PQK_ERR_UNSUPPORTED, "non-finite scales go the fp32 way");
  if (w.row_offset && w.max_offset > 16)  // the bf16 table covers u - o in -16..15
    throw Error(PQK_ERR_UNSUPPORTED, "zero points above 16 (not from a quantizer) go the fp32 way");
  return t;
}

// The tiles of a packed float call (run(b, e, bias) writes tiles [b, e) and returns false for a
// case it does not take) with the bias copied apart from y, and its adapters: the shrink on the
// m x k fp32 activations xf, the expansion after the base tiles.
template <class Run>
void packed_float_tiles(const KernelTable& t, const PackedWeight& w, const Adapters& AD, const float* xf, int64_t m,
                        const float* bias, float* y, int64_t ldy, Run run) {
  std::vector<float> bcopy;
  bias_apart_from_y(bias, w.n, y, m, ldy, bcopy);
  std::vector<float> T((size_t)(AD.active() ? m * AD.t_cols : 0));
  for (int64_t i = 0; AD.active() && i < m; ++i) AD.shrink(t, xf + i * w.k, w.k, i, T.data() + i * AD.t_cols);
  std::atomic<bool> ok{true};
  parallel_for(w.n_tiles, 1, [&](int64_t b, int64_t e) {
    if (!run(b, e, AD.active() ? nullptr : bias)) ok = false;
  });
  if (!ok) throw Error(PQK_ERR_UNSUPPORTED, "the packed float kernel does not take this case");
  if (AD.active()) {
    const LoraArgs L = AD.args(T.data(), 0, bias, w.n);
    parallel_for(w.n_tiles, 1, [&](int64_t b, int64_t e) {
      t.lora_expand(L, 0, m, b * NR, (int)(std::min<int64_t>(e * NR, w.n) - b * NR), y, ldy);
    });
  }
}

// compute="float" on a packed weight through the bf16 kernel (gemv_bf16). fill(xp, ps) writes
// nparts bf16 parts of the m x k activations (part p of row i at xp + p * ps + i * k) and
// returns null, or why the kernel cannot take them. Throws UNSUPPORTED when the kernel does not
// take the case: callers then go the fp32 way.
template <class Fill>
void packed_float_bf16(const KernelTable& t, const PackedWeight& w, int64_t m, const float* bias, float* y,
                       int64_t ldy, const pqk_lora* ads, int32_t n_ad, const int32_t* rows, int64_t max_m,
                       int nparts, Fill fill) {
  const Adapters AD(ads, n_ad, rows, m);  // bad adapters are ARG errors whatever the kernel takes
  if (m > max_m) throw Error(PQK_ERR_UNSUPPORTED, "too many rows for the bf16 float kernel");
  const int64_t k = w.k, ps = m * k;
  std::vector<uint16_t> xp((size_t)(nparts * ps));
  if (const char* why = fill(xp.data(), ps)) throw Error(PQK_ERR_UNSUPPORTED, why);
  std::vector<float> xf((size_t)(AD.active() ? m * k : 0), 0.0f);  // the shrink's x: the parts add up to it exactly
  for (int p = nparts - 1; AD.active() && p >= 0; --p)  // x3 + x2 first (exact), then + x1 (exact): x
    for (int64_t e = 0; e < m * k; ++e) xf[(size_t)e] += bf16_to_fp32(xp[(size_t)(p * ps + e)]);
  packed_float_tiles(t, w, AD, xf.data(), m, bias, y, ldy, [&](int64_t b, int64_t e, const float* bs) {
    for (int64_t tile = b; tile < e; ++tile)  // the same answer for every tile
      if (!t.gemv_bf16(w, tile, xp.data(), k, m, nparts, ps, y, ldy, bs)) return false;
    return true;
  });
}

// 0 < |x| < 2^-100 (bf16 denormals among them, which vdpbf16ps reads as zero). vdpbf16ps also
// flushes results below 2^-126, and a block sum of (u - o) * x can cancel down there: with every
// non-zero |x| >= 2^-100, x and so every product and sum is a multiple of 2^-107, zero or normal.
inline uint32_t bf16_too_small(uint16_t h) { return (uint32_t)((h & 0x7F80) < (27 << 7)) & (uint32_t)((h & 0x7FFF) != 0); }
// the same bound for fp32 x, before its split into bf16 parts (each a multiple of x's ulp)
inline uint32_t f32_too_small(float v) {
  const uint32_t u = f32_bits(v);
  return (uint32_t)((u & 0x7F800000u) < (27u << 23)) & (uint32_t)((u & 0x7FFFFFFFu) != 0);
}
// |x| >= 2^101, Inf or NaN: the kernel sums (u - o) * x before scaling by a, so such x could
// overflow where the scaled fp32 route does not (and Inf * 0 would become NaN)
inline uint32_t bf16_too_large(uint16_t h) { return (uint32_t)(((h >> 7) & 0xFF) > 127 + 100); }
inline uint32_t f32_too_large(float v) { return (uint32_t)(((f32_bits(v) >> 23) & 0xFF) > 127 + 100); }

// compute="float" on a packed weight through the fp32 kernel (gemv_f32p) for m <= 8 rows, x(i, j)
// the activation as fp32 (exact); x the bf16 kernel would refuse (f32_too_small, f32_too_large)
// is refused too: the same bound, and no scaled x below 2^-126 (gemv_f32p_shift scales by up to 2^-24).
template <class X>
void packed_float_f32p(const KernelTable& t, const PackedWeight& w, int64_t m, const float* bias, float* y,
                       int64_t ldy, const pqk_lora* ads, int32_t n_ad, const int32_t* rows, X x) {
  const Adapters AD(ads, n_ad, rows, m);  // bad adapters are ARG errors whatever the kernel takes
  if (m > 8) throw Error(PQK_ERR_UNSUPPORTED, "too many rows for the packed float kernel");
  const int64_t k = w.k;
  std::vector<float> xf((size_t)(AD.active() ? m * k : 0)), xs((size_t)(m * k));  // xf: the shrink's x
  float scale[QBLK];
  for (int kk = 0; kk < QBLK; ++kk) scale[kk] = std::ldexp(1.0f, -gemv_f32p_shift(kk));
  uint32_t bad = 0;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < k; ++j) {
      const float v = x(i, j);
      bad |= f32_too_small(v) | f32_too_large(v);
      if (AD.active()) xf[(size_t)(i * k + j)] = v;
      xs[(size_t)(i * k + j)] = v * scale[j % QBLK];  // exact: a power of two, no result below 2^-124
    }
  if (bad) throw Error(PQK_ERR_UNSUPPORTED, "x holds NaN/Inf, |x| >= 2^101 or 0 < |x| < 2^-100");
  packed_float_tiles(t, w, AD, xf.data(), m, bias, y, ldy, [&](int64_t b, int64_t e, const float* bs) {
    for (int64_t tile = b; tile < e; ++tile)
      if (!t.gemv_f32p(w, tile, xs.data(), k, m, y, ldy, bs)) return false;
    return true;
  });
}

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
    if (out) *out = nullptr;  // on every failure
    if (!params || !out || !q) throw Error(PQK_ERR_ARG, "NULL argument");
    pqk_qparams p = *params;
    pqk_row_bytes rb = row_bytes(fmt, k, p);
    if (n <= 0) throw Error(PQK_ERR_SHAPE, "n must be positive");
    check_extent(n, k, "weight");
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
  return guarded([&] { matmul_int8_impl(isa, wp, x, m, ldx, bias, y, ldy, nullptr, 0, nullptr); });
}

pqk_status pqk_matmul_int8_lora(int32_t isa, const pqk_packed* wp, const float* x, int64_t m, int64_t ldx,
                                const float* bias, float* y, int64_t ldy, const pqk_lora* ads, int32_t n_ad,
                                const int32_t* rows) {
  return guarded([&] { matmul_int8_impl(isa, wp, x, m, ldx, bias, y, ldy, ads, n_ad, rows); });
}

pqk_status pqk_matmul_float(int32_t isa, int32_t fmt, const void* q, const void* s, const void* z, int64_t n,
                            int64_t k, const pqk_qparams* params, const float* x, int64_t m, int64_t ldx,
                            const float* bias, float* y, int64_t ldy) {
  return guarded([&] {
    matmul_float_impl(isa, fmt, q, s, z, n, k, params, x, m, ldx, bias, y, ldy, nullptr, 0, nullptr);
  });
}

pqk_status pqk_matmul_float_bf16(int32_t isa, const pqk_packed* wp, const uint16_t* x, int64_t m, int64_t ldx,
                                 const float* bias, float* y, int64_t ldy, const pqk_lora* ads, int32_t n_ad,
                                 const int32_t* rows) {
  return guarded([&] {
    if (!x && m > 0) throw Error(PQK_ERR_ARG, "NULL x");
    const KernelTable& t = packed_float_table(isa, wp, m, ldx, y, ldy);
    if (m == 0) return (void)Adapters(ads, n_ad, rows, 0);  // checked for no rows too
    if (!t.gemv_bf16)  // the fp32 kernel on x widened (exact)
      return packed_float_f32p(t, wp->w, m, bias, y, ldy, ads, n_ad, rows,
                               [&](int64_t i, int64_t j) { return bf16_to_fp32(x[i * ldx + j]); });
    packed_float_bf16(t, wp->w, m, bias, y, ldy, ads, n_ad, rows, 4, 1, [&](uint16_t* xp, int64_t) -> const char* {
      const int64_t k = wp->w.k;
      uint32_t bad = 0;
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < k; ++j) {
          const uint16_t h = x[i * ldx + j];
          bad |= bf16_too_small(h) | bf16_too_large(h);
          xp[i * k + j] = h;
        }
      return bad ? "x holds 0 < |x| < 2^-100 (bf16 denormals are read as zero), NaN/Inf or |x| >= 2^101" : nullptr;
    });
  });
}

pqk_status pqk_matmul_float_packed(int32_t isa, const pqk_packed* wp, const float* x, int64_t m, int64_t ldx,
                                   const float* bias, float* y, int64_t ldy, const pqk_lora* ads, int32_t n_ad,
                                   const int32_t* rows) {
  return guarded([&] {
    if (!x && m > 0) throw Error(PQK_ERR_ARG, "NULL x");
    const KernelTable& t = packed_float_table(isa, wp, m, ldx, y, ldy);
    if (m == 0) return (void)Adapters(ads, n_ad, rows, 0);  // checked for no rows too
    if (!t.gemv_bf16)
      return packed_float_f32p(t, wp->w, m, bias, y, ldy, ads, n_ad, rows,
                               [&](int64_t i, int64_t j) { return x[i * ldx + j]; });
    packed_float_bf16(t, wp->w, m, bias, y, ldy, ads, n_ad, rows, 2, 3, [&](uint16_t* xp, int64_t ps) -> const char* {
      // x = x1 + x2 + x3 exactly: x has 24 significant bits and each bf16 part takes the next 8
      // (rounded to nearest, so every remainder is exact in fp32), each part a multiple of x's
      // fp32 ulp; 0 < |x| < 2^-100 (a part or a block sum could fall below 2^-126, see
      // bf16_too_small) or a last part not holding its remainder exactly (NaN/Inf x) refuses the case
      const int64_t k = wp->w.k;
      uint32_t bad = 0;
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < k; ++j) {
          const float v = x[i * ldx + j];
          const uint16_t h1 = fp32_to_bf16_rne(v);
          const float r1 = v - bf16_to_fp32(h1);
          const uint16_t h2 = fp32_to_bf16_rne(r1);
          const float r2 = r1 - bf16_to_fp32(h2);
          const uint16_t h3 = fp32_to_bf16_rne(r2);
          bad |= (uint32_t)(f32_bits(bf16_to_fp32(h3)) != f32_bits(r2)) | bf16_too_large(h1) | f32_too_small(v);
          xp[i * k + j] = h1;
          xp[ps + i * k + j] = h2;
          xp[2 * ps + i * k + j] = h3;
        }
      return bad ? "x holds NaN/Inf, |x| >= 2^101 (after rounding to bf16) or 0 < |x| < 2^-100" : nullptr;
    });
  });
}

pqk_status pqk_matmul_float_lora(int32_t isa, int32_t fmt, const void* q, const void* s, const void* z, int64_t n,
                                 int64_t k, const pqk_qparams* params, const float* x, int64_t m, int64_t ldx,
                                 const float* bias, float* y, int64_t ldy, const pqk_lora* ads, int32_t n_ad,
                                 const int32_t* rows) {
  return guarded([&] { matmul_float_impl(isa, fmt, q, s, z, n, k, params, x, m, ldx, bias, y, ldy, ads, n_ad, rows); });
}

}  // extern "C"

namespace pqk { namespace {

// Tiles per chunk of the int8 tile loops: a chunk's codes times its rows at least 64 KiB. Less
// work than that takes less time than waking a worker for it (a 256x256 q4_0 GEMV: 7 us on one
// thread, 10-11 on two); 4096-wide layers are unaffected (a tile's codes are 32 KiB).
int64_t min_tiles(const PackedWeight& w, int64_t rows) {
  return std::max<int64_t>(1, (int64_t)65536 / std::max<int64_t>(1, w.tile_code_bytes * rows));
}

void matmul_int8_impl(int32_t isa, const pqk_packed* wp, const float* x, int64_t m, int64_t ldx, const float* bias,
                      float* y, int64_t ldy, const pqk_lora* ads, int32_t n_ad, const int32_t* rows) {
  {
    if (!wp) throw Error(PQK_ERR_ARG, "packed weight is NULL");
    const PackedWeight& w = wp->w;
    if (m < 0) throw Error(PQK_ERR_SHAPE, "m < 0");
    const KernelTable& t = kernel_table(resolve_isa(isa));  // a bad isa is an error even for m = 0
    const Adapters AD(ads, n_ad, rows, m);                    // and bad adapters
    if (m == 0) return;
    if (!x || !y) throw Error(PQK_ERR_ARG, "NULL x/y");
    if (ldx < w.k || ldy < w.n) throw Error(PQK_ERR_SHAPE, "row stride smaller than the row");
    check_extent(m, ldx, "x");
    check_extent(m, ldy, "y");
    if (!t.quantize_act || !t.gemm_int8) throw Error(PQK_ERR_INTERNAL, "int8 matmul kernels not registered");
    check_x_finite(t, x, m, w.k, ldx, w);
    std::vector<float> xcopy;
    apart_from_y(x, ldx, m, w.k, y, ldy, w.n, xcopy);  // a later chunk, the shrink, read x
    std::vector<float> bcopy;
    bias_apart_from_y(bias, w.n, y, m, ldy, bcopy);
    for (int64_t c0 = 0; c0 < m; c0 += M_CHUNK) {
      const int64_t mc = std::min(M_CHUNK, m - c0);
      ActQ a;
      a.m = mc; a.k = w.k;
      a.xq.resize((size_t)(mc * w.k));
      a.dx.resize((size_t)(mc * (w.k / QBLK)));
      a.xs.resize((size_t)(mc * (w.k / 16)));
      a.xn.resize((size_t)(mc * (w.k / QBLK)));
      if (w.o_const != 0) a.xo.resize((size_t)(mc * (w.k / QBLK)));
      if (w.has_min) a.xm.resize((size_t)(mc * (w.k / QBLK)));
      const bool xu = t.gemm_int8_xu_rows && mc >= t.gemm_int8_xu_rows && w.nibbles && !w.lut &&
                      !(w.has_min && w.row_offset);  // the AVX2 nibble GEMM's case (int8_kernels256.h)
      if (xu) a.xu.resize((size_t)(mc * w.k));  // then that kernel does not read xp
      else if (t.gemm_int8_xp && mc > 2 && w.nibbles && !w.lut && (w.o_const != 0 || w.row_offset)) {
        a.xp.resize((size_t)(mc * (w.k / QBLK)));
        a.xp_f = w.row_offset ? 1 : w.o_const;
      }
      std::vector<float> T((size_t)(AD.active() ? mc * AD.t_cols : 0));
      const int nthreads = get_num_threads();
      const bool shrink_in_rows = mc >= nthreads;
      // Where the shrink runs (results are the same either way: one dot product per t column):
      // - decode (<= 8 rows): shared by the tile ranges, before their base tiles (SharedShrink);
      // - otherwise with each row as it is quantized (x still in cache), or for fewer rows than
      //   threads as rank-column tasks after the rows in the same region (one fork/join less).
      const bool decode = AD.active() && mc <= 8;
      const int64_t extra = AD.active() && !shrink_in_rows && !decode ? AD.tasks(mc) : 0;
      const float* xc = x + c0 * ldx;
      parallel_for(mc + extra, extra ? 1 : std::max<int64_t>(1, 16384 / w.k), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          if (i >= mc) {
            AD.shrink_task(t, xc, ldx, w.k, c0, T.data(), i - mc);
            continue;
          }
          const float* xr = xc + i * ldx;
          t.quantize_act(xr, w.k, a.xq.data() + i * w.k, a.dx.data() + i * (w.k / QBLK), a.xs.data() + i * (w.k / 16));
          a.fill_xn(i, w.o_const);
          if (AD.active() && shrink_in_rows && !decode)
            AD.shrink(t, xr, w.k, c0 + i, T.data() + i * AD.t_cols);  // x row still in cache
        }
      });
      float* yc = y + c0 * ldy;
      if (decode) {
        // Decode: the shrink shared by the tile ranges (SharedShrink), the expansion once per
        // range so B is read as one long stream (in a model A and B come from DRAM every token:
        // read in 8 KiB bursts between weight tiles they cost several times their bytes). Two
        // ranges per thread: with four the adapter cost 1-2.5 us more at 2 threads. At one
        // thread the shrink runs before the tiles: deferring it after them with A prefetched in
        // slices meanwhile cost more (rank 16, 4096x4096, 1 thread, time inside the call: bf16
        // A/B +4.0 vs +2.4 us, fp32 +8.1 vs +4.8 from L3; 8 layers from DRAM +16.3 vs +14.0 and
        // +20.3 vs +19.4 us per layer).
        SharedShrink sh{AD, t, xc, ldx, w.k, mc, c0, T.data()};
        parallel_for(w.n_tiles, min_tiles(w, mc), [&](int64_t b, int64_t e) {
          sh.claim();
          for (int64_t tile = b; tile < e; ++tile) t.gemm_int8(w, tile, a, 0, mc, yc, ldy, nullptr);
          sh.expand(bias, w.n, b * NR, (int)(std::min<int64_t>(e * NR, w.n) - b * NR), yc, ldy);
        }, 2);
        continue;
      }
      // Expansion, DoRA scale and bias on groups of 16 tiles just written (y still in L1/L2).
      const LoraArgs L = AD.args(T.data(), c0, bias, w.n);
      auto tiles = [&](int64_t b, int64_t e) {
        for (int64_t g = b; g < e; g += 16) {
          const int64_t ge = std::min(e, g + 16);
          for (int64_t tile = g; tile < ge; ++tile) t.gemm_int8(w, tile, a, 0, mc, yc, ldy, AD.active() ? nullptr : bias);
          if (AD.active())
            t.lora_expand(L, 0, mc, g * NR, (int)(std::min<int64_t>(ge * NR, w.n) - g * NR), yc, ldy);
        }
      };
      parallel_for(w.n_tiles, min_tiles(w, mc), tiles);
    }
  }
}

}}  // namespace pqk::(anon)

extern "C" {

}  // extern "C"

namespace pqk { namespace {

// compute="float" over canonical rows: for m <= FLOAT_CHUNK_MAX_M, K in chunks of FLOAT_CHUNK_K
// (or the format's parameter span if longer) so the dequantized chunk stays in L1.
constexpr int64_t FLOAT_CHUNK_MAX_M = 4, FLOAT_CHUNK_K = 512;
// from this many rows on, the panel kernel (gemm_f32_xt) where the variant has one
constexpr int64_t XT_MIN_M = 16, XT_ROWS = 512;

// elements that share one set of parameters (a chunk must not split them)
int64_t param_span(int32_t fmt, const pqk_qparams& p) {
  switch (fmt) {
    case PQK_Q4_K: case PQK_Q6_K: return 256;
    case PQK_NF4: case PQK_FP4: case PQK_INT2: case PQK_INT3: case PQK_INT4: return p.group > 0 ? p.group : 32;
    default: return 32;
  }
}

void matmul_float_impl(int32_t isa, int32_t fmt, const void* q, const void* s, const void* z, int64_t n, int64_t k,
                       const pqk_qparams* params, const float* x, int64_t m, int64_t ldx, const float* bias, float* y,
                       int64_t ldy, const pqk_lora* ads, int32_t n_ad, const int32_t* rows) {
  {
    if (!params) throw Error(PQK_ERR_ARG, "params is NULL");
    pqk_qparams p = *params;
    pqk_row_bytes rb = row_bytes(fmt, k, p);
    if (m < 0 || n < 0) throw Error(PQK_ERR_SHAPE, m < 0 ? "m < 0" : "n < 0");
    const KernelTable& t = kernel_table(resolve_isa(isa));  // a bad isa is an error even for m = 0
    const Adapters AD(ads, n_ad, rows, m);                    // and bad adapters
    if (m == 0 || n == 0) return;  // nothing to write (as quantize / dequantize with n = 0)
    if (!q || !x || !y || (rb.s && !s) || (rb.z && !z)) throw Error(PQK_ERR_ARG, "NULL buffer");
    if (ldx < k || ldy < n) throw Error(PQK_ERR_SHAPE, "row stride smaller than the row");
    check_extent(n, k, "weight");
    check_extent(m, ldx, "x");
    check_extent(m, ldy, "y");
    dequantize_row_fn deq = t.dequantize[fmt];
    if (!deq) throw Error(PQK_ERR_UNSUPPORTED, "dequantize not implemented for this format");
    if (!t.gemm_f32) throw Error(PQK_ERR_INTERNAL, "float matmul kernel not registered");
    std::vector<float> xcopy;
    apart_from_y(x, ldx, m, k, y, ldy, n, xcopy);
    std::vector<float> bcopy;
    bias_apart_from_y(bias, n, y, m, ldy, bcopy);
    std::vector<float> T((size_t)(AD.active() ? m * AD.t_cols : 0));
    const uint8_t* Q = (const uint8_t*)q; const uint8_t* S = (const uint8_t*)s; const uint8_t* Z = (const uint8_t*)z;
    // Few rows, a format the variant decodes in registers: no dequantized copy at all. One kernel
    // call per range of 16-row tiles (it prepares x once per call), the adapters' shrink shared by
    // the ranges (as in the int8 decode), their expansion once per range.
    gemv_f32_fn gemv = t.gemv_f32[fmt];
    if (gemv && m <= GEMV_F32_MAX_M && gemv(Q, S, Z, rb, 0, 0, k, p, x, ldx, m, y, ldy, nullptr)) {
      const int64_t tiles = (n + 15) / 16;
      SharedShrink sh{AD, t, x, ldx, k, m, 0, T.data()};
      parallel_for(tiles, std::max<int64_t>(1, 16384 / k), [&](int64_t b, int64_t e) {
        if (AD.active()) sh.claim();
        if (!gemv(Q, S, Z, rb, b * 16, std::min(n, e * 16), k, p, x, ldx, m, y, ldy, AD.active() ? nullptr : bias))
          throw Error(PQK_ERR_NOMEM, "out of memory in the float decode kernel");
        if (AD.active()) sh.expand(bias, n, b * 16, (int)(std::min(n, e * 16) - b * 16), y, ldy);
      });
      return;
    }
    if (AD.active()) AD.shrink_rows(t, x, ldx, k, m, 0, T.data());
    const LoraArgs L = AD.args(T.data(), 0, bias, n);
    // Rows of W in groups of FR, dequantized into a per-thread buffer, then fp32 dots.
    constexpr int FR = 8;
    const int64_t groups = (n + FR - 1) / FR;
    if (m <= FLOAT_CHUNK_MAX_M && k > FLOAT_CHUNK_K) {
      // Few rows: the dequantized weight is used m times, so writing FR whole rows (FR*k floats,
      // 128 KiB at k = 4096) and reading them back through L2 costs more than the dots. Instead
      // each group goes in K chunks that stay in L1 (FR*FLOAT_CHUNK_K floats); the chunks' dot
      // products are added in K order, one fixed sum tree whatever the thread count.
      const int64_t unit = std::max<int64_t>(FLOAT_CHUNK_K, param_span(fmt, p));
      // byte offsets of each chunk within a row (the same for every row; per-row parameters of
      // int8 and per-channel int2/3/4 stay at offset 0)
      const bool per_row_params = fmt == PQK_INT8 || p.group == -1;
      std::vector<pqk_row_bytes> off((size_t)((k + unit - 1) / unit), pqk_row_bytes{0, 0, 0});
      for (size_t c = 1; c < off.size(); ++c) {
        off[c] = row_bytes(fmt, (int64_t)c * unit, p);
        if (per_row_params) off[c].s = off[c].z = 0;
      }
      parallel_for(groups, 1, [&](int64_t g0, int64_t g1) {
        std::vector<float> wbuf((size_t)(FR * unit));
        float part[FLOAT_CHUNK_MAX_M * FR], acc[FLOAT_CHUNK_MAX_M * FR];
        for (int64_t g = g0; g < g1; ++g) {
          const int64_t r0 = g * FR;
          const int nr = (int)std::min<int64_t>(FR, n - r0);
          for (int64_t k0 = 0; k0 < k; k0 += unit) {
            const int64_t kc = std::min(unit, k - k0);
            const pqk_row_bytes& o = off[(size_t)(k0 / unit)];
            for (int r = 0; r < nr; ++r)
              deq(Q + (r0 + r) * rb.q + o.q, S ? S + (r0 + r) * rb.s + o.s : nullptr,
                  Z ? Z + (r0 + r) * rb.z + o.z : nullptr, kc, wbuf.data() + (size_t)r * kc, p);
            t.gemm_f32(wbuf.data(), nr, kc, x + k0, ldx, m, k0 ? part : acc, FR, nullptr);
            if (k0)
              for (int64_t i = 0; i < m; ++i)
                for (int r = 0; r < nr; ++r) acc[i * FR + r] += part[i * FR + r];
          }
          for (int64_t i = 0; i < m; ++i)
            for (int r = 0; r < nr; ++r)
              y[i * ldy + r0 + r] = (bias && !AD.active()) ? acc[i * FR + r] + bias[r0 + r] : acc[i * FR + r];
          if (AD.active()) t.lora_expand(L, 0, m, r0, nr, y, ldy);
        }
      });
      return;
    }
    // Many rows with a panel kernel: x transposed into panels of XT_MB rows ([k][XT_MB],
    // zero-padded), so each dequantized weight is broadcast against XT_MB activations at a time
    // instead of every weight row re-reading all of x; XT_ROWS rows per pass over the weights
    // bound the panel memory (8 MiB at k = 4096).
    const bool use_xt = t.gemm_f32_xt != nullptr && m >= XT_MIN_M;
    const int64_t rows_per_pass = use_xt ? XT_ROWS : m;
    for (int64_t c0 = 0; c0 < m; c0 += rows_per_pass) {
      const int64_t mc = std::min(rows_per_pass, m - c0);
      const float* xc = x + c0 * ldx;
      float* yc = y + c0 * ldy;
      constexpr int64_t TK = 256;  // k per transposition task
      const int64_t npan = use_xt ? (mc + XT_MB - 1) / XT_MB : 0, kch = (k + TK - 1) / TK;
      ByteBuffer xtb;
      if (use_xt) xtb.assign_zero((size_t)(npan * k * XT_MB) * sizeof(float));
      float* xt = (float*)xtb.data();
      if (use_xt)
        parallel_for(npan * kch, 1, [&](int64_t b, int64_t e) {
          for (int64_t c = b; c < e; ++c) {
            const int64_t pi = c / kch, k0 = c % kch * TK, k1 = std::min(k, k0 + TK);
            float* dst = xt + pi * k * XT_MB;
            const int64_t i0 = pi * XT_MB, rows = std::min<int64_t>(XT_MB, mc - i0);
            for (int64_t j = k0; j < k1; ++j)
              for (int64_t i = 0; i < rows; ++i) dst[j * XT_MB + i] = xc[(i0 + i) * ldx + j];
          }
        });
      parallel_for(groups, 1, [&](int64_t g0, int64_t g1) {
        std::vector<float> wbuf((size_t)(FR * k));
        for (int64_t g = g0; g < g1; ++g) {
          const int64_t r0 = g * FR;
          const int nr = (int)std::min<int64_t>(FR, n - r0);
          for (int r = 0; r < nr; ++r)
            deq(Q + (r0 + r) * rb.q, S ? S + (r0 + r) * rb.s : nullptr, Z ? Z + (r0 + r) * rb.z : nullptr, k,
                wbuf.data() + (size_t)r * k, p);
          const float* bg = (bias && !AD.active()) ? bias + r0 : nullptr;
          if (use_xt) {
            for (int64_t pi = 0; pi < npan; ++pi)
              t.gemm_f32_xt(wbuf.data(), nr, k, xt + pi * k * XT_MB, (int)std::min<int64_t>(XT_MB, mc - pi * XT_MB),
                            yc + pi * XT_MB * ldy + r0, ldy, bg);
          } else {
            t.gemm_f32(wbuf.data(), nr, k, xc, ldx, mc, yc + r0, ldy, bg);
          }
          if (AD.active()) t.lora_expand(L, c0, c0 + mc, r0, nr, y, ldy);
        }
      });
    }
  }
}

}}  // namespace pqk::(anon)

extern "C" {

}  // extern "C"
