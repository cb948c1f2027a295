// Builds one kernel table per compiled variant, once, and picks the active one.
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

#include "capi_util.h"
#include "cpu_features.h"
#include "kernel_table.h"

namespace pqk {

bool isa_compiled(int isa) {
  switch (isa) {
    case PQK_ISA_REF: return true;
#ifdef PQK_HAVE_AVX2
    case PQK_ISA_AVX2: return true;
#endif
#ifdef PQK_HAVE_AVX512
    case PQK_ISA_AVX512: return true;
#endif
#ifdef PQK_HAVE_AVX512VNNI
    case PQK_ISA_AVX512VNNI: return true;
#endif
#ifdef PQK_HAVE_AVXVNNI
    case PQK_ISA_AVXVNNI: return true;
#endif
#ifdef PQK_HAVE_NEON
    case PQK_ISA_NEON: return true;
#endif
#ifdef PQK_HAVE_DOTPROD
    case PQK_ISA_DOTPROD: return true;
#endif
    default: return false;
  }
}

static bool cpu_can_run(int isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case PQK_ISA_REF: return true;
    case PQK_ISA_AVX2: return f.avx2 && f.fma && f.f16c && f.bmi1 && f.bmi2;
    case PQK_ISA_AVX512: return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.f16c && f.fma && f.bmi1 && f.bmi2;
    case PQK_ISA_AVX512VNNI: return cpu_can_run(PQK_ISA_AVX512) && f.avx512vnni;
    case PQK_ISA_AVXVNNI: return cpu_can_run(PQK_ISA_AVX2) && f.avxvnni;
    case PQK_ISA_NEON: return f.neon;
    case PQK_ISA_DOTPROD: return f.neon && f.asimddp;
    default: return false;
  }
}

bool isa_runnable(int isa) { return isa_compiled(isa) && cpu_can_run(isa); }

namespace {
struct Tables {
  KernelTable t[PQK_ISA_COUNT];
  Tables() {
    // Each variant starts as a copy of the one below it, then overlays its own kernels.
    // A slot's *_isa field records which variant really implements it.
    // A folder's register function is compiled with its ISA flags (GCC stores the table with
    // zmm registers in the AVX-512 ones), so it runs only where the CPU runs that variant; the
    // table of a variant this CPU cannot run stays a copy of the one below (never used:
    // kernel_table() is only asked for runnable variants).
    auto overlay = [](KernelTable& dst, void (*reg)(KernelTable&), int isa) {
      if (!cpu_can_run(isa)) return;
      KernelTable mine;
      reg(mine);
      if (mine.quantize_act) { dst.quantize_act = mine.quantize_act; dst.quantize_act_isa = (int8_t)isa; }
      if (mine.gemm_int8) {
        dst.gemm_int8 = mine.gemm_int8;
        dst.gemm_int8_xp = mine.gemm_int8_xp;
        dst.gemm_int8_xu_rows = mine.gemm_int8_xu_rows;
        dst.gemm_int8_isa = (int8_t)isa;
      }
      if (mine.read_sum) { dst.read_sum = mine.read_sum; dst.read_sum_isa = (int8_t)isa; }
      if (mine.all_finite) { dst.all_finite = mine.all_finite; dst.all_finite_isa = (int8_t)isa; }
      if (mine.int8_peak) {
        dst.int8_peak = mine.int8_peak;
        dst.int8_peak_ops = mine.int8_peak_ops;
        dst.int8_peak_isa = (int8_t)isa;
      }
      if (mine.fma_peak) {
        dst.fma_peak = mine.fma_peak;
        dst.fma_peak_flops = mine.fma_peak_flops;
        dst.fma_peak_isa = (int8_t)isa;
      }
      if (mine.lora_shrink) { dst.lora_shrink = mine.lora_shrink; dst.lora_shrink_isa = (int8_t)isa; }
      if (mine.lora_expand) { dst.lora_expand = mine.lora_expand; dst.lora_expand_isa = (int8_t)isa; }
      if (mine.gemm_f32) { dst.gemm_f32 = mine.gemm_f32; dst.gemm_f32_isa = (int8_t)isa; }
      if (mine.gemm_f32_xt) { dst.gemm_f32_xt = mine.gemm_f32_xt; dst.gemm_f32_xt_isa = (int8_t)isa; }
      if (mine.gemv_bf16) { dst.gemv_bf16 = mine.gemv_bf16; dst.gemv_bf16_isa = (int8_t)isa; }
      if (mine.gemv_f32p) { dst.gemv_f32p = mine.gemv_f32p; dst.gemv_f32p_isa = (int8_t)isa; }
      for (int f = 0; f < PQK_FORMAT_COUNT; ++f) {
        if (mine.quantize[f]) { dst.quantize[f] = mine.quantize[f]; dst.quantize_isa[f] = (int8_t)isa; }
        if (mine.dequantize[f]) { dst.dequantize[f] = mine.dequantize[f]; dst.dequantize_isa[f] = (int8_t)isa; }
        if (mine.gemv_f32[f]) { dst.gemv_f32[f] = mine.gemv_f32[f]; dst.gemv_f32_isa[f] = (int8_t)isa; }
      }
    };
    overlay(t[PQK_ISA_REF], ref::register_kernels, PQK_ISA_REF);
    t[PQK_ISA_AVX2] = t[PQK_ISA_REF];
#ifdef PQK_HAVE_AVX2
    overlay(t[PQK_ISA_AVX2], avx2::register_kernels, PQK_ISA_AVX2);
    overlay(t[PQK_ISA_AVX2], avx2::register_matmul_kernels, PQK_ISA_AVX2);
#endif
    t[PQK_ISA_AVX512] = t[PQK_ISA_AVX2];
    // the AVX-512 variants keep their own 16-lane fp32 decode kernels (gemv_f32) for float GEMV
    // where they have no bf16 kernel: the AVX2 packed kernel was only measured against AVX2's
    t[PQK_ISA_AVX512].gemv_f32p = nullptr;
    t[PQK_ISA_AVX512].gemv_f32p_isa = 0;
#ifdef PQK_HAVE_AVX512
    overlay(t[PQK_ISA_AVX512], avx512::register_kernels, PQK_ISA_AVX512);
    overlay(t[PQK_ISA_AVX512], avx512::register_matmul_kernels, PQK_ISA_AVX512);
#endif
    t[PQK_ISA_AVX512VNNI] = t[PQK_ISA_AVX512];
#ifdef PQK_HAVE_AVX512VNNI
    overlay(t[PQK_ISA_AVX512VNNI], avx512vnni::register_kernels, PQK_ISA_AVX512VNNI);
#endif
#ifdef PQK_HAVE_AVX512BF16
    // a slot of the VNNI variant where the CPU also has AVX512-BF16 (Zen 4, Cooper Lake, Sapphire
    // Rapids); elsewhere it stays empty and bf16 activations take the fp32 route
    if (cpu_can_run(PQK_ISA_AVX512VNNI) && cpu_features().avx512bf16)
      overlay(t[PQK_ISA_AVX512VNNI], avx512bf16::register_kernels, PQK_ISA_AVX512VNNI);
#endif
    // AVX-VNNI without AVX-512: avx2 <- avxvnni
    t[PQK_ISA_AVXVNNI] = t[PQK_ISA_AVX2];
#ifdef PQK_HAVE_AVXVNNI
    overlay(t[PQK_ISA_AVXVNNI], avxvnni::register_kernels, PQK_ISA_AVXVNNI);
#endif
    // Arm: ref <- neon <- dotprod
    t[PQK_ISA_NEON] = t[PQK_ISA_REF];
#ifdef PQK_HAVE_NEON
    overlay(t[PQK_ISA_NEON], neon::register_kernels, PQK_ISA_NEON);
#endif
    t[PQK_ISA_DOTPROD] = t[PQK_ISA_NEON];
#ifdef PQK_HAVE_DOTPROD
    overlay(t[PQK_ISA_DOTPROD], dotprod::register_kernels, PQK_ISA_DOTPROD);
#endif
  }
};
const Tables& tables() {
  static const Tables t;  // thread-safe one-time init
  return t;
}

int pick_active() {
  const char* env = std::getenv("PYQKERN_ISA");
  if (env && *env) {
    for (int i = 0; i < PQK_ISA_COUNT; ++i) {
      if (std::strcmp(env, pqk_isa_name(i)) == 0) {
        if (!isa_compiled(i))
          throw std::runtime_error(std::string("PYQKERN_ISA=") + env + ": variant not compiled into this build");
        if (!cpu_can_run(i))
          throw std::runtime_error(std::string("PYQKERN_ISA=") + env + ": this CPU/OS cannot run it (features: " +
                                   cpu_feature_string() + ")");
        return i;
      }
    }
    throw std::runtime_error(std::string("PYQKERN_ISA=") + env + ": unknown variant (ref, avx2, avx512, avx512vnni, avxvnni, neon, dotprod)");
  }
  // best first. No CPU has AVX-VNNI and AVX-512 without AVX512-VNNI, so avxvnni only competes
  // with avx512 under PYQKERN_DISABLE_FEATURES; there the AVX-512 float / quantize kernels win.
  for (int i : {PQK_ISA_AVX512VNNI, PQK_ISA_AVX512, PQK_ISA_AVXVNNI, PQK_ISA_AVX2, PQK_ISA_DOTPROD, PQK_ISA_NEON})
    if (isa_runnable(i)) return i;
  return PQK_ISA_REF;
}
}  // namespace

const KernelTable& kernel_table(int isa) { return tables().t[isa]; }

int active_isa() {
  // Not a magic static: a failed pick (bad PYQKERN_ISA) must throw on every call, not once.
  static std::once_flag once;
  static int active = -1;
  static std::string error;
  std::call_once(once, [] {
    try { active = pick_active(); } catch (const std::exception& e) { error = e.what(); }
  });
  if (active < 0) throw Error(PQK_ERR_ISA, error);  // pyqkern.h: a variant this CPU or build cannot run
  return active;
}

}  // namespace pqk
