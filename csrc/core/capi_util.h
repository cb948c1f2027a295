// Helpers for C ABI entry points: thread-local error message, exception -> status.
#pragma once
#include <atomic>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>

#include "pyqkern/pyqkern.h"

namespace pqk {

struct Error : std::runtime_error {
  pqk_status status;
  Error(pqk_status s, const std::string& m) : std::runtime_error(m), status(s) {}
};

void set_last_error(const std::string& msg);

template <class F>
pqk_status guarded(F&& f) {
  try {
    f();
    set_last_error("");
    return PQK_OK;
  } catch (const Error& e) {
    set_last_error(e.what());
    return e.status;
  } catch (const std::bad_alloc&) {
    set_last_error("out of memory");
    return PQK_ERR_NOMEM;
  } catch (const std::exception& e) {
    set_last_error(e.what());
    return PQK_ERR_INTERNAL;
  } catch (...) {
    set_last_error("unknown error");
    return PQK_ERR_INTERNAL;
  }
}

// Size limits of every entry point: one dimension (n, k, m, a row stride) at most 2^40 and rows x
// row length at most 2^56 elements, so every byte count and offset computed from them (at most 8
// bytes an element) fits int64. Larger values are PQK_ERR_SHAPE (they could only come from a
// corrupt header or a hostile caller: no machine holds such a buffer).
constexpr int64_t kMaxDim = int64_t(1) << 40, kMaxElems = int64_t(1) << 56;
inline void check_extent(int64_t rows, int64_t cols, const char* what) {
  if (rows > kMaxDim || cols > kMaxDim || (rows > 0 && cols > kMaxElems / rows))
    throw Error(PQK_ERR_SHAPE, std::string(what) + ": " + std::to_string(rows) + " x " + std::to_string(cols) +
                                   " is beyond the size limits (2^40 per dimension, 2^56 elements)");
}

// Resolves defaults and validates params for fmt with row length k; throws Error.
pqk_row_bytes row_bytes(int fmt, int64_t k, pqk_qparams& p);

// isa id (or PQK_ISA_ACTIVE) -> a runnable variant; throws Error.
int resolve_isa(int32_t isa);

// Lowers *lowest to i if i is smaller (lock-free; threads report bad rows, the lowest wins, so
// the error names the same row whatever the thread count).
inline void record_lowest(std::atomic<int64_t>& lowest, int64_t i) {
  int64_t cur = lowest.load();
  while (i < cur && !lowest.compare_exchange_weak(cur, i)) {}
}

}  // namespace pqk
