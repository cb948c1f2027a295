// The read-bandwidth probe's loop (KernelTable::read_sum) with 64-byte loads: one load per cache
// line. On Zen 5 the load width decides what a core pulls from L3: a 9.4 MB buffer read at
// ~73 us with 64-byte loads, ~90 with 32-byte and ~96 with 16-byte ones (4 KB pages; from
// memory the widths differ less), so a 16-byte probe put the ceiling below what the kernels,
// which load 64 bytes at a time, reach.
#include "../avx512_gcc12_warnings.h"  // before <immintrin.h>
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "../../core/kernel_table.h"

namespace pqk { namespace avx512 {

uint64_t read_sum(const uint8_t* p, size_t n) {
  // four named accumulators (an array of them stayed on the stack), two lines per one of them
  // per 512 bytes; n is a multiple of 128, so the tail is at most three 128-byte steps
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  size_t i = 0;
  for (; i + 512 <= n; i += 512) {
    a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_loadu_si512(p + i + 64));
    a2 = _mm512_add_epi64(a2, _mm512_loadu_si512(p + i + 128));
    a3 = _mm512_add_epi64(a3, _mm512_loadu_si512(p + i + 192));
    a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(p + i + 256));
    a1 = _mm512_add_epi64(a1, _mm512_loadu_si512(p + i + 320));
    a2 = _mm512_add_epi64(a2, _mm512_loadu_si512(p + i + 384));
    a3 = _mm512_add_epi64(a3, _mm512_loadu_si512(p + i + 448));
  }
  for (; i < n; i += 128) {
    a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_loadu_si512(p + i + 64));
  }
  return (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
}

}}  // namespace pqk::avx512
