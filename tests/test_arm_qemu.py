"""The standalone C++ kernel test (tests/cpp/test_kernels.cpp): cross-built for aarch64 and run
under qemu with three CPU models (tools/arm_check.sh), and built natively against the imported
pyqkern's libpyqkern.so (tools/x86_check.sh). Missing Arm tools are a failure, not a skip: CI
installs them (.ci/run)."""
import os
import platform
import shutil
import subprocess

import pytest

import pyqkern as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, timeout):
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


@pytest.fixture(scope="module")
def arm_out():
    missing = [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: the Arm kernel test needs them; install with "
                    "`apt-get install -y g++-aarch64-linux-gnu qemu-user` (CI does this in .ci/run)")
    return _run(["bash", os.path.join(ROOT, "tools", "arm_check.sh")], timeout=900)


@pytest.fixture(scope="module")
def native_out():
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.fail("a C++ compiler (g++) is needed to build tests/cpp/test_kernels.cpp")
    libdir = os.path.dirname(os.path.abspath(pq.__file__))
    if not os.path.exists(os.path.join(libdir, "libpyqkern.so")):
        pytest.fail(f"libpyqkern.so not found next to the imported pyqkern ({libdir})")
    return _run(["bash", os.path.join(ROOT, "tools", "x86_check.sh"), libdir], timeout=600)


def test_arm_variants_under_qemu(arm_out):
    rc, out = arm_out
    assert rc == 0, f"tools/arm_check.sh failed (exit {rc}):\n{out[-6000:]}"
    for cpu, want in (("max", "ref,neon,dotprod"), ("neoverse-n1", "ref,neon,dotprod"),
                      ("cortex-a53", "ref,neon")):
        assert f"OK: -cpu {cpu} ran {want}" in out, out[-6000:]
    assert " 0 mismatches" in out


def test_native_variants_cpp(native_out):
    rc, out = native_out
    assert rc == 0, f"tools/x86_check.sh failed (exit {rc}):\n{out[-6000:]}"
    ran = [l.split(": ", 1)[1].split(",") for l in out.splitlines() if l.startswith("variants ran: ")]
    assert ran and sorted(ran[0]) == sorted(pq.variants()), (ran, pq.variants(), out[-3000:])
    if platform.machine() in ("x86_64", "AMD64"):
        assert "ref" in ran[0]


def _digests(out):
    """[{case: hash}] per harness run in out (arm_check.sh runs it once per CPU model)"""
    runs, cur = [], None
    for line in out.splitlines():
        if line.startswith("cpu: "):
            cur = {}
            runs.append(cur)
        elif line.startswith("digest ") and cur is not None:
            _, case, h = line.split()
            cur[case] = h
    return runs


def test_same_quantized_bytes_on_arm_and_native(arm_out, native_out):
    """The ref quantizer's bytes for fixed inputs (huge and tiny rows among them) are the same on
    every architecture: iq4_nl's scale for values near 1e20 was a NaN whose sign bit differed
    between x86 and Arm (its x^2 weights overflowed)."""
    native = _digests(native_out[1])
    arm = _digests(arm_out[1])
    assert len(native) == 1 and len(native[0]) >= 13, native_out[1][-3000:]
    assert len(arm) == 4, arm_out[1][-3000:]
    for run in arm:
        assert run == native[0]
