// Standalone C++ kernel test (no Python): for every variant this CPU can run, quantize /
// dequantize bytes and int8 matmul results must be bit-identical to PQK_ISA_REF, on random and
// edge data. Uses only the C ABI; each variant is reached through the isa argument.
//
//   test_kernels            all runnable variants
//   test_kernels neon ref   only these (those not runnable are reported and skipped)
//
// Prints "variants ran: a,b,c" and exits 1 on any mismatch (2 on an API error).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "pyqkern/pyqkern.h"

static int g_fail = 0, g_checks = 0, g_matmul_checks = 0;

#define CHECK_OK(call)                                                                              \
  do {                                                                                              \
    pqk_status st_ = (call);                                                                        \
    if (st_ != PQK_OK) {                                                                            \
      std::fprintf(stderr, "API error %d at %s:%d: %s\n", (int)st_, __FILE__, __LINE__, pqk_last_error()); \
      std::exit(2);                                                                                 \
    }                                                                                               \
  } while (0)

struct Case {
  int fmt;
  pqk_qparams p;
  const char* label;
};

static const int kNumRowKinds = 13;
static const char* kRowKindNames[kNumRowKinds] = {"random", "zeros", "negzeros", "ties", "subnormal", "tiny",
                                                  "outliers", "signtie", "huge", "repeats", "mixed",
                                                  "int4ties", "nf4mids"};

// One row of k floats of the given kind (all finite: the C ABI rejects NaN/Inf).
static void fill_row(float* x, int64_t k, int kind, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int> ui(-20, 20);
  for (int64_t j = 0; j < k; ++j) {
    float v = 0.0f;
    switch (kind) {
      case 0: v = nd(rng) * 0.02f; break;
      case 1: v = 0.0f; break;
      case 2: v = -0.0f; break;
      case 3: {  // exact .5 ties after scaling: block amax 127 (q8_0 d = 1), q4_0 max -8 (d = 1)
        int b = (int)(j % 32);
        if (b == 0) v = (j / 32) % 2 ? 127.0f : -8.0f;
        else v = (float)ui(rng) * 0.5f;
        if ((j / 32) % 2 == 0 && std::fabs(v) > 8.0f) v = std::fmod(v, 8.0f);
        break;
      }
      case 4: v = nd(rng) * 1e-40f; break;  // subnormal: 1/d overflows, x * inf
      case 5: v = nd(rng) * 3e-37f; break;  // d near FLT_MIN
      case 6: v = nd(rng) * 0.01f; if (j % 29 == 3) v = 1e3f; if (j % 61 == 7) v = -3e4f; break;
      case 7: v = (j % 32 == 5) ? 2.5f : ((j % 32 == 9) ? -2.5f : nd(rng) * 0.5f); if (j % 64 >= 32) v = -v; break;
      case 8: v = nd(rng) * 1e30f; break;
      case 11: {  // int4: every 16 values hold -7.5 and 7.5 (scale 1 sym and asym, zero 8), rest k/2: ties
        int b = (int)(j % 16);
        v = b == 0 ? -7.5f : (b == 1 ? 7.5f : (float)(ui(rng) % 16) * 0.5f);
        if (b >= 2 && ui(rng) < 0) v = -v;
        break;
      }
      case 12: {  // nf4: absmax 1 or 2 (exact division), the rest exactly on the fp32 midpoints
        static const float kMidCode[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f,
                                           -0.39491748809814453f, -0.28444138169288635f, -0.18477343022823334f,
                                           -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
                                           0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f,
                                           0.5626170039176941f, 0.7229568362236023f, 1.0f};
        const float scale = (j / 32) % 2 ? 2.0f : 1.0f;
        int i = (int)(j % 15);
        v = j % 32 == 0 ? scale : (kMidCode[i] + kMidCode[i + 1]) * 0.5f * scale;
        break;
      }
      case 9: v = (float)(ui(rng) % 4) * 0.25f; break;
      default: v = (j % 3 == 0) ? nd(rng) * 100.0f : nd(rng) * 1e-3f; break;
    }
    x[j] = v;
  }
}

static bool bytes_equal(const void* a, const void* b, size_t n, size_t* at) {
  const uint8_t* x = (const uint8_t*)a;
  const uint8_t* y = (const uint8_t*)b;
  for (size_t i = 0; i < n; ++i)
    if (x[i] != y[i]) { *at = i; return false; }
  return true;
}

static void report(bool ok, const char* what, const char* isa, const Case& c, int64_t n, int64_t k, size_t at,
                   const std::string& extra = "") {
  ++g_checks;
  if (ok) return;
  ++g_fail;
  if (g_fail <= 30)
    std::printf("MISMATCH %s isa=%s fmt=%s%s n=%lld k=%lld first differing byte %zu %s\n", what, isa,
                pqk_format_name(c.fmt), c.label, (long long)n, (long long)k, at, extra.c_str());
}

static void test_quant(const std::vector<int>& isas, const Case& c, int64_t k, std::mt19937& rng) {
  pqk_qparams p = c.p;
  pqk_row_bytes rb;
  if (pqk_row_bytes_of(c.fmt, k, &p, &rb) != PQK_OK) return;  // k not valid for this format
  const int64_t n = kNumRowKinds, ldx = k + 3;
  std::vector<float> x(n * ldx, 7.0f);
  for (int64_t i = 0; i < n; ++i) fill_row(&x[i * ldx], k, (int)i, rng);
  std::vector<uint8_t> q0(n * rb.q + 1), s0(n * rb.s + 1), z0(n * rb.z + 1);
  CHECK_OK(pqk_quantize(PQK_ISA_REF, c.fmt, x.data(), n, k, ldx, &p, q0.data(), s0.data(), z0.data()));
  std::vector<float> y0(n * k);
  CHECK_OK(pqk_dequantize(PQK_ISA_REF, c.fmt, q0.data(), s0.data(), z0.data(), n, k, &p, y0.data()));
  for (int isa : isas) {
    if (isa == PQK_ISA_REF) continue;
    std::vector<uint8_t> q(q0.size(), 0xAB), s(s0.size(), 0xAB), z(z0.size(), 0xAB);
    CHECK_OK(pqk_quantize(isa, c.fmt, x.data(), n, k, ldx, &p, q.data(), s.data(), z.data()));
    size_t at = 0;
    bool ok = bytes_equal(q.data(), q0.data(), n * rb.q, &at) && bytes_equal(s.data(), s0.data(), n * rb.s, &at) &&
              bytes_equal(z.data(), z0.data(), n * rb.z, &at);
    std::string row = ok ? "" : std::string("(row kind ") + kRowKindNames[(at / (rb.q ? rb.q : 1)) % n] + ")";
    report(ok, "quantize", pqk_isa_name(isa), c, n, k, at, row);
    std::vector<float> y(n * k, 1.0f);
    CHECK_OK(pqk_dequantize(isa, c.fmt, q0.data(), s0.data(), z0.data(), n, k, &p, y.data()));
    report(bytes_equal(y.data(), y0.data(), y.size() * 4, &at), "dequantize", pqk_isa_name(isa), c, n, k, at);
  }
}

static void test_matmul(const std::vector<int>& isas, const Case& c, int64_t n, int64_t k, std::mt19937& rng) {
  pqk_qparams p = c.p;
  pqk_row_bytes rb;
  if (pqk_row_bytes_of(c.fmt, k, &p, &rb) != PQK_OK) return;
  if (!pqk_int8_supported(c.fmt, k, &p)) return;
  std::vector<float> w(n * k);
  for (int64_t i = 0; i < n; ++i) fill_row(&w[i * k], k, i % 3 == 2 ? 6 : (i % 3 == 1 ? 3 : 0), rng);
  std::vector<uint8_t> q(n * rb.q + 1), s(n * rb.s + 1), z(n * rb.z + 1);
  CHECK_OK(pqk_quantize(PQK_ISA_REF, c.fmt, w.data(), n, k, k, &p, q.data(), s.data(), z.data()));
  pqk_packed* pw = nullptr;
  CHECK_OK(pqk_pack(c.fmt, q.data(), s.data(), z.data(), n, k, &p, &pw));
  std::vector<float> bias(n);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& b : bias) b = nd(rng);
  // 33 and 40 rows: past the AVX2 nibble kernels' threshold for unpacking a tile's codes first
  // (KernelTable::gemm_int8_xu_rows), with a row left over and without
  for (int64_t m : {1, 2, 3, 4, 5, 6, 7, 8, 9, 33, 40}) {
    const int64_t ldx = k + 5, ldy = n + 2;
    std::vector<float> x(m * ldx);
    static const int act_kinds[] = {0, 1, 3, 6, 7, 10, 4, 8, 9};
    for (int64_t i = 0; i < m; ++i) fill_row(&x[i * ldx], k, act_kinds[(i + m - 1) % 9], rng);  // m = 1: random, not zeros
    const float* bp = (m % 2) ? bias.data() : nullptr;
    // 16 floats past the last row: compared too, so a store beyond y shows as a mismatch
    std::vector<float> y0(m * ldy + 16, -1.0f);
    CHECK_OK(pqk_matmul_int8(PQK_ISA_REF, pw, x.data(), m, ldx, bp, y0.data(), ldy));
    for (int isa : isas) {
      if (isa == PQK_ISA_REF) continue;
      std::vector<float> y(m * ldy + 16, -1.0f);
      CHECK_OK(pqk_matmul_int8(isa, pw, x.data(), m, ldx, bp, y.data(), ldy));
      size_t at = 0;
      bool ok = bytes_equal(y.data(), y0.data(), y.size() * 4, &at);
      std::string extra = "m=" + std::to_string(m);
      if (!ok) {
        size_t e = at / 4;
        char buf[96];
        std::snprintf(buf, sizeof buf, " y[%zu,%zu] ref %.9g got %.9g", e / ldy, e % ldy, y0[e], y[e]);
        extra += buf;
      }
      report(ok, "matmul_int8", pqk_isa_name(isa), c, n, k, at, extra);
      ++g_matmul_checks;
    }
  }
  pqk_packed_free(pw);
}

// compute="float": specified to fp32 accuracy (each variant sums in its own order), so within
// 1e-5 of the largest |y| of ref's, on random data; M up to 17 reaches the panel kernels.
static void test_matmul_float(const std::vector<int>& isas, const Case& c, int64_t n, int64_t k, std::mt19937& rng) {
  pqk_qparams p = c.p;
  pqk_row_bytes rb;
  if (pqk_row_bytes_of(c.fmt, k, &p, &rb) != PQK_OK) return;
  std::vector<float> w(n * k);
  for (int64_t i = 0; i < n; ++i) fill_row(&w[i * k], k, 0, rng);
  std::vector<uint8_t> q(n * rb.q + 1), s(n * rb.s + 1), z(n * rb.z + 1);
  CHECK_OK(pqk_quantize(PQK_ISA_REF, c.fmt, w.data(), n, k, k, &p, q.data(), s.data(), z.data()));
  for (int64_t m : {1, 4, 9, 17}) {
    const int64_t ldx = k + 1, ldy = n + 3;
    std::vector<float> x(m * ldx);
    for (int64_t i = 0; i < m; ++i) fill_row(&x[i * ldx], k, 0, rng);
    std::vector<float> bias(n);
    for (auto& b : bias) b = (float)(rng() % 1000) / 250.0f - 2.0f;
    const float* bp = (m % 2) ? bias.data() : nullptr;
    std::vector<float> y0(m * ldy, 0.0f);
    CHECK_OK(pqk_matmul_float(PQK_ISA_REF, c.fmt, q.data(), s.data(), z.data(), n, k, &p, x.data(), m, ldx, bp,
                              y0.data(), ldy));
    float ymax = 0.0f;
    for (float v : y0) ymax = std::fmax(ymax, std::fabs(v));
    for (int isa : isas) {
      if (isa == PQK_ISA_REF) continue;
      std::vector<float> y(m * ldy, 0.0f);
      CHECK_OK(pqk_matmul_float(isa, c.fmt, q.data(), s.data(), z.data(), n, k, &p, x.data(), m, ldx, bp,
                                y.data(), ldy));
      size_t at = 0;
      bool ok = true;
      for (size_t e = 0; e < y.size(); ++e)
        if (!(std::fabs(y[e] - y0[e]) <= 1e-5f * ymax)) { ok = false; at = e * 4; break; }
      report(ok, "matmul_float", pqk_isa_name(isa), c, n, k, at, "m=" + std::to_string(m));
    }
  }
}

// fp32 -> fp16 bits for a value fp16 holds exactly (zero or normal): the test's B values are
static uint16_t f16_exact(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) == 0) return (uint16_t)(u >> 16);
  const int e = (int)((u >> 23) & 0xFF) - 127 + 15;
  return (uint16_t)(((u >> 16) & 0x8000u) | ((uint32_t)e << 10) | ((u & 0x7FFFFFu) >> 13));
}

// element e of an adapter array in dtype (0 fp32, 1 fp16, 2 bf16) set to f (exact in that dtype)
static void put_elem(std::vector<uint8_t>& dst, int dtype, size_t e, float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (dtype == 0) {
    std::memcpy(&dst[e * 4], &f, 4);
    return;
  }
  const uint16_t h = dtype == 1 ? f16_exact(f) : (uint16_t)(u >> 16);
  std::memcpy(&dst[e * 2], &h, 2);
}

// LoRA through the int8 matmul. The expansion is specified exactly, the shrink only to fp32
// accuracy: with each row of A one +-2^e (t[r] = +-2^e * x[j], exact in any order) every variant
// must return ref's bits; with random A within 1e-5 of ref's. B holds i / 128 (exact in fp16 and
// bf16). Ranks 1..33, fp32 / fp16 / bf16 A and B, two adapters summed, per-row ids (-1: none), a
// DoRA factor; n not a multiple of 4 or 16; column offsets from the matmul's tile ranges.
static void test_lora(const std::vector<int>& isas, int64_t n, int64_t k, std::mt19937& rng) {
  pqk_qparams p{0, 0};
  std::vector<float> w(n * k);
  for (int64_t i = 0; i < n; ++i) fill_row(&w[i * k], k, 0, rng);
  pqk_row_bytes rb;
  CHECK_OK(pqk_row_bytes_of(PQK_Q4_0, k, &p, &rb));
  std::vector<uint8_t> q(n * rb.q + 1), s(n * rb.s + 1), z(1);
  CHECK_OK(pqk_quantize(PQK_ISA_REF, PQK_Q4_0, w.data(), n, k, k, &p, q.data(), s.data(), z.data()));
  pqk_packed* pw = nullptr;
  CHECK_OK(pqk_pack(PQK_Q4_0, q.data(), s.data(), z.data(), n, k, &p, &pw));
  std::uniform_int_distribution<int> bi(-127, 127), ei(-3, 1), ji(0, (int)k - 1), sg(0, 1), idd(-1, 1);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t tiles = (n + 15) / 16;
  std::vector<float> bias(n), rs(n);
  for (int64_t i = 0; i < n; ++i) {
    bias[i] = nd(rng);
    rs[i] = 0.5f + std::fabs(nd(rng));
  }
  for (int dtype : {0, 1, 2})
    for (int rank : {1, 3, 4, 6, 16, 17, 33})
      for (int exact : {1, 0}) {
        const int ranks[2] = {rank, rank / 2 + 1};
        std::vector<std::vector<float>> A32(2), B32(2);
        std::vector<std::vector<uint8_t>> Ab(2), Bb(2);
        pqk_lora ads[2], ads32[2];  // ads32: the same values kept as fp32
        const int isz = dtype == 0 ? 4 : 2;
        for (int a = 0; a < 2; ++a) {
          const int r = ranks[a];
          A32[a].assign(r * k, 0.0f);
          for (int i = 0; i < r; ++i)
            if (exact) A32[a][i * k + ji(rng)] = (sg(rng) ? 1.0f : -1.0f) * std::ldexp(1.0f, ei(rng));
            else
              for (int64_t j = 0; j < k; ++j) A32[a][i * k + j] = (float)bi(rng) / 1024.0f;
          B32[a].assign(tiles * r * 16, 0.0f);  // [tile][rank][16], zero padded
          for (int64_t nn = 0; nn < n; ++nn)
            for (int i = 0; i < r; ++i) B32[a][(nn / 16) * r * 16 + i * 16 + nn % 16] = (float)bi(rng) / 128.0f;
          for (auto* pr : {&A32[a], &B32[a]}) {
            std::vector<uint8_t>& dst = pr == &A32[a] ? Ab[a] : Bb[a];
            dst.resize(pr->size() * isz);
            for (size_t e = 0; e < pr->size(); ++e) put_elem(dst, dtype, e, (*pr)[e]);
          }
          ads[a] = pqk_lora{r, Ab[a].data(), Bb[a].data(), 0.37f * (float)(a + 1), nullptr, dtype};
          ads32[a] = pqk_lora{r, A32[a].data(), B32[a].data(), 0.37f * (float)(a + 1), nullptr, 0};
        }
        for (int mode = 0; mode < 3; ++mode)  // 0: both summed, 1: per-row ids, 2: DoRA (one adapter)
          for (int64_t m : {1, 3, 9}) {
            const int64_t ldx = k + 3, ldy = n + 1;
            std::vector<float> x(m * ldx);
            for (int64_t i = 0; i < m; ++i) fill_row(&x[i * ldx], k, 0, rng);
            std::vector<int32_t> ids(m);
            for (auto& v : ids) v = idd(rng);
            pqk_lora dora = ads[0];
            dora.row_scale = rs.data();
            const pqk_lora* list = mode == 2 ? &dora : ads;
            const int32_t nad = mode == 2 ? 1 : 2;
            const int32_t* rows = mode == 1 ? ids.data() : nullptr;
            const float* bp = (m % 2) ? bias.data() : nullptr;
            std::vector<float> y0(m * ldy, -1.0f);
            CHECK_OK(pqk_matmul_int8_lora(PQK_ISA_REF, pw, x.data(), m, ldx, bp, y0.data(), ldy, list, nad, rows));
            float ymax = 0.0f;
            for (float v : y0) ymax = std::fmax(ymax, std::fabs(v));
            for (int isa : isas) {
              if (dtype != 0) {  // 16-bit storage of values it holds: the bits of fp32 storage (pyqkern.torch relies on it)
                pqk_lora dora32 = ads32[0];
                dora32.row_scale = rs.data();
                std::vector<float> y16(m * ldy, -1.0f), y32(m * ldy, -1.0f);
                CHECK_OK(pqk_matmul_int8_lora(isa, pw, x.data(), m, ldx, bp, y16.data(), ldy, list, nad, rows));
                CHECK_OK(pqk_matmul_int8_lora(isa, pw, x.data(), m, ldx, bp, y32.data(), ldy, mode == 2 ? &dora32 : ads32,
                                              nad, rows));
                size_t at16 = 0;
                char b16[96];
                std::snprintf(b16, sizeof b16, "dtype=%d vs fp32 storage rank=%d mode=%d m=%lld", dtype, rank, mode,
                              (long long)m);
                const Case c16{PQK_Q4_0, p, "+lora"};
                report(bytes_equal(y16.data(), y32.data(), y16.size() * 4, &at16), "matmul_int8_lora", pqk_isa_name(isa),
                       c16, n, k, at16, b16);
              }
              if (isa == PQK_ISA_REF) continue;
              std::vector<float> y(m * ldy, -1.0f);
              CHECK_OK(pqk_matmul_int8_lora(isa, pw, x.data(), m, ldx, bp, y.data(), ldy, list, nad, rows));
              size_t at = 0;
              bool ok = bytes_equal(y.data(), y0.data(), y.size() * 4, &at);
              if (!exact) {
                ok = true;
                for (size_t e = 0; e < y.size(); ++e)
                  if (!(std::fabs(y[e] - y0[e]) <= 1e-5f * ymax)) { ok = false; at = e * 4; break; }
              }
              char buf[160];
              std::snprintf(buf, sizeof buf, "dtype=%d rank=%d mode=%d m=%lld %s", dtype, rank, mode, (long long)m,
                            exact ? "exact" : "1e-5");
              const Case c{PQK_Q4_0, p, "+lora"};
              report(ok, "matmul_int8_lora", pqk_isa_name(isa), c, n, k, at, buf);
            }
          }
      }
  pqk_packed_free(pw);
}

// The shrink's scalar tail (k not a multiple of 8) is out of the int8 path's reach (K a multiple
// of 32): through the float matmul on a per-channel int4 weight, random A, within 1e-5 of ref
// (the float base is not bit-exact across variants either).
static void test_lora_float(const std::vector<int>& isas, std::mt19937& rng) {
  pqk_qparams p{-1, 0};
  std::uniform_int_distribution<int> bi(-127, 127);
  for (int64_t k : {6, 38, 100})
    for (int dtype : {0, 1, 2})
      for (int rank : {1, 5, 17}) {
        const int64_t n = 21;
        std::vector<float> w(n * k);
        for (int64_t i = 0; i < n; ++i) fill_row(&w[i * k], k, 0, rng);
        pqk_row_bytes rb;
        CHECK_OK(pqk_row_bytes_of(PQK_INT4, k, &p, &rb));
        std::vector<uint8_t> q(n * rb.q + 1), s(n * rb.s + 1), z(n * rb.z + 1);
        CHECK_OK(pqk_quantize(PQK_ISA_REF, PQK_INT4, w.data(), n, k, k, &p, q.data(), s.data(), z.data()));
        const int isz = dtype == 0 ? 4 : 2;
        std::vector<uint8_t> A(rank * k * isz), B(((n + 15) / 16) * rank * 16 * isz, 0);
        for (int64_t e = 0; e < rank * k; ++e) put_elem(A, dtype, (size_t)e, (float)bi(rng) / 128.0f);
        for (int64_t nn = 0; nn < n; ++nn)
          for (int i = 0; i < rank; ++i) put_elem(B, dtype, (size_t)((nn / 16) * rank * 16 + i * 16 + nn % 16), (float)bi(rng) / 128.0f);
        const pqk_lora ad{rank, A.data(), B.data(), 0.5f, nullptr, dtype};
        for (int64_t m : {1, 3}) {
          std::vector<float> x(m * k);
          for (int64_t i = 0; i < m; ++i) fill_row(&x[i * k], k, 0, rng);
          std::vector<float> y0(m * n);
          CHECK_OK(pqk_matmul_float_lora(PQK_ISA_REF, PQK_INT4, q.data(), s.data(), z.data(), n, k, &p, x.data(), m,
                                         k, nullptr, y0.data(), n, &ad, 1, nullptr));
          float ymax = 0.0f;
          for (float v : y0) ymax = std::fmax(ymax, std::fabs(v));
          for (int isa : isas) {
            if (isa == PQK_ISA_REF) continue;
            std::vector<float> y(m * n);
            CHECK_OK(pqk_matmul_float_lora(isa, PQK_INT4, q.data(), s.data(), z.data(), n, k, &p, x.data(), m, k,
                                           nullptr, y.data(), n, &ad, 1, nullptr));
            size_t at = 0;
            bool ok = true;
            for (size_t e = 0; e < y.size(); ++e)
              if (!(std::fabs(y[e] - y0[e]) <= 1e-5f * ymax)) { ok = false; at = e * 4; break; }
            char buf[96];
            std::snprintf(buf, sizeof buf, "float dtype=%d rank=%d m=%lld", dtype, rank, (long long)m);
            const Case c{PQK_INT4, p, "(perchan)+lora"};
            report(ok, "matmul_float_lora", pqk_isa_name(isa), c, n, k, at, buf);
          }
        }
      }
}

// The ref quantizer's bytes for fixed inputs, hashed per case, printed as "digest <case> <hex>":
// tests/test_arm_qemu.py compares the lines of the Arm and the native run (the same input must
// give the same bytes on every architecture). Inputs come from integer bits only (std::
// distributions and libm may differ between the two builds): signed values over 2^-30..2^30,
// and rows of zeros, halves, tiny (1e-40), large (1e7, past fp16 scales) and huge (1e20, whose
// squares overflow) values.
static void print_digests(const Case* cases, size_t ncases) {
  const int64_t k = 256, n = 8;
  for (size_t ci = 0; ci < ncases; ++ci) {
    const Case& c = cases[ci];
    pqk_qparams p = c.p;
    pqk_row_bytes rb;
    if (pqk_row_bytes_of(c.fmt, k, &p, &rb) != PQK_OK) continue;
    std::vector<float> x((size_t)(n * k));
    uint64_t st = 0x9E3779B97F4A7C15ull + ci;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < k; ++j) {
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        const uint32_t u = (uint32_t)(st >> 32);
        const uint32_t bits = (u & 0x80000000u) | ((97u + (u >> 8) % 61u) << 23) | (u & 0x7FFFFFu);
        float v;
        std::memcpy(&v, &bits, 4);
        const float alt = (j % 2) ? -0.5f : 1.0f;
        switch (r) {
          case 1: v = 0.0f; break;
          case 2: v = (float)((int)(u % 33) - 16) * 0.5f; break;
          case 3: v = alt * 1e-40f; break;
          case 4: v = alt * 1e7f; break;
          case 5: v = alt * 1e20f; break;
          case 6: if (j % 7) v *= 1e-20f; break;
          default: break;
        }
        x[(size_t)(r * k + j)] = v;
      }
    std::vector<uint8_t> q((size_t)(n * rb.q)), sc((size_t)(n * rb.s + 1)), z((size_t)(n * rb.z + 1));
    CHECK_OK(pqk_quantize(PQK_ISA_REF, c.fmt, x.data(), n, k, k, &p, q.data(), rb.s ? sc.data() : nullptr,
                          rb.z ? z.data() : nullptr));
    uint64_t h = 1469598103934665603ull;  // FNV-1a over q, s, z
    auto mix = [&](const std::vector<uint8_t>& b, size_t len) {
      for (size_t i = 0; i < len; ++i) h = (h ^ b[i]) * 1099511628211ull;
    };
    mix(q, q.size());
    mix(sc, (size_t)(n * rb.s));
    mix(z, (size_t)(n * rb.z));
    std::printf("digest %s%s %016llx\n", pqk_format_name(c.fmt), c.label, (unsigned long long)h);
  }
}

int main(int argc, char** argv) {
  std::vector<int> isas;
  std::string ran;
  pqk_set_num_threads(2);
  std::printf("cpu: '%s' features: %s\n", pqk_cpu_brand(), pqk_cpu_features());
  for (int i = 0; i < PQK_ISA_COUNT; ++i) {
    bool wanted = argc < 2;
    for (int a = 1; a < argc; ++a) wanted |= std::strcmp(argv[a], pqk_isa_name(i)) == 0;
    if (!wanted) continue;
    if (!pqk_isa_runnable(i)) {
      std::printf("variant %s: %s\n", pqk_isa_name(i), pqk_isa_compiled(i) ? "compiled, not runnable here" : "not compiled");
      continue;
    }
    isas.push_back(i);
    ran += (ran.empty() ? "" : ",") + std::string(pqk_isa_name(i));
  }
  if (isas.empty() || isas[0] != PQK_ISA_REF) isas.insert(isas.begin(), PQK_ISA_REF);
  for (int isa : isas)  // which variant really implements a few slots in each table
    std::printf("table %s: quantize q8_0 <- %s, quantize q4_0 <- %s, dequantize q8_0 <- %s, gemm_int8 <- %s, "
                "quantize/dequantize nf4 <- %s/%s, quantize/dequantize int4 <- %s/%s, lora shrink/expand <- %s/%s, gemm_f32 <- %s, quantize_act <- %s\n",
                pqk_isa_name(isa), pqk_isa_name(pqk_slot_variant(isa, "quantize", PQK_Q8_0)),
                pqk_isa_name(pqk_slot_variant(isa, "quantize", PQK_Q4_0)),
                pqk_isa_name(pqk_slot_variant(isa, "dequantize", PQK_Q8_0)),
                pqk_isa_name(pqk_slot_variant(isa, "gemm_int8", 0)),
                pqk_isa_name(pqk_slot_variant(isa, "quantize", PQK_NF4)),
                pqk_isa_name(pqk_slot_variant(isa, "dequantize", PQK_NF4)),
                pqk_isa_name(pqk_slot_variant(isa, "quantize", PQK_INT4)),
                pqk_isa_name(pqk_slot_variant(isa, "dequantize", PQK_INT4)),
                pqk_isa_name(pqk_slot_variant(isa, "lora_shrink", 0)),
                pqk_isa_name(pqk_slot_variant(isa, "lora_expand", 0)),
                pqk_isa_name(pqk_slot_variant(isa, "gemm_f32", 0)),
                pqk_isa_name(pqk_slot_variant(isa, "quantize_act", 0)));
  std::mt19937 rng(1234);
  const Case cases[] = {
      {PQK_Q8_0, {0, 0}, ""},          {PQK_Q4_0, {0, 0}, ""},          {PQK_Q4_1, {0, 0}, ""},
      {PQK_IQ4_NL, {0, 0}, ""},        {PQK_Q4_K, {0, 0}, ""},          {PQK_Q6_K, {0, 0}, ""},
      {PQK_NF4, {0, 0}, ""},           {PQK_NF4, {32, 0}, "(g32)"},     {PQK_INT4, {0, 0}, ""},
      {PQK_INT4, {32, 0}, "(g32)"},    {PQK_INT4, {32, 1}, "(g32,sym)"}, {PQK_INT4, {-1, 0}, "(perchan)"},
      {PQK_INT8, {0, 0}, ""},
  };
  const int64_t ks[] = {32, 64, 96, 128, 160, 256, 512};
  for (const Case& c : cases)
    for (int64_t k : ks) test_quant(isas, c, k, rng);
  // nf4 / int4 block and group sizes not covered above (and per-channel K not a multiple of 32)
  const Case extra[] = {
      {PQK_NF4, {128, 0}, "(g128)"},   {PQK_NF4, {256, 0}, "(g256)"},   {PQK_NF4, {1024, 0}, "(g1024)"},
      {PQK_NF4, {4096, 0}, "(g4096)"}, {PQK_INT4, {16, 0}, "(g16)"},    {PQK_INT4, {16, 1}, "(g16,sym)"},
      {PQK_INT4, {64, 0}, "(g64)"},    {PQK_INT4, {64, 1}, "(g64,sym)"}, {PQK_INT4, {128, 1}, "(g128,sym)"},
      {PQK_INT4, {256, 0}, "(g256)"},  {PQK_INT4, {-1, 1}, "(perchan,sym)"}, {PQK_INT4, {-1, 0}, "(perchan)"},
  };
  const int64_t extra_ks[] = {2, 6, 16, 38, 48, 100, 1024, 4096, 8192 + 34};
  for (const Case& c : extra)
    for (int64_t k : extra_ks) test_quant(isas, c, k, rng);
  // 531: 34 tiles, at 2 threads 8 tile ranges of 4-5
  const int64_t ns[] = {1, 5, 16, 17, 35, 531};
  const int64_t mks[] = {32, 64, 96, 256};
  for (const Case& c : cases)
    for (int64_t n : ns)
      for (int64_t k : mks) test_matmul(isas, c, n, k, rng);
  // the group / symmetric cases over several tile ranges: the partial tile at the end of a range
  // of 4 (63) or closing the last group of 16 (571 at 1 thread)
  for (const Case& c : extra)
    for (int64_t n : {63, 571}) test_matmul(isas, c, n, 256, rng);
  pqk_set_num_threads(1);
  for (const Case& c : extra) test_matmul(isas, c, 571, 256, rng);
  // K of 513 blocks: the AVX2 nibble GEMM unpacks a tile's codes 512 blocks at a time
  for (const Case& c : {cases[1], cases[2], cases[4], cases[9], cases[10], extra[8]})
    test_matmul(isas, c, 17, 513 * 32, rng);
  pqk_set_num_threads(2);
  for (const Case& c : cases)
    for (int64_t n : {5, 17})
      for (int64_t k : {32, 256}) test_matmul_float(isas, c, n, k, rng);
  for (const Case& c : extra)
    for (int64_t k : {6, 38}) test_matmul_float(isas, c, 9, k, rng);
  for (int64_t n : {5, 37, 70})
    for (int64_t k : {32, 96}) test_lora(isas, n, k, rng);
  test_lora_float(isas, rng);
  // the read probe's loop (the widest loads this CPU has; Arm: the 16-byte baseline) reads every
  // word: its checksum is the buffer's sum, at sizes with each tail of the 512-byte step
  for (int64_t nbytes : {4096, 4096 + 128, 4096 + 384, 65536 + 256})
    for (int th : {1, 2}) {
      pqk_set_num_threads(th);
      std::vector<uint64_t> buf((size_t)nbytes / 8);
      uint64_t want = 0;
      for (auto& w : buf) want += (w = ((uint64_t)rng() << 32) ^ rng());
      double secs = 0;
      uint64_t sum = 0;
      CHECK_OK(pqk_read_probe(buf.data(), nbytes, 3, &secs, &sum));
      ++g_checks;
      if (sum != want || !(secs > 0)) {
        ++g_fail;
        std::printf("MISMATCH read_probe nbytes=%lld threads=%d\n", (long long)nbytes, th);
      }
    }
  // the float compute ceiling's probe: a positive rate for every variant that runs but ref
  // (Arm: neon's fmla, which dotprod inherits), UNSUPPORTED for ref
  for (int isa : isas) {
    double gflops = 0;
    const pqk_status st = pqk_fma_peak(isa, 1, &gflops);
    ++g_checks;
    if (isa == PQK_ISA_REF ? st != PQK_ERR_UNSUPPORTED : (st != PQK_OK || !(gflops > 0))) {
      ++g_fail;
      std::printf("MISMATCH fma_peak %s: status %d, %g GFLOP/s\n", pqk_isa_name(isa), (int)st, gflops);
    }
  }
  pqk_set_num_threads(2);
  print_digests(cases, sizeof(cases) / sizeof(cases[0]));
  print_digests(extra, sizeof(extra) / sizeof(extra[0]));
  int32_t active = -1;
  CHECK_OK(pqk_active_isa(&active));
  std::printf("active variant: %s\n", pqk_isa_name(active));
  std::printf("variants ran: %s\n", ran.c_str());
  std::printf("%d checks (%d int8 matmul), %d mismatches\n", g_checks, g_matmul_checks, g_fail);
  return g_fail ? 1 : 0;
}
