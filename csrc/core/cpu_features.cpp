// CPU feature detection: CPUID for what the core has, XGETBV for what the OS enables.
// AVX/AVX-512 instructions fault if the OS does not save YMM/ZMM state, so both are needed.
#include "cpu_features.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <cpuid.h>
#define PQK_X86 1
#endif

#if defined(__aarch64__) && defined(__linux__)
// Arm: what the kernel reports in the ELF auxiliary vector (never the ID registers: reading
// them from user space traps and depends on kernel emulation).
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1UL << 1)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1UL << 13)
#endif
#endif

namespace pqk {

#ifdef PQK_X86
static void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
  __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
}
static uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((uint64_t)hi << 32) | lo;
}
#endif

// PYQKERN_DISABLE_FEATURES="avx512f,avx512vnni": treat these as absent (to test dispatch
// fallbacks on a machine that has them, or to rule out a suspect ISA in the field).
static void apply_disable_list(CpuFeatures& f) {
  const char* env = std::getenv("PYQKERN_DISABLE_FEATURES");
  if (!env) return;
  std::string list = std::string(",") + env + ",";
  auto off = [&](const char* name, bool& flag) {
    if (list.find(std::string(",") + name + ",") != std::string::npos) flag = false;
  };
  off("sse4.2", f.sse42); off("avx", f.avx); off("fma", f.fma); off("f16c", f.f16c); off("avx2", f.avx2);
  off("bmi1", f.bmi1); off("bmi2", f.bmi2); off("avxvnni", f.avxvnni); off("avx512f", f.avx512f);
  off("avx512dq", f.avx512dq); off("avx512bw", f.avx512bw); off("avx512vl", f.avx512vl);
  off("avx512vnni", f.avx512vnni); off("avx512bf16", f.avx512bf16);
  off("neon", f.neon); off("asimddp", f.asimddp); off("i8mm", f.i8mm);
}

static CpuFeatures detect() {
  CpuFeatures f;
#ifdef PQK_X86
  uint32_t r[4];
  cpuid(0, 0, r);
  uint32_t max_leaf = r[0];
  char vendor[13];
  std::memcpy(vendor, &r[1], 4); std::memcpy(vendor + 4, &r[3], 4); std::memcpy(vendor + 8, &r[2], 4);
  vendor[12] = 0;
  f.vendor = vendor;
  cpuid(1, 0, r);
  f.sse42 = r[2] & (1u << 20);
  f.fma = r[2] & (1u << 12);
  f.f16c = r[2] & (1u << 29);
  bool osxsave = r[2] & (1u << 27);
  f.avx = r[2] & (1u << 28);
  if (osxsave) {
    uint64_t xcr0 = xgetbv0();
    f.os_avx = (xcr0 & 0x6) == 0x6;         // SSE + YMM state
    f.os_avx512 = (xcr0 & 0xe6) == 0xe6;    // + opmask, ZMM_Hi256, Hi16_ZMM
  }
  if (max_leaf >= 7) {
    cpuid(7, 0, r);
    f.avx2 = r[1] & (1u << 5);
    f.bmi1 = r[1] & (1u << 3);
    f.bmi2 = r[1] & (1u << 8);
    f.avx512f = r[1] & (1u << 16);
    f.avx512dq = r[1] & (1u << 17);
    f.avx512bw = r[1] & (1u << 30);
    f.avx512vl = r[1] & (1u << 31);
    f.avx512vnni = r[2] & (1u << 11);
    cpuid(7, 1, r);
    f.avxvnni = r[0] & (1u << 4);
    f.avx512bf16 = r[0] & (1u << 5);
  }
  cpuid(0x80000000u, 0, r);
  if (r[0] >= 0x80000004u) {
    char brand[49] = {};
    for (uint32_t i = 0; i < 3; ++i) {
      cpuid(0x80000002u + i, 0, r);
      std::memcpy(brand + 16 * i, r, 16);
    }
    f.brand = brand;
    while (!f.brand.empty() && f.brand.back() == ' ') f.brand.pop_back();
  }
  // Features whose register state the OS does not save are unusable.
  if (!f.os_avx) f.avx = f.avx2 = f.fma = f.f16c = f.avxvnni = false;
  if (!f.os_avx512) f.avx512f = f.avx512bw = f.avx512vl = f.avx512dq = f.avx512vnni = f.avx512bf16 = false;
#ifdef PQK_EMULATE_AVX512
  // test build (tools/x86_emu_check.sh): the AVX-512 and AVX-VNNI folders were compiled on AVX2
  // through SIMDe, so they run wherever AVX2 does
  if (f.avx2 && f.fma && f.f16c && f.bmi2)
    f.avx512f = f.avx512bw = f.avx512vl = f.avx512dq = f.avx512vnni = f.avx512bf16 = f.avxvnni = true;
#endif
#endif
#if defined(__aarch64__) && defined(__linux__)
  const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  f.neon = (hw & HWCAP_ASIMD) != 0;
  f.asimddp = (hw & HWCAP_ASIMDDP) != 0;
  f.i8mm = (hw2 & HWCAP2_I8MM) != 0;
  f.vendor = "arm";
#elif defined(__aarch64__)
  f.neon = true;  // Advanced SIMD is mandatory in AArch64; other extensions unknown here
#endif
  apply_disable_list(f);
  return f;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();  // C++11 magic static: thread-safe, once
  return f;
}

std::string cpu_feature_string() {
  const CpuFeatures& f = cpu_features();
  std::string s;
  auto add = [&](bool b, const char* n) { if (b) { if (!s.empty()) s += ' '; s += n; } };
  add(f.sse42, "sse4.2"); add(f.avx, "avx"); add(f.fma, "fma"); add(f.f16c, "f16c");
  add(f.avx2, "avx2"); add(f.bmi1, "bmi1"); add(f.bmi2, "bmi2"); add(f.avxvnni, "avxvnni");
  add(f.avx512f, "avx512f"); add(f.avx512dq, "avx512dq"); add(f.avx512bw, "avx512bw");
  add(f.avx512vl, "avx512vl"); add(f.avx512vnni, "avx512vnni"); add(f.avx512bf16, "avx512bf16");
  add(f.neon, "neon"); add(f.asimddp, "asimddp"); add(f.i8mm, "i8mm");
  return s;
}

}  // namespace pqk
