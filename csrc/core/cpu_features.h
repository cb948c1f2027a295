#pragma once
#include <string>

namespace pqk {

struct CpuFeatures {
  bool sse42 = false, avx = false, fma = false, f16c = false, avx2 = false, bmi1 = false, bmi2 = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512bf16 = false, avxvnni = false;
  bool os_avx = false, os_avx512 = false;  // XGETBV says the OS saves the register state
  bool neon = false, asimddp = false, i8mm = false;  // AArch64, from the kernel's hwcaps
  std::string vendor, brand;
};

const CpuFeatures& cpu_features();  // detected once, thread-safe
std::string cpu_feature_string();

}  // namespace pqk
