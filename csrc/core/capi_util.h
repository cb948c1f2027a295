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
