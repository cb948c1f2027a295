"""No ISA-specific instruction outside the ISA folders' own functions in libpyqkern.so (x86-64).

The library is built for baseline x86-64 and picks its AVX2 / AVX-512 kernels at run time; each
ISA folder is compiled with its own -m flags. Two ways its code can still run on a CPU without
that ISA, both found here once:
- a static initializer of a global in an ISA folder (it runs when the library loads, on every
  CPU): gemv_bf16.cpp's shuffle tables were filled by AVX-512 code at load time;
- an inline library function (std::vector<float>::_M_default_append) instantiated in an ISA
  folder: the linker keeps one copy for the whole library, possibly the one with AVX-512 code.
So: every function whose name is not in an ISA namespace (pqk::avx2::, pqk::avx512::, ...,
lambdas and template instantiations of them included) must contain no VEX / EVEX instruction.
And a third, inside the ISA namespaces: the folders' register functions (compiled with their
flags: GCC filled the kernel table with zmm stores) ran for every compiled variant when the
dispatch tables were built. The library crashed on any x86 CPU without AVX-512; the qemu test
below runs it on CPU models without AVX-512 and without AVX2.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess

import pytest

import pyqkern as pq

ISA_NS = re.compile(r"pqk::(avx2|avxvnni|avx512|avx512vnni|avx512bf16)::")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 library only")
def test_no_isa_instructions_outside_isa_functions():
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", pq.get_library()], capture_output=True,
                         text=True, check=True).stdout
    func, leaks, checked = None, {}, 0
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            func = m.group(1)
            checked += not ISA_NS.search(func)
            continue
        if func is None or ISA_NS.search(func):
            continue
        ins = line.split("\t")[-1].strip() if "\t" in line else ""
        if re.match(r"v[a-z]", ins) or "%ymm" in ins or "%zmm" in ins or re.search(r"%k[0-7]\b", ins):
            leaks.setdefault(func, ins)
    assert checked > 100, "objdump listed too few functions: the scan did not run"
    assert not leaks, "AVX instructions outside the ISA folders: " + "; ".join(
        f"{f[:120]}: {i}" for f, i in list(leaks.items())[:10])


# What runs on an older x86-64 CPU (qemu-user's CPU models, the host's Python and numpy): the
# variant picked, quantize / dequantize / matmul (int8 and float compute, QLinear, an adapter)
# for formats with kernels in every x86 folder. Results go to an .npz compared on the host.
_CHILD = r"""
import sys
import numpy as np
import pyqkern as pq
rng = np.random.default_rng(0)
W = rng.standard_normal((37, 256)).astype(np.float32)
x = rng.standard_normal((3, 256)).astype(np.float32)
A = rng.standard_normal((4, 256)).astype(np.float32) * 0.1
B = rng.standard_normal((37, 4)).astype(np.float32) * 0.1
out = {"variant": np.array(pq.info()["active_variant"])}
for f in ("q4_0", "q8_0", "q4_k", "q6_k", "iq4_nl", "nf4", "int4", "int8"):
    qt = pq.quantize(W, f)
    out[f + "_q"] = qt.data
    out[f + "_deq"] = pq.dequantize(qt)
    out[f + "_int8"] = pq.QLinear(qt)(x)
    out[f + "_float"] = pq.matmul(x[:2], qt, compute="float")
    out[f + "_lora"] = pq.matmul(x[:1], qt, compute="float", lora=pq.LoRA(A, B, alpha=8))
np.savez(sys.argv[1], **out)
"""


def _qemu_x86():
    exe = shutil.which("qemu-x86_64")
    if exe is None:
        pytest.fail("qemu-x86_64 (Debian qemu-user) is needed: .ci/run installs it")
    return exe


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 library only")
@pytest.mark.parametrize("cpu,variant", [("Haswell", "avx2"), ("SandyBridge", "ref")])
def test_runs_on_older_cpus_under_qemu(tmp_path, cpu, variant):
    """The library loads and computes on a CPU without AVX-512 (Haswell: the avx2 variant) and
    without AVX2 (Sandy Bridge: ref): no AVX-512 code at load time or in dispatch. int8 results
    equal the host's bit for bit (the spec fixes them for every variant); quantized bytes and
    dequantized values too; float results agree with the host's within the float bound."""
    import sys

    import numpy as np

    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    res = tmp_path / "out.npz"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("PYQKERN_ISA", None)
    r = subprocess.run([_qemu_x86(), "-cpu", cpu, sys.executable, str(script), str(res)], capture_output=True,
                       text=True, timeout=600, env=env)
    err = "\n".join(l for l in r.stderr.splitlines() if "TCG doesn't support" not in l)
    assert r.returncode == 0, f"under qemu -cpu {cpu}: exit {r.returncode}\n{err[-3000:]}"
    got = np.load(res)
    assert str(got["variant"]) == variant
    rng = np.random.default_rng(0)
    W = rng.standard_normal((37, 256)).astype(np.float32)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    for f in ("q4_0", "q8_0", "q4_k", "q6_k", "iq4_nl", "nf4", "int4", "int8"):
        qt = pq.quantize(W, f)
        np.testing.assert_array_equal(got[f + "_q"], qt.data, err_msg=f)
        np.testing.assert_array_equal(got[f + "_deq"], pq.dequantize(qt), err_msg=f)
        np.testing.assert_array_equal(got[f + "_int8"], pq.matmul(x, qt, isa=variant), err_msg=f)
        wd = pq.dequantize(qt).astype(np.float64)
        ref = x[:2].astype(np.float64) @ wd.T
        bound = 2 * 256 * 2.0 ** -23 * (np.abs(x[:2]).astype(np.float64) @ np.abs(wd).T) + 1e-30
        assert (np.abs(got[f + "_float"] - ref) <= bound).all(), f
        assert np.isfinite(got[f + "_lora"]).all(), f
