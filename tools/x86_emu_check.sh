#!/usr/bin/env bash
# The x86 library built once more with the AVX-512 and AVX-VNNI folders compiled for AVX2
# through SIMDe (tools/emu/avx512_on_avx2.h, CMake -DPYQKERN_EMULATE_AVX512), and
# tests/cpp/test_kernels.cpp run against it: every variant, the emulated ones included, against
# ref. For machines without those extensions (this project's CI runs on a Zen 3; QEMU 7.2 cannot
# run AVX-512 either), where the native build skips them.
#   tools/x86_emu_check.sh [--python DIR]
# --python DIR: also builds the Python module and puts an importable pyqkern package (this
# tree's .py files + the emulated libraries) in DIR, for tests/test_x86_emulated.py.
# SIMDe: $SIMDE_INCLUDE (the directory holding simde/), else the simde-py sdist from PyPI,
# unpacked once into build/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${PQK_EMU_BUILD:-build/x86emu}
SIMDE_VERSION=0.8.2
PYDIR=""
if [ "${1:-}" = "--python" ]; then PYDIR=$2; fi

mkdir -p "$(dirname "$BUILD")"
exec 9>"$BUILD.lock"
flock 9
if [ -z "${SIMDE_INCLUDE:-}" ]; then
  SIMDE_INCLUDE=$ROOT/build/simde-$SIMDE_VERSION
  if [ ! -f "$SIMDE_INCLUDE/simde/x86/avx512.h" ]; then
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary :all: "simde-py==$SIMDE_VERSION" -d "$tmp"
    tar xzf "$tmp/simde_py-$SIMDE_VERSION.tar.gz" -C "$tmp"
    mkdir -p "$SIMDE_INCLUDE"
    cp -r "$tmp/simde_py-$SIMDE_VERSION/simde_py/simde/simde" "$SIMDE_INCLUDE/"
    rm -rf "$tmp"
  fi
fi
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
if [ -f "$BUILD/CMakeCache.txt" ] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${gen[1]:-Unix Makefiles}\$" "$BUILD/CMakeCache.txt"; then
  rm -rf "$BUILD"
fi
py=(-DPYQKERN_BUILD_PYTHON=OFF)
if [ -n "$PYDIR" ]; then
  mkdir -p "$PYDIR/pyqkern"
  PYDIR=$(cd "$PYDIR" && pwd)
  py=(-DPYQKERN_BUILD_PYTHON=ON -DPython_EXECUTABLE="$(command -v python3)"
      -Dpybind11_DIR="$(python3 -c 'import pybind11; print(pybind11.get_cmake_dir())')"
      -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PYDIR/pyqkern")
fi
cmake -S "$ROOT" -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DPYQKERN_EMULATE_AVX512="$SIMDE_INCLUDE" \
  -DPYQKERN_BUILD_CPP_TESTS=ON "${py[@]}" >/dev/null
cmake --build "$BUILD" -j2
if [ -n "$PYDIR" ]; then
  (cd pyqkern && find . -name '*.py' | while read -r f; do
     mkdir -p "$PYDIR/pyqkern/$(dirname "$f")" && cp "$f" "$PYDIR/pyqkern/$f"; done)
fi
"$BUILD/pqk_test_kernels"
