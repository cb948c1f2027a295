#pragma once
#include "packed.h"
#include "pyqkern/pyqkern.h"

namespace pqk {
// Canonical sections (q, s, z rows as in pyqkern.h) -> packed tiles. Throws Error on bad args.
void pack_weight(int fmt, const uint8_t* q, const uint8_t* s, const uint8_t* z, int64_t n, int64_t k,
                 const pqk_qparams& p, PackedWeight& out);
// Packed -> int4/ggml canonical rows is not needed: QLinear keeps the canonical bytes it was
// given (zero-copy view) so export is exact.
bool int8_compute_supported(int fmt, int64_t k, const pqk_qparams& p);
}  // namespace pqk
