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
"""
from __future__ import annotations

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
