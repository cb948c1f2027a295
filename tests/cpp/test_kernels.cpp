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
  for (int64_t m = 1; m <= 9; ++m) {
    const int64_t ldx = k + 5, ldy = n + 2;
    std::vector<float> x(m * ldx);
    static const int act_kinds[] = {0, 1, 3, 6, 7, 10, 4, 8, 9};
    for (int64_t i = 0; i < m; ++i) fill_row(&x[i * ldx], k, act_kinds[(i + m) % 9], rng);
    const float* bp = (m % 2) ? bias.data() : nullptr;
    std::vector<float> y0(m * ldy, -1.0f);
    CHECK_OK(pqk_matmul_int8(PQK_ISA_REF, pw, x.data(), m, ldx, bp, y0.data(), ldy));
    for (int isa : isas) {
      if (isa == PQK_ISA_REF) continue;
      std::vector<float> y(m * ldy, -1.0f);
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
                "quantize/dequantize nf4 <- %s/%s, quantize/dequantize int4 <- %s/%s\n",
                pqk_isa_name(isa), pqk_isa_name(pqk_slot_variant(isa, "quantize", PQK_Q8_0)),
                pqk_isa_name(pqk_slot_variant(isa, "quantize", PQK_Q4_0)),
                pqk_isa_name(pqk_slot_variant(isa, "dequantize", PQK_Q8_0)),
                pqk_isa_name(pqk_slot_variant(isa, "gemm_int8", 0)),
                pqk_isa_name(pqk_slot_variant(isa, "quantize", PQK_NF4)),
                pqk_isa_name(pqk_slot_variant(isa, "dequantize", PQK_NF4)),
                pqk_isa_name(pqk_slot_variant(isa, "quantize", PQK_INT4)),
                pqk_isa_name(pqk_slot_variant(isa, "dequantize", PQK_INT4)));
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
  const int64_t ns[] = {1, 5, 16, 17, 35};
  const int64_t mks[] = {32, 64, 96, 256};
  for (const Case& c : cases)
    for (int64_t n : ns)
      for (int64_t k : mks) test_matmul(isas, c, n, k, rng);
  int32_t active = -1;
  CHECK_OK(pqk_active_isa(&active));
  std::printf("active variant: %s\n", pqk_isa_name(active));
  std::printf("variants ran: %s\n", ran.c_str());
  std::printf("%d checks (%d int8 matmul), %d mismatches\n", g_checks, g_matmul_checks, g_fail);
  return g_fail ? 1 : 0;
}
