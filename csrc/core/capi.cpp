// The C ABI (pyqkern.h): argument checks, row layout, the row-parallel drivers.
#include <atomic>
#include <climits>
#include <cstring>
#include <string>

#include "capi_util.h"
#include "cpu_features.h"
#include "kernel_table.h"
#include "threadpool.h"
#include "../kernels/common.h"

namespace pqk {

static thread_local std::string t_last_error;
void set_last_error(const std::string& msg) { t_last_error = msg; }

static const char* const kFormatNames[PQK_FORMAT_COUNT] = {"q4_0", "q4_1", "q8_0", "q4_k", "q6_k",
                                                           "iq4_nl", "nf4", "int4", "int8", "int2", "int3",
                                                           "fp4"};
static const char* const kIsaNames[PQK_ISA_COUNT] = {"ref", "avx2", "avx512", "avx512vnni", "neon", "dotprod", "avxvnni"};

static bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

pqk_row_bytes row_bytes(int fmt, int64_t k, pqk_qparams& p) {
  if (fmt < 0 || fmt >= PQK_FORMAT_COUNT) throw Error(PQK_ERR_ARG, "unknown format id " + std::to_string(fmt));
  if (k <= 0) throw Error(PQK_ERR_SHAPE, "k must be positive, got " + std::to_string(k));
  if (k > kMaxDim) throw Error(PQK_ERR_SHAPE, "k = " + std::to_string(k) + " is beyond the size limit 2^40");
  const std::string name = kFormatNames[fmt];
  auto need_multiple = [&](int64_t b) {
    if (k % b != 0)
      throw Error(PQK_ERR_SHAPE, name + ": K=" + std::to_string(k) + " is not a multiple of the block size " +
                                     std::to_string(b));
  };
  pqk_row_bytes r{0, 0, 0};
  switch (fmt) {
    case PQK_Q4_0: need_multiple(32); r.q = k / 32 * Q4_0_BYTES; break;
    case PQK_Q4_1: need_multiple(32); r.q = k / 32 * Q4_1_BYTES; break;
    case PQK_Q8_0: need_multiple(32); r.q = k / 32 * Q8_0_BYTES; break;
    case PQK_IQ4_NL: need_multiple(32); r.q = k / 32 * IQ4NL_BYTES; break;
    case PQK_Q4_K: need_multiple(256); r.q = k / 256 * Q4_K_BYTES; break;
    case PQK_Q6_K: need_multiple(256); r.q = k / 256 * Q6_K_BYTES; break;
    case PQK_NF4: case PQK_FP4: {
      if (p.group == 0) p.group = 64;
      if (!is_pow2(p.group) || p.group < 32 || p.group > 4096)
        throw Error(PQK_ERR_ARG, name + ": block size must be a power of two in [32, 4096], got " +
                                     std::to_string(p.group));
      need_multiple(p.group);
      r.q = k / 2;
      r.s = k / p.group * 4;
      break;
    }
    case PQK_INT2: case PQK_INT3: case PQK_INT4: {
      const int bits = fmt == PQK_INT2 ? 2 : (fmt == PQK_INT3 ? 3 : 4);
      const int64_t per_byte_unit = bits == 3 ? 8 : 8 / bits;  // codes that fill whole bytes
      if (p.group == 0) p.group = 128;
      if (p.group == -1) {
        need_multiple(per_byte_unit);
      } else {
        if (!is_pow2(p.group) || p.group < 16)
          throw Error(PQK_ERR_ARG, name + ": group size must be a power of two >= 16 or -1 (per-channel), got " +
                                       std::to_string(p.group));
        need_multiple(p.group);
      }
      if (p.sym != 0 && p.sym != 1) throw Error(PQK_ERR_ARG, name + ": sym must be 0 or 1");
      int64_t groups = p.group == -1 ? 1 : k / p.group;
      r.q = k * bits / 8;
      r.s = groups * 2;
      r.z = p.sym ? 0 : groups;
      break;
    }
    case PQK_INT8: r.q = k; r.s = 4; break;
  }
  return r;
}

int resolve_isa(int32_t isa) {
  if (isa == PQK_ISA_ACTIVE) return active_isa();
  if (isa < 0 || isa >= PQK_ISA_COUNT) throw Error(PQK_ERR_ARG, "unknown ISA id " + std::to_string(isa));
  if (!isa_compiled(isa)) throw Error(PQK_ERR_ISA, std::string("variant '") + kIsaNames[isa] + "' is not compiled in");
  if (!isa_runnable(isa))
    throw Error(PQK_ERR_ISA, std::string("variant '") + kIsaNames[isa] + "' cannot run on this CPU (features: " +
                                 cpu_feature_string() + ")");
  return isa;
}

// rows per parallel task: aim for >= ~32K elements per task
static int64_t min_rows(int64_t k) { return k >= 32768 ? 1 : 32768 / k; }

}  // namespace pqk

using namespace pqk;

extern "C" {

int32_t pqk_abi_version(void) { return PQK_ABI_VERSION; }
const char* pqk_last_error(void) { return t_last_error.c_str(); }

// "" for a bad id, as the header promises for string queries (a review: NULL, which printf("%s")
// in a C caller dereferences)
const char* pqk_format_name(int32_t fmt) { return (fmt >= 0 && fmt < PQK_FORMAT_COUNT) ? kFormatNames[fmt] : ""; }
const char* pqk_isa_name(int32_t isa) { return (isa >= 0 && isa < PQK_ISA_COUNT) ? kIsaNames[isa] : ""; }

int32_t pqk_isa_compiled(int32_t isa) { return isa_compiled(isa) ? 1 : 0; }

const char* pqk_cpu_brand(void) { return cpu_features().brand.c_str(); }

int32_t pqk_slot_variant(int32_t isa, const char* slot, int32_t fmt) {
  if (isa == PQK_ISA_ACTIVE) {
    try { isa = active_isa(); } catch (...) { return -1; }  // a bad PYQKERN_ISA
  }
  if (!slot || !isa_runnable(isa)) return -1;
  const KernelTable& t = kernel_table(isa);
  const std::string s = slot;
  const bool fmt_ok = fmt >= 0 && fmt < PQK_FORMAT_COUNT;
  if (s == "quantize") return fmt_ok && t.quantize[fmt] ? t.quantize_isa[fmt] : -1;
  if (s == "dequantize") return fmt_ok && t.dequantize[fmt] ? t.dequantize_isa[fmt] : -1;
  if (s == "gemv_f32") return fmt_ok && t.gemv_f32[fmt] ? t.gemv_f32_isa[fmt] : -1;
  if (s == "quantize_act") return t.quantize_act ? t.quantize_act_isa : -1;
  if (s == "gemm_int8") return t.gemm_int8 ? t.gemm_int8_isa : -1;
  if (s == "gemm_f32") return t.gemm_f32 ? t.gemm_f32_isa : -1;
  if (s == "gemm_f32_xt") return t.gemm_f32_xt ? t.gemm_f32_xt_isa : -1;
  if (s == "lora_shrink") return t.lora_shrink ? t.lora_shrink_isa : -1;
  if (s == "lora_expand") return t.lora_expand ? t.lora_expand_isa : -1;
  if (s == "all_finite") return t.all_finite ? t.all_finite_isa : -1;
  if (s == "int8_peak") return t.int8_peak ? t.int8_peak_isa : -1;
  if (s == "fma_peak") return t.fma_peak ? t.fma_peak_isa : -1;
  if (s == "gemv_bf16") return t.gemv_bf16 ? t.gemv_bf16_isa : -1;
  if (s == "gemv_f32p") return t.gemv_f32p ? t.gemv_f32p_isa : -1;
  return -1;
}

int32_t pqk_isa_runnable(int32_t isa) { return (isa >= 0 && isa < PQK_ISA_COUNT && isa_runnable(isa)) ? 1 : 0; }

pqk_status pqk_active_isa(int32_t* isa) {
  return guarded([&] {
    if (!isa) throw Error(PQK_ERR_ARG, "isa is NULL");
    *isa = active_isa();
  });
}

const char* pqk_cpu_features(void) {
  static const std::string s = cpu_feature_string();
  return s.c_str();
}

pqk_status pqk_set_num_threads(int32_t n) {
  return guarded([&] { set_num_threads(n); });
}
int32_t pqk_get_num_threads(void) { return get_num_threads(); }

pqk_status pqk_row_bytes_of(int32_t fmt, int64_t k, pqk_qparams* params, pqk_row_bytes* out) {
  return guarded([&] {
    if (!params || !out) throw Error(PQK_ERR_ARG, "params/out is NULL");
    pqk_qparams p = *params;  // written back (defaults resolved) only on success
    *out = row_bytes(fmt, k, p);
    *params = p;
  });
}

pqk_status pqk_quantize(int32_t isa, int32_t fmt, const float* x, int64_t n, int64_t k, int64_t ldx,
                        const pqk_qparams* params, void* q, void* s, void* z) {
  return guarded([&] {
    if (!params) throw Error(PQK_ERR_ARG, "params is NULL");
    pqk_qparams p = *params;
    pqk_row_bytes rb = row_bytes(fmt, k, p);
    if (n < 0) throw Error(PQK_ERR_SHAPE, "n must be >= 0");
    const KernelTable& t = kernel_table(resolve_isa(isa));  // a bad isa is an error even for n = 0
    if (n == 0) return;
    if (ldx < k) throw Error(PQK_ERR_SHAPE, "ldx < k");
    check_extent(n, ldx, "x");
    if (!x || !q || (rb.s && !s) || (rb.z && !z)) throw Error(PQK_ERR_ARG, "NULL buffer");
    quantize_row_fn fn = t.quantize[fmt];
    if (!fn) throw Error(PQK_ERR_UNSUPPORTED, std::string(kFormatNames[fmt]) + ": quantize not implemented");
    // NaN/Inf anywhere is an error (quantized formats cannot carry it). Checked per row
    // inside the parallel loop; partial output is discarded by the caller on error.
    std::atomic<int64_t> bad_row{INT64_MAX};
    uint8_t* Q = (uint8_t*)q; uint8_t* S = (uint8_t*)s; uint8_t* Z = (uint8_t*)z;
    parallel_for(n, min_rows(k), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        if (!t.all_finite(x + i * ldx, k, 255)) {
          record_lowest(bad_row, i);
          return;
        }
        fn(x + i * ldx, k, Q + i * rb.q, S ? S + i * rb.s : nullptr, Z ? Z + i * rb.z : nullptr, p);
      }
    });
    if (bad_row.load() != INT64_MAX)
      throw Error(PQK_ERR_NONFINITE, std::string(kFormatNames[fmt]) + ": weights contain NaN or Inf (row " +
                                         std::to_string(bad_row.load()) + ")");
  });
}

pqk_status pqk_dequantize(int32_t isa, int32_t fmt, const void* q, const void* s, const void* z, int64_t n,
                          int64_t k, const pqk_qparams* params, float* y) {
  return guarded([&] {
    if (!params) throw Error(PQK_ERR_ARG, "params is NULL");
    pqk_qparams p = *params;
    pqk_row_bytes rb = row_bytes(fmt, k, p);
    if (n < 0) throw Error(PQK_ERR_SHAPE, "n must be >= 0");
    const KernelTable& t = kernel_table(resolve_isa(isa));  // a bad isa is an error even for n = 0
    if (n == 0) return;
    check_extent(n, k, "y");
    if (!y || !q || (rb.s && !s) || (rb.z && !z)) throw Error(PQK_ERR_ARG, "NULL buffer");
    dequantize_row_fn fn = t.dequantize[fmt];
    if (!fn) throw Error(PQK_ERR_UNSUPPORTED, std::string(kFormatNames[fmt]) + ": dequantize not implemented");
    const uint8_t* Q = (const uint8_t*)q; const uint8_t* S = (const uint8_t*)s; const uint8_t* Z = (const uint8_t*)z;
    parallel_for(n, min_rows(k), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        fn(Q + i * rb.q, S ? S + i * rb.s : nullptr, Z ? Z + i * rb.z : nullptr, k, y + i * k, p);
    });
  });
}

}  // extern "C"
