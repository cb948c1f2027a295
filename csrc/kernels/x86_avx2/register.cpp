#include "../../core/kernel_table.h"

namespace pqk { namespace avx2 {

void register_kernels(KernelTable& t) {
  (void)t;
}

}}  // namespace pqk::avx2
