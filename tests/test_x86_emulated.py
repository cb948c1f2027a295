"""The AVX-512 and AVX-VNNI variants on a CPU without those extensions: tools/x86_emu_check.sh
builds the library with their folders compiled for AVX2 through SIMDe (tools/emu), runs the C++
kernel test (tests/cpp/test_kernels.cpp: every variant against ref) on it, and this test suite
runs once more against that build in a second pytest. On such a CPU (CI's Zen 3) the native
build can only skip those variants' cases, and QEMU 7.2 does not run AVX-512. SIMDe's arithmetic is
that of the instructions (where it was not, tools/emu/avx512_on_avx2.h says so and fixes it), so
a mismatch here is a kernel's. A missing tool (cmake, pybind11, network for the SIMDe sdist) is
a failure, not a skip: CI installs them."""
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATED = ("avx512", "avx512vnni", "avxvnni")
# not run on the emulated build: this file and the Arm one (other builds), and the ISA isolation
# check, which is about the native build's objects (the emulated ones hold the shim's own static
# helpers, pqk_emu_*, outside every folder's namespace)
NOT_EMULATED = ["test_x86_emulated.py", "test_arm_qemu.py", "test_isa_isolation.py"]

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                reason="emulates x86 extensions on x86 (Arm runs tests/test_arm_qemu.py)")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    pkg = tmp_path_factory.mktemp("x86emu")
    p = subprocess.run(["bash", os.path.join(ROOT, "tools", "x86_emu_check.sh"), "--python", str(pkg)], cwd=ROOT,
                       capture_output=True, text=True, timeout=1800)
    return p.returncode, p.stdout + p.stderr, str(pkg)


def test_emulated_variants_cpp(emu):
    rc, out, _ = emu
    assert rc == 0, f"tools/x86_emu_check.sh failed (exit {rc}):\n{out[-6000:]}"
    ran = [line.split(": ", 1)[1].split(",") for line in out.splitlines() if line.startswith("variants ran: ")]
    assert ran and set(EMULATED) <= set(ran[0]), out[-3000:]
    assert " 0 mismatches" in out, out[-3000:]


def test_emulated_variants_python(emu):
    rc, out, pkg = emu
    assert rc == 0, f"tools/x86_emu_check.sh failed (exit {rc}):\n{out[-6000:]}"
    env = dict(os.environ, PYTHONPATH=pkg + os.pathsep + os.environ.get("PYTHONPATH", ""))
    probe = subprocess.run([sys.executable, "-c", "import pyqkern as pq; print(pq.__file__); print(','.join(pq.variants()))"],
                           cwd=pkg, env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    where, variants = probe.stdout.split()
    assert where.startswith(pkg), where  # the emulated build, not an installed pyqkern
    assert set(EMULATED) <= set(variants.split(",")), variants
    # the whole suite: variant-parametrized cases and the loops over pq.variants() take the
    # emulated variants, and auto dispatch picks avx512vnni
    ignore = [f"--ignore={os.path.join(ROOT, 'tests', f)}" for f in NOT_EMULATED]
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-W", "ignore",
                        *ignore, os.path.join(ROOT, "tests")], cwd=pkg, env=env, capture_output=True, text=True,
                       timeout=3000)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"the tests on the emulated build failed:\n{out[-6000:]}"
    assert "cannot run it" not in out, out[-6000:]  # no variant case skipped for want of the CPU
    assert " passed" in out.splitlines()[-1], out[-3000:]
