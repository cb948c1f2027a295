#!/usr/bin/env bash
# Cross-builds the C++ core + tests/cpp/test_kernels.cpp for aarch64 (build/arm) and runs the
# test under qemu-aarch64 with three CPU models; checks which variants ran:
#   -cpu max          (dotprod + i8mm)  -> ref,neon,dotprod
#   -cpu neoverse-n1  (dotprod)         -> ref,neon,dotprod
#   -cpu cortex-a53   (plain NEON)      -> ref,neon   (SDOT would be SIGILL: hwcaps must say no)
# Needs: apt-get install g++-aarch64-linux-gnu qemu-user
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${PQK_ARM_BUILD:-build/arm}

missing=()
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
if [ ${#missing[@]} -gt 0 ]; then
  echo "arm_check: missing ${missing[*]}; install with: apt-get install -y g++-aarch64-linux-gnu qemu-user" >&2
  exit 3
fi

# one build at a time in $BUILD (several pytest runs may share the tree)
mkdir -p "$(dirname "$BUILD")"
exec 9>"$BUILD.lock"
flock 9
# Only the core, the Arm folders and the test are built (no Python module): ~20 files.
# With cmake (toolchain file cmake/aarch64-linux-gnu.cmake), else the same flags by hand.
if command -v cmake >/dev/null && [ -z "${PQK_ARM_NO_CMAKE:-}" ]; then
  gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  if [ -f "$BUILD/CMakeCache.txt" ] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${gen[1]:-Unix Makefiles}\$" "$BUILD/CMakeCache.txt"; then
    rm -rf "$BUILD"
  fi
  cmake -S "$ROOT" -B "$BUILD" "${gen[@]}" -DCMAKE_TOOLCHAIN_FILE="$ROOT/cmake/aarch64-linux-gnu.cmake" \
    -DCMAKE_BUILD_TYPE=Release -DPYQKERN_BUILD_PYTHON=OFF -DPYQKERN_BUILD_CPP_TESTS=ON \
    -DCMAKE_EXE_LINKER_FLAGS=-static >/dev/null
  cmake --build "$BUILD" -j2 --target pqk_test_kernels
else
  CXX=aarch64-linux-gnu-g++
  FLAGS=(-std=c++17 -O3 -ffp-contract=off -fno-fast-math -fno-math-errno -Wall -Wextra -Wno-unused-parameter
         -Icsrc/include -Icsrc)
  OBJ="$BUILD/obj"
  mkdir -p "$OBJ"
  build_obj() {  # src extra-flags...
    local src=$1; shift
    local o="$OBJ/$(echo "$src" | tr / _).o"
    if [ ! -f "$o" ] || [ "$src" -nt "$o" ] || [ -n "$(find csrc -name '*.h' -newer "$o" | head -1)" ]; then
      "$CXX" "${FLAGS[@]}" "$@" -c "$src" -o "$o"
    fi
    echo "$o"
  }
  objs=()
  for f in csrc/core/*.cpp csrc/kernels/ref/*.cpp; do
    [ "$f" = csrc/core/abi_anchor.cpp ] && continue
    objs+=("$(build_obj "$f" -DPQK_HAVE_NEON -DPQK_HAVE_DOTPROD)")
  done
  for f in csrc/kernels/arm_neon/*.cpp; do objs+=("$(build_obj "$f" -march=armv8-a)"); done
  for f in csrc/kernels/arm_dotprod/*.cpp; do objs+=("$(build_obj "$f" -march=armv8.2-a+dotprod)"); done
  objs+=("$(build_obj tests/cpp/test_kernels.cpp)")
  "$CXX" -static -o "$BUILD/pqk_test_kernels" "${objs[@]}" -lpthread
fi

bin="$BUILD/pqk_test_kernels"
status=0
# cpu:expected variants[:PYQKERN_DISABLE_FEATURES]; the best expected one must be the active one
for spec in "max:ref,neon,dotprod" "neoverse-n1:ref,neon,dotprod" "cortex-a53:ref,neon" "max:ref,neon:asimddp"; do
  IFS=: read -r cpu want disable <<<"$spec"
  echo "== qemu-aarch64 -cpu $cpu${disable:+ (PYQKERN_DISABLE_FEATURES=$disable)}"
  set +e
  out=$(PYQKERN_DISABLE_FEATURES=$disable qemu-aarch64 -cpu "$cpu" -L /usr/aarch64-linux-gnu "$bin" 2>&1)
  rc=$?
  set -e
  echo "$out" | grep -v '^variant ' || true
  got=$(echo "$out" | sed -n 's/^variants ran: //p')
  if [ $rc -ne 0 ]; then
    echo "FAIL: -cpu $cpu: test exited with $rc"; status=1
  elif [ "$got" != "$want" ]; then
    echo "FAIL: -cpu $cpu: variants ran '$got', expected '$want'"; status=1
  elif ! echo "$out" | grep -qx "active variant: ${want##*,}"; then
    echo "FAIL: -cpu $cpu: active variant is not ${want##*,}"; status=1
  else
    echo "OK: -cpu $cpu${disable:+ without $disable} ran $got"
  fi
done
exit $status
