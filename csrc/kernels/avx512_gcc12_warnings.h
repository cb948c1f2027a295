// Include first in every AVX-512 translation unit, before <immintrin.h>.
//
// GCC 12's AVX-512 headers self-initialise placeholder vectors (`__m512 __Y = __Y;`), which
// -Wall reports as uninitialised at every inlined use (GCC bug 105593, fixed in GCC 13). The
// diagnostic is issued against the header's own lines, so the pragma must be in force before
// the header is read; placed after it (as simd512.h once did) it silences nothing.
#pragma once
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
