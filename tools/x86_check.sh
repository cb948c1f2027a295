#!/usr/bin/env bash
# Builds tests/cpp/test_kernels.cpp natively against the built libpyqkern.so (C ABI only) and
# runs it: every runnable variant (reached through the isa argument) against ref.
#   tools/x86_check.sh [path/to/dir/with/libpyqkern.so]   (default: pyqkern/)
set -euo pipefail
cd "$(dirname "$0")/.."
LIBDIR=$(cd "${1:-pyqkern}" && pwd)
BUILD=${PQK_X86_BUILD:-build/x86check}
mkdir -p "$BUILD"
${CXX:-g++} -O2 -std=c++17 -Wall tests/cpp/test_kernels.cpp -Icsrc/include -L"$LIBDIR" -lpyqkern \
  -Wl,-rpath,"$LIBDIR" -o "$BUILD/test_kernels"
"$BUILD/test_kernels"
