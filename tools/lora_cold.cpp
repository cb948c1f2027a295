// Cycles of the AVX2 adapter kernels (rank-16 shrink over K = 4096, expansion over N = 4096) by
// where A and B sit when they run: hot (just used), right after streaming a buffer of the base
// weight's size (what the decode call does: the expansion follows the weight tiles), after that
// stream and a pause, and after a 64 MB stream (from DRAM, as in a model). It is the measurement
// behind #4's rank-16 overhead notes; the fused call's own figures are bench/bench_lora.py's.
//
// From the repository root:
//   g++ -O3 -ffp-contract=off -std=c++17 -mavx2 -mfma -mf16c -Icsrc/include -Icsrc tools/lora_cold.cpp csrc/kernels/x86_avx2/matmul_lora.cpp -o /tmp/lora_cold
//   /tmp/lora_cold
#include <sys/mman.h>
#include <x86intrin.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "core/kernel_table.h"

namespace pqk { namespace avx2 {
void lora_shrink(const pqk_lora& ad, int64_t r0, int64_t r1, int64_t k, const float* x, float* t);
void lora_expand(const LoraArgs& L, int64_t m0, int64_t m1, int64_t n0, int nr, float* y, int64_t ldy);
}}  // namespace pqk::avx2

using namespace pqk;

namespace {

constexpr int64_t K = 4096, N = 4096;
constexpr int R = 16;

// a huge-page buffer of int64 ones (the packed weight sits on huge pages too)
int64_t* stream_buffer(int64_t bytes) {
  auto* p = (int64_t*)aligned_alloc(2 << 20, bytes);
  madvise(p, bytes, MADV_HUGEPAGE);
  for (int64_t i = 0; i < bytes / 8; ++i) p[i] = 1;
  return p;
}

volatile int64_t g_sink;

void stream(const int64_t* p, int64_t bytes) {
  int64_t acc = 0;
  for (int64_t i = 0; i < bytes / 8; i += 8) acc += p[i];
  g_sink = g_sink + acc;
}

void pause_cycles(int n) {  // a dependent chain: no memory traffic
  double z = 1.0;
  for (int i = 0; i < n; ++i) z = z * 1.0000001 + 1e-9;
  g_sink = g_sink + (int64_t)z;
}

}  // namespace

int main() {
  const int64_t l3 = 10 << 20, dram = 64 << 20;
  const int64_t* big = stream_buffer(dram);
  std::vector<float> x(K, 0.5f), y(N, 0.0f), t(R);
  printf("cycles (median of 100; rdtsc)   shrink   expand\n");
  for (int dt = 0; dt < 3; ++dt) {
    const int es = dt == 0 ? 4 : 2;
    std::vector<uint8_t> A(R * K * es), B(N * R * es);
    for (size_t i = 0; i < A.size(); i += 2) { A[i] = (uint8_t)rand(); A[i + 1] = 0x3c; }  // small finite values
    for (size_t i = 0; i < B.size(); i += 2) { B[i] = (uint8_t)rand(); B[i + 1] = 0x3c; }
    pqk_lora ad{R, A.data(), B.data(), 0.5f, nullptr, dt};
    int64_t toff = 0;
    LoraArgs L;
    L.ad = &ad; L.n_ad = 1; L.t = t.data(); L.t_cols = R; L.n = N; L.t_off = &toff;
    const char* where[4] = {"hot", "after a 10 MB stream", "after it and a pause", "after a 64 MB stream"};
    for (int w = 0; w < 4; ++w) {
      std::vector<unsigned long long> s, e;
      for (int it = 0; it < 100; ++it) {
        auto before = [&] {
          if (w == 1 || w == 2) stream(big, l3);
          if (w == 2) pause_cycles(20000);
          if (w == 3) stream(big, dram);
        };
        before();
        unsigned long long a = __rdtsc();
        for (int r = 0; r < R; r += 4) avx2::lora_shrink(ad, r, r + 4, K, x.data(), t.data() + r);
        unsigned long long b = __rdtsc();
        before();
        unsigned long long c = __rdtsc();
        for (int64_t n0 = 0; n0 < N; n0 += 2048) avx2::lora_expand(L, 0, 1, n0, 2048, y.data(), N);
        unsigned long long d = __rdtsc();
        s.push_back(b - a);
        e.push_back(d - c);
      }
      std::sort(s.begin(), s.end());
      std::sort(e.begin(), e.end());
      printf("%-5s %-24s %8llu %8llu\n", dt == 0 ? "fp32" : dt == 1 ? "fp16" : "bf16", where[w], s[50], e[50]);
    }
  }
  return 0;
}
