"""The plain C ABI (libpyqkern.so + pyqkern.h) as a non-Python host sees it.

1. every C function, driven through the cffi bindings (bindings/cffi), gives the same bytes /
   floats as the pybind11 path (pq.quantize / pq.dequantize / pq.matmul) for the same variant;
2. the cffi declarations match the real header (names, return and parameter types; struct
   layouts and enum values as a C compiler sees them);
3. the C example (examples/c/quantize_matmul.c) compiles with cc against get_include() /
   get_library() and runs green;
4. bad input through the C ABI returns an error status with a message, never a crash;
5. one dispatch state: the cffi handle and the pybind11 module share the library instance.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pyqkern as pq
from pyqkern import _formats, _native
from pyqkern._matmul import packed_float_route

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bindings" / "cffi"))
import pyqkern_cffi as C  # noqa: E402  (cffi is in the test extra: a missing cffi must fail, not skip)

ffi, lib = C.ffi, C.lib
F32 = np.float32
FORMATS = pq.formats()
FID = _formats.FORMAT_IDS
VARIANTS = pq.variants()
ISA_ID = {name: i for i, name in enumerate(_native.isa_names())}
HEADER = Path(pq.get_include()) / "pyqkern" / "pyqkern.h"


def _rng(seed):
    return np.random.default_rng(seed)


def _f32_bits(a):
    return np.ascontiguousarray(a, dtype=F32).view(np.uint32)


# ------------------------------------------------------------------ 1. same results as pybind11
def test_info_functions_match_pybind():
    assert lib.pqk_abi_version() == _native.abi_version() == 1
    names = _native.format_names()
    assert [C.cstr(lib.pqk_format_name(f)) for f in range(lib.PQK_FORMAT_COUNT)] == list(names) == FORMATS
    assert [C.cstr(lib.pqk_isa_name(i)) for i in range(lib.PQK_ISA_COUNT)] == list(_native.isa_names())
    for i in range(lib.PQK_ISA_COUNT):
        assert lib.pqk_isa_runnable(i) == int(_native.isa_runnable(i))
        assert lib.pqk_isa_compiled(i) == int(_native.isa_compiled(i))
    isa = ffi.new("int32_t*")
    C.check(lib.pqk_active_isa(isa))
    assert isa[0] == _native.active_isa()
    assert C.cstr(lib.pqk_cpu_brand()) == _native.cpu_brand()
    assert C.cstr(lib.pqk_cpu_features()) == _native.cpu_features()
    assert C.cstr(lib.pqk_cpu_features()).split() == pq.info()["features"]
    for v in VARIANTS:
        i = ISA_ID[v]
        for fmt, (qv, dv) in _native.kernel_sources(i).items():
            got = [lib.pqk_slot_variant(i, slot, FID[fmt]) for slot in (b"quantize", b"dequantize")]
            assert [C.cstr(lib.pqk_isa_name(g)) if g >= 0 else None for g in got] == [qv, dv]
        for slot, src in _native.matmul_sources(i).items():
            g = lib.pqk_slot_variant(i, slot.encode(), 0)
            assert (C.cstr(lib.pqk_isa_name(g)) if g >= 0 else None) == src


@pytest.mark.parametrize("fmt,k,group,sym", [
    ("q4_0", 256, 0, 0), ("q4_k", 512, 0, 0), ("nf4", 256, 0, 0), ("nf4", 256, 32, 0), ("int4", 256, 0, 0),
    ("int4", 256, 64, 1), ("int4", 96, -1, 0), ("int8", 100, 0, 0), ("iq4_nl", 64, 0, 0)])
def test_row_bytes_and_int8_supported_match(fmt, k, group, sym):
    p = C.qparams(group, sym)
    rq, rs, rz = C.row_bytes(FID[fmt], k, p)
    assert (rq, rs, rz) == _formats.row_bytes(fmt, k, {"group": p.group, "sym": p.sym})
    assert tuple(_native.row_bytes(FID[fmt], k, group, sym))[:3] == (rq, rs, rz)
    assert p.group == _native.row_bytes(FID[fmt], k, group, sym)[3]  # defaults resolved in place
    assert lib.pqk_int8_supported(FID[fmt], k, p) == int(_native.int8_supported(FID[fmt], k, p.group, p.sym))


# (format, k, pq.quantize kwargs): every format with its default parameters, plus the int4 / nf4 variants
QCASES = [(f, 256, {}) for f in FORMATS] + [
    ("int4", 256, {"group": 64, "sym": True}), ("int4", 160, {"group": -1}), ("nf4", 256, {"group": 32})]


def _cffi_quantize(isa, fmt, x, params, ldx_pad=5):
    n, k = x.shape
    xs = np.full((n, k + ldx_pad), np.nan, F32)  # row stride ldx > k: the padding must not be read
    xs[:, :k] = x
    rq, rs, rz = C.row_bytes(FID[fmt], k, params)
    q = np.zeros((n, rq), np.uint8)
    s = np.zeros((n, rs), np.uint8) if rs else None
    z = np.zeros((n, rz), np.uint8) if rz else None
    C.check(lib.pqk_quantize(isa, FID[fmt], C.ptr(xs, "float*"), n, k, k + ldx_pad, params,
                             C.ptr(q), C.ptr(s), C.ptr(z)))
    return q, s, z


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt,k,kw", QCASES, ids=[f"{f}-{k}-{kw}" for f, k, kw in QCASES])
def test_quantize_dequantize_match_pybind(variant, fmt, k, kw):
    isa = ISA_ID[variant]
    x = (_rng(1).standard_normal((7, k)) * 0.3).astype(F32)
    x[0, :40] = 0.0  # an all-zero block
    qt = pq.quantize(x, fmt, isa=variant, **kw)
    params = C.qparams(qt.params["group"], qt.params["sym"])
    q, s, z = _cffi_quantize(isa, fmt, x, params)
    pq_q, pq_s, pq_z = qt.sections()
    assert np.array_equal(q, pq_q)
    assert np.array_equal(s if s is not None else np.zeros((7, 0), np.uint8), pq_s)
    assert np.array_equal(z if z is not None else np.zeros((7, 0), np.uint8), pq_z)
    y = np.empty((7, k), F32)
    C.check(lib.pqk_dequantize(isa, FID[fmt], C.ptr(q), C.ptr(s), C.ptr(z), 7, k, params, C.ptr(y, "float*")))
    assert np.array_equal(_f32_bits(y), _f32_bits(pq.dequantize(qt, isa=variant)))


def _lora_struct(keep, ad, qt):
    """A pqk_lora from a pq.LoRA's native operands; keep holds what must stay alive."""
    A, Bp, scale, row_scale, dt = ad.native_args(qt)
    A, Bp = np.ascontiguousarray(A), np.ascontiguousarray(Bp)
    rs = None if row_scale is None else np.ascontiguousarray(row_scale, dtype=F32)
    keep += [A, Bp, rs]
    return {"rank": ad.rank, "A": C.ptr(A), "Bp": C.ptr(Bp), "scale": scale,
            "row_scale": C.ptr(rs, "float*"), "dtype": dt}


MCASES = [("q4_0", {}), ("q4_k", {}), ("q6_k", {}), ("nf4", {}), ("int4", {"group": 64}),
          ("int4", {"group": 128, "sym": True}), ("int8", {}), ("iq4_nl", {})]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt,kw", MCASES, ids=[f"{f}-{kw}" for f, kw in MCASES])
def test_matmul_match_pybind(variant, fmt, kw):
    isa = ISA_ID[variant]
    r = _rng(2)
    n, k, m = 37, 256, 5
    w = (r.standard_normal((n, k)) * 0.2).astype(F32)
    qt = pq.quantize(w, fmt, **kw)
    params = C.qparams(qt.params["group"], qt.params["sym"])
    q, s, z = (np.ascontiguousarray(a) if a.size else None for a in qt.sections())
    x = r.standard_normal((m, k)).astype(F32)
    bias = r.standard_normal(n).astype(F32)
    lo32 = pq.LoRA(r.standard_normal((4, k)).astype(F32) * 0.1, r.standard_normal((n, 4)).astype(F32) * 0.1,
                   alpha=8.0)
    lo16 = pq.LoRA((r.standard_normal((2, k)) * 0.1).astype(np.float16),
                   (r.standard_normal((n, 2)) * 0.1).astype(np.float16))
    dora = pq.LoRA(r.standard_normal((3, k)).astype(F32) * 0.1, r.standard_normal((n, 3)).astype(F32) * 0.1,
                   magnitude=(1.0 + 0.1 * r.standard_normal(n)).astype(F32))
    ids = np.array([0, -1, 1, 2, 0], np.int32)

    ldx, ldy = k + 3, n + 2
    xs = np.full((m, ldx), np.nan, F32)
    xs[:, :k] = x
    keep = []
    ads_sum = ffi.new("pqk_lora[]", [_lora_struct(keep, lo32, qt), _lora_struct(keep, lo16, qt)])
    ads_sel = ffi.new("pqk_lora[]", [_lora_struct(keep, a, qt) for a in (lo32, lo16, dora)])
    xp, bp = C.ptr(xs, "float*"), C.ptr(bias, "float*")

    def run(call):
        y = np.full((m, ldy), -7.0, F32)
        C.check(call(C.ptr(y, "float*")))
        assert (y[:, n:] == -7.0).all()  # columns past n (row stride ldy) untouched
        return y[:, :n]

    cases = [  # (C call, pq.matmul kwargs)
        (lambda yp: lib.pqk_matmul_float(isa, FID[fmt], C.ptr(q), C.ptr(s), C.ptr(z), n, k, params, xp, m, ldx,
                                         bp, yp, ldy), dict(compute="float")),
        (lambda yp: lib.pqk_matmul_float(isa, FID[fmt], C.ptr(q), C.ptr(s), C.ptr(z), n, k, params, xp, m, ldx,
                                         ffi.NULL, yp, ldy), dict(compute="float", nobias=True)),
        (lambda yp: lib.pqk_matmul_float_lora(isa, FID[fmt], C.ptr(q), C.ptr(s), C.ptr(z), n, k, params, xp, m,
                                              ldx, bp, yp, ldy, ads_sum, 2, ffi.NULL),
         dict(compute="float", lora=[lo32, lo16])),
        (lambda yp: lib.pqk_matmul_float_lora(isa, FID[fmt], C.ptr(q), C.ptr(s), C.ptr(z), n, k, params, xp, m,
                                              ldx, bp, yp, ldy, ads_sel, 3, C.ptr(ids, "int32_t*")),
         dict(compute="float", lora=[lo32, lo16, dora], adapter_ids=ids)),
    ]
    packed = None
    if lib.pqk_int8_supported(FID[fmt], k, params):
        packed = C.pack(FID[fmt], q, s, z, n, k, params)
        assert lib.pqk_packed_nbytes(packed) == pq.QLinear(qt, compute="int8").packed_nbytes > 0
        if packed_float_route(qt, "float", m, True, variant):
            # pq.matmul's compute="float" takes the packed float kernel at this size: its C entry
            # is the one to match; pqk_matmul_float is matched against its own binding below
            canonical, cases = cases, [
                (lambda yp: lib.pqk_matmul_float_packed(isa, packed, xp, m, ldx, bp, yp, ldy, ffi.NULL, 0, ffi.NULL),
                 dict(compute="float")),
                (lambda yp: lib.pqk_matmul_float_packed(isa, packed, xp, m, ldx, bp, yp, ldy, ads_sum, 2, ffi.NULL),
                 dict(compute="float", lora=[lo32, lo16])),
                (lambda yp: lib.pqk_matmul_float_packed(isa, packed, xp, m, ldx, bp, yp, ldy, ads_sel, 3,
                                                        C.ptr(ids, "int32_t*")),
                 dict(compute="float", lora=[lo32, lo16, dora], adapter_ids=ids)),
            ]
            for call, kwargs in canonical:
                b = None if kwargs.pop("nobias", False) else bias
                lora, ids_ = kwargs.get("lora"), kwargs.get("adapter_ids")
                want = np.empty((m, n), F32)
                _native.matmul_float(isa, FID[fmt], q, s, z, n, k, qt.params["group"], qt.params["sym"], x, b, want,
                                 [a.native_args(qt) for a in lora] if lora else None, ids_)
                got = run(call)
                assert np.array_equal(_f32_bits(got), _f32_bits(want)), kwargs
        cases += [
            (lambda yp: lib.pqk_matmul_int8(isa, packed, xp, m, ldx, bp, yp, ldy), dict(compute="int8")),
            (lambda yp: lib.pqk_matmul_int8_lora(isa, packed, xp, m, ldx, bp, yp, ldy, ads_sum, 2, ffi.NULL),
             dict(compute="int8", lora=[lo32, lo16])),
            (lambda yp: lib.pqk_matmul_int8_lora(isa, packed, xp, m, ldx, bp, yp, ldy, ads_sel, 3,
                                                 C.ptr(ids, "int32_t*")),
             dict(compute="int8", lora=[lo32, lo16, dora], adapter_ids=ids)),
        ]
    else:
        assert fmt not in ("q4_0", "int4", "int8")
    for call, kwargs in cases:
        b = None if kwargs.pop("nobias", False) else bias
        want = pq.matmul(x, qt, b, isa=variant, **kwargs)
        got = run(call)
        assert np.array_equal(_f32_bits(got), _f32_bits(want)), kwargs


@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_out_overlapping_x(threads):
    """A C caller may pass an out that overlaps x (Python copies x before the call; C callers
    get no such help): every path gives the answer of a separate out. Paths: the float decode
    kernel (M <= 8), the plain row path (M 9..15), the K-chunked path (ref, M <= 4, K > 512), the
    panel path over two passes of 512 rows (M = 520), int8 past one 128-row chunk, each with and
    without an adapter. y has x's row stride or twice it (then y's first rows cover x's later
    ones)."""
    r = _rng(21)
    before = pq.get_num_threads()
    try:
        pq.set_num_threads(threads)
        for variant, k, ms in ((None, 64, (1, 3, 6, 9, 12, 20, 130, 520)), ("ref", 1024, (1, 3))):
            isa = -1 if variant is None else ISA_ID[variant]
            n = k
            w = (r.standard_normal((n, k)) * 0.2).astype(F32)
            qt = pq.quantize(w, "q4_0")
            params = C.qparams(qt.params["group"], qt.params["sym"])
            q = np.ascontiguousarray(qt.sections()[0])
            lo = pq.LoRA(r.standard_normal((4, k)).astype(F32) * 0.1, r.standard_normal((n, 4)).astype(F32) * 0.1)
            keep = []
            ads = ffi.new("pqk_lora[]", [_lora_struct(keep, lo, qt)])
            packed = C.pack(FID["q4_0"], q, None, None, n, k, params)
            for m in ms:
                x = r.standard_normal((m, k)).astype(F32)

                def fl(xp, yp, ldy, ad=None):
                    if ad is None:
                        return lib.pqk_matmul_float(isa, FID["q4_0"], C.ptr(q), ffi.NULL, ffi.NULL, n, k, params, xp,
                                                    m, k, ffi.NULL, yp, ldy)
                    return lib.pqk_matmul_float_lora(isa, FID["q4_0"], C.ptr(q), ffi.NULL, ffi.NULL, n, k, params,
                                                     xp, m, k, ffi.NULL, yp, ldy, ad, 1, ffi.NULL)

                calls = {
                    "float": fl,
                    "float lora": lambda xp, yp, ldy: fl(xp, yp, ldy, ads),
                    "int8": lambda xp, yp, ldy: lib.pqk_matmul_int8(isa, packed, xp, m, k, ffi.NULL, yp, ldy),
                    "int8 lora": lambda xp, yp, ldy: lib.pqk_matmul_int8_lora(isa, packed, xp, m, k, ffi.NULL, yp,
                                                                              ldy, ads, 1, ffi.NULL),
                }
                for name, call in calls.items():
                    want = np.empty((m, n), F32)
                    C.check(call(C.ptr(x, "float*"), C.ptr(want, "float*"), n))
                    for ldy in (n, 2 * n):
                        buf = np.zeros((m - 1) * ldy + n, F32)
                        buf[: m * k] = x.ravel()
                        C.check(call(C.ptr(buf, "float*"), C.ptr(buf, "float*"), ldy))
                        got = np.lib.stride_tricks.as_strided(buf, (m, n), (4 * ldy, 4))
                        assert np.array_equal(_f32_bits(got), _f32_bits(want)), (variant, name, m, ldy)
    finally:
        pq.set_num_threads(before)


# ------------------------------------------------------------------ 2. cdef == header
_PROTO = re.compile(r"([A-Za-z_][\w\s\*]*?)\b(pqk_\w+)\s*\(([^()]*)\)\s*;")


def _strip_c(text):
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    lines = []
    for line in text.splitlines():  # preprocessor lines, with backslash continuations
        if lines and lines[-1].endswith("\\"):
            lines[-1] = line
            continue
        lines.append("" if line.lstrip().startswith("#") else line)
    return "\n".join(x for x in lines if not x.endswith("\\"))


def _norm_type(t):
    t = " ".join(t.replace("*", " * ").split())
    return t.replace(" *", "*")


def _param_type(p):
    p = " ".join(p.replace("*", " * ").split())
    words = p.split(" ")
    if len(words) > 1 and re.fullmatch(r"[A-Za-z_]\w*", words[-1]) and words[-1] not in ("int", "char", "void"):
        words = words[:-1]  # drop the parameter name
    return _norm_type(" ".join(words))


def _prototypes(text):
    text = _strip_c(text).replace("PQK_API", " ").replace('extern "C"', " ")
    out = {}
    for ret, name, params in _PROTO.findall(text):
        ret = _norm_type(ret.split(";")[-1].split("}")[-1])
        ps = [_param_type(p) for p in params.split(",")] if params.strip() != "void" else []
        assert name not in out, f"{name} declared twice"
        out[name] = (ret, ps)
    return out


def test_cdef_matches_header():
    hdr = _prototypes(HEADER.read_text())
    src_hdr = ROOT / "csrc" / "include" / "pyqkern" / "pyqkern.h"
    if src_hdr.exists():  # the installed copy is the source header
        assert src_hdr.read_text() == HEADER.read_text()
    cdef = _prototypes(C.CDEF)
    assert len(hdr) >= 20 and "pqk_matmul_float_lora" in hdr
    assert hdr["pqk_quantize"] == ("pqk_status", ["int32_t", "int32_t", "const float*", "int64_t", "int64_t",
                                                  "int64_t", "const pqk_qparams*", "void*", "void*", "void*"])
    assert sorted(cdef) == sorted(hdr), (set(hdr) ^ set(cdef))
    for name in hdr:
        assert cdef[name] == hdr[name], name


def test_cdef_parses_like_header_in_cffi():
    """cffi itself, on the header minus its preprocessor parts, sees the same function types."""
    import cffi

    text = _strip_c(HEADER.read_text()).replace("PQK_API", "").replace('extern "C" {', "")
    text = re.sub(r"^\s*}\s*$", "", text, flags=re.M)  # the extern "C" closing brace
    f2 = cffi.FFI()
    f2.cdef(text)
    lib2 = f2.dlopen(pq.get_library())
    names = sorted(_prototypes(HEADER.read_text()))
    for name in names:
        assert f2.typeof(getattr(lib2, name)).cname == ffi.typeof(getattr(lib, name)).cname, name
    for st in ("pqk_qparams", "pqk_row_bytes", "pqk_lora"):
        assert f2.sizeof(st) == ffi.sizeof(st)
        assert [(fn, f.offset) for fn, f in f2.typeof(st).fields] == [(fn, f.offset) for fn, f in
                                                                      ffi.typeof(st).fields]


def _cc():
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    assert cc, "no C compiler (cc) found: it is a build requirement, and the C ABI tests need it"
    return shlex.split(cc)


def _compile(tmp_path, src, out_name):
    libdir = os.path.dirname(pq.get_library())
    exe = tmp_path / out_name
    cmd = [*_cc(), "-std=c99", "-O1", "-Wall", "-Wextra", "-Werror", "-I", pq.get_include(), str(src),
           pq.get_library(), f"-Wl,-rpath,{libdir}", "-lm", "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    return exe


_LAYOUT_C = r"""
#include <stddef.h>
#include <stdio.h>
#include <pyqkern/pyqkern.h>
#define S(t) printf("sizeof %s %d\n", #t, (int)sizeof(t))
#define O(t, f) printf("offsetof %s.%s %d\n", #t, #f, (int)offsetof(t, f))
#define E(e) printf("enum %s %d\n", #e, (int)(e))
int main(void) {
  S(pqk_qparams); O(pqk_qparams, group); O(pqk_qparams, sym);
  S(pqk_row_bytes); O(pqk_row_bytes, q); O(pqk_row_bytes, s); O(pqk_row_bytes, z);
  S(pqk_lora); O(pqk_lora, rank); O(pqk_lora, A); O(pqk_lora, Bp); O(pqk_lora, scale);
  O(pqk_lora, row_scale); O(pqk_lora, dtype);
  S(pqk_status); S(pqk_format); S(pqk_isa);
  %ENUMS%
  return 0;
}
"""


def test_cdef_layout_matches_c_compiler(tmp_path):
    enums = [n for n in dir(lib) if n.startswith("PQK_")]
    hdr_enums = set(re.findall(r"\b(PQK_\w+)\s*=", _strip_c(HEADER.read_text())))
    assert hdr_enums == set(enums), hdr_enums ^ set(enums)
    assert "PQK_ERR_INTERNAL" in enums and "PQK_ISA_ACTIVE" in enums and "PQK_INT8" in enums
    src = tmp_path / "layout.c"
    src.write_text(_LAYOUT_C.replace("%ENUMS%", " ".join(f"E({e});" for e in enums)))
    out = subprocess.run([str(_compile(tmp_path, src, "layout"))], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    seen = 0
    for line in out.stdout.splitlines():
        kind, what, val = line.split()
        val = int(val)
        if kind == "sizeof":
            assert ffi.sizeof(what) == val, what
        elif kind == "offsetof":
            st, field = what.split(".")
            assert ffi.offsetof(st, field) == val, what
        else:
            assert getattr(lib, what) == val, what
        seen += 1
    assert seen == 17 + len(enums)


_DLCLOSE_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
int main(int argc, char** argv) {
  void* h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!h) { printf("dlopen: %s\n", dlerror()); return 2; }
  int (*abi)(void) = (int (*)(void))dlsym(h, "pqk_abi_version");
  if (!abi) { printf("no pqk_abi_version\n"); return 3; }
  printf("abi %d\n", abi());
  if (dlclose(h) != 0) { printf("dlclose: %s\n", dlerror()); return 4; }
  FILE* f = fopen("/proc/self/maps", "r");
  char line[4096];
  int left = 0;
  while (f && fgets(line, sizeof line, f)) left += strstr(line, "libpyqkern") != NULL;
  printf("mapped after dlclose %d\n", left);
  return 0;
}
"""


def test_only_the_c_abi_is_exported_and_the_library_unloads(tmp_path):
    """libpyqkern.so exports pqk_* and nothing else (a review found std::vector members, typeinfo
    and STB_GNU_UNIQUE statics exported: a host's copies interposed on them, and the unique
    symbols made the library NODELETE, so dlclose left it mapped)."""
    nm = shutil.which("nm")
    assert nm, "no nm (binutils): it comes with the C compiler the build needs"
    out = subprocess.run([nm, "-D", "--defined-only", pq.get_library()], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    names = [ln.split()[-1] for ln in out.stdout.splitlines() if ln.strip()]
    assert "pqk_matmul_int8" in names and "pqk_abi_version" in names
    assert [n for n in names if not n.startswith("pqk_")] == []
    src = tmp_path / "dlclose.c"
    src.write_text(_DLCLOSE_C)
    exe = tmp_path / "dlclose"
    cmd = [*_cc(), "-std=c99", "-O1", "-Wall", "-Werror", str(src), "-ldl", "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(exe), pq.get_library()], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"abi {lib.pqk_abi_version()}" in r.stdout and "mapped after dlclose 0" in r.stdout, r.stdout


# ------------------------------------------------------------------ 3. the C example
def test_c_example_compiles_and_runs(tmp_path):
    exe = _compile(tmp_path, ROOT / "examples" / "c" / "quantize_matmul.c", "quantize_matmul")
    env = dict(os.environ)
    env.pop("PYQKERN_ISA", None)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    out = r.stdout
    assert out.startswith("pyqkern C ABI 1, variant ")
    assert "FAIL" not in out
    for fmt in ("q4_0", "int4"):
        for what in ("float + bias", "float + bias + lora", "int8 + bias", "int8 + bias + lora"):
            assert re.search(rf"^PASS {fmt} {re.escape(what)} +max\|err\|", out, re.M), (fmt, what, out)
    assert out.rstrip().endswith("quantize_matmul: all checks passed")


# ------------------------------------------------------------------ 4. bad input -> status, never a crash
def _bad_cases():
    k, n = 64, 4
    x = np.ones((n, k), F32)
    xq = pq.quantize(x, "q4_0")
    q = np.ascontiguousarray(xq.sections()[0])
    p0 = C.qparams()
    good_y = np.empty((n, k), F32)
    buf = np.zeros(4096, np.uint8)
    packed = C.pack(FID["q4_0"], q, None, None, n, k, p0)
    A = np.ones((2, k), F32)
    Bp = np.ones((1, 2, 16), F32)
    y = np.empty((n, n), F32)
    keep = [x, xq, q, good_y, buf, packed, A, Bp, y]
    NULL = ffi.NULL
    X, Q, B, Y, YK = (C.ptr(x, "float*"), C.ptr(q), C.ptr(buf), C.ptr(y, "float*"), C.ptr(good_y, "float*"))

    def lora(rank=2, a=C.ptr(A), bp=C.ptr(Bp), dtype=0, scale=1.0):
        s = ffi.new("pqk_lora*", {"rank": rank, "A": a, "Bp": bp, "scale": scale, "row_scale": NULL,
                                  "dtype": dtype})
        keep.append(s)
        return s

    ids_bad = np.array([0, 1, 0, 0], np.int32)
    ids_neg = np.array([0, -2, 0, 0], np.int32)
    keep += [ids_bad, ids_neg]
    Q40, INT4 = FID["q4_0"], FID["int4"]
    ERR_ARG, ERR_SHAPE, ERR_ISA, ERR_UNSUP = (lib.PQK_ERR_ARG, lib.PQK_ERR_SHAPE, lib.PQK_ERR_ISA,
                                              lib.PQK_ERR_UNSUPPORTED)
    ARGISH = {ERR_ARG, ERR_SHAPE, ERR_UNSUP}
    unrunnable = [i for i in range(lib.PQK_ISA_COUNT) if not lib.pqk_isa_runnable(i)]
    nan_x = np.full((n, k), np.nan, F32)
    keep.append(nan_x)
    huge_ranks = ffi.new("pqk_lora[]", [{"rank": 2**31 - 1, "A": C.ptr(A), "Bp": C.ptr(Bp), "scale": 1.0,
                                         "row_scale": NULL, "dtype": 0}] * 8193)
    keep.append(huge_ranks)
    cases = {
        # quantize
        "quantize x NULL": (lambda: lib.pqk_quantize(-1, Q40, NULL, n, k, k, p0, B, NULL, NULL), {ERR_ARG}),
        "quantize q NULL": (lambda: lib.pqk_quantize(-1, Q40, X, n, k, k, p0, NULL, NULL, NULL), {ERR_ARG}),
        "quantize params NULL": (lambda: lib.pqk_quantize(-1, Q40, X, n, k, k, NULL, B, NULL, NULL), {ERR_ARG}),
        "quantize int4 s,z NULL": (lambda: lib.pqk_quantize(-1, INT4, X, 1, k, k, C.qparams(32), B, NULL, NULL),
                                   {ERR_ARG}),
        "quantize k not multiple of block": (lambda: lib.pqk_quantize(-1, Q40, X, 1, 48, 48, p0, B, NULL, NULL),
                                             {ERR_SHAPE}),
        "quantize q4_k k=64": (lambda: lib.pqk_quantize(-1, FID["q4_k"], X, 1, 64, 64, p0, B, NULL, NULL),
                               {ERR_SHAPE}),
        "quantize k=0": (lambda: lib.pqk_quantize(-1, Q40, X, 1, 0, 0, p0, B, NULL, NULL), {ERR_SHAPE}),
        "quantize negative n": (lambda: lib.pqk_quantize(-1, Q40, X, -1, k, k, p0, B, NULL, NULL), {ERR_SHAPE}),
        "quantize negative k": (lambda: lib.pqk_quantize(-1, Q40, X, 1, -32, k, p0, B, NULL, NULL), {ERR_SHAPE}),
        "quantize ldx < k": (lambda: lib.pqk_quantize(-1, Q40, X, 2, k, k - 1, p0, B, NULL, NULL), ARGISH),
        "quantize bad format 99": (lambda: lib.pqk_quantize(-1, 99, X, 1, k, k, p0, B, NULL, NULL), {ERR_ARG}),
        "quantize bad format -3": (lambda: lib.pqk_quantize(-1, -3, X, 1, k, k, p0, B, NULL, NULL), {ERR_ARG}),
        "quantize bad isa 17": (lambda: lib.pqk_quantize(17, Q40, X, 1, k, k, p0, B, NULL, NULL), {ERR_ARG, ERR_ISA}),
        "quantize bad isa -2": (lambda: lib.pqk_quantize(-2, Q40, X, 1, k, k, p0, B, NULL, NULL), {ERR_ARG, ERR_ISA}),
        "quantize NaN": (lambda: lib.pqk_quantize(-1, Q40, C.ptr(nan_x, "float*"), 1, k, k, p0, B, NULL, NULL),
                         {lib.PQK_ERR_NONFINITE}),
        "quantize int4 group 48": (lambda: lib.pqk_quantize(-1, INT4, X, 1, k, k, C.qparams(48), B, B, B), ARGISH),
        "quantize nf4 group 16": (lambda: lib.pqk_quantize(-1, FID["nf4"], X, 1, k, k, C.qparams(16), B, B, NULL),
                                  ARGISH),
        # dequantize
        "dequantize q NULL": (lambda: lib.pqk_dequantize(-1, Q40, NULL, NULL, NULL, n, k, p0, YK), {ERR_ARG}),
        "dequantize y NULL": (lambda: lib.pqk_dequantize(-1, Q40, Q, NULL, NULL, n, k, p0, NULL), {ERR_ARG}),
        "dequantize k not multiple": (lambda: lib.pqk_dequantize(-1, Q40, Q, NULL, NULL, n, 33, p0, YK),
                                      {ERR_SHAPE}),
        "dequantize negative n": (lambda: lib.pqk_dequantize(-1, Q40, Q, NULL, NULL, -5, k, p0, YK), {ERR_SHAPE}),
        "dequantize bad format": (lambda: lib.pqk_dequantize(-1, 1234, Q, NULL, NULL, n, k, p0, YK), {ERR_ARG}),
        "dequantize bad isa": (lambda: lib.pqk_dequantize(99, Q40, Q, NULL, NULL, n, k, p0, YK), {ERR_ARG, ERR_ISA}),
        # row bytes, pack
        "row_bytes out NULL": (lambda: lib.pqk_row_bytes_of(Q40, k, p0, NULL), {ERR_ARG}),
        "row_bytes params NULL": (lambda: lib.pqk_row_bytes_of(Q40, k, NULL, ffi.new("pqk_row_bytes*")),
                                  {ERR_ARG}),
        "row_bytes bad format": (lambda: lib.pqk_row_bytes_of(lib.PQK_FORMAT_COUNT, k, p0, ffi.new("pqk_row_bytes*")), {ERR_ARG}),
        "row_bytes k=31": (lambda: lib.pqk_row_bytes_of(Q40, 31, p0, ffi.new("pqk_row_bytes*")), {ERR_SHAPE}),
        "active_isa NULL": (lambda: lib.pqk_active_isa(NULL), {ERR_ARG}),
        "pack out NULL": (lambda: lib.pqk_pack(Q40, Q, NULL, NULL, n, k, p0, NULL), {ERR_ARG}),
        "pack q NULL": (lambda: lib.pqk_pack(Q40, NULL, NULL, NULL, n, k, p0, ffi.new("pqk_packed**")), {ERR_ARG}),
        "pack k=48": (lambda: lib.pqk_pack(Q40, Q, NULL, NULL, n, 48, p0, ffi.new("pqk_packed**")), ARGISH),
        "pack negative n": (lambda: lib.pqk_pack(Q40, Q, NULL, NULL, -1, k, p0, ffi.new("pqk_packed**")), ARGISH),
        "pack bad format": (lambda: lib.pqk_pack(42, Q, NULL, NULL, n, k, p0, ffi.new("pqk_packed**")), {ERR_ARG}),
        # matmul_int8
        "int8 w NULL": (lambda: lib.pqk_matmul_int8(-1, NULL, X, 1, k, NULL, Y, n), {ERR_ARG}),
        "int8 x NULL": (lambda: lib.pqk_matmul_int8(-1, packed, NULL, 1, k, NULL, Y, n), {ERR_ARG}),
        "int8 y NULL": (lambda: lib.pqk_matmul_int8(-1, packed, X, 1, k, NULL, NULL, n), {ERR_ARG}),
        "int8 negative m": (lambda: lib.pqk_matmul_int8(-1, packed, X, -1, k, NULL, Y, n), {ERR_SHAPE}),
        "int8 ldx < k": (lambda: lib.pqk_matmul_int8(-1, packed, X, 2, k - 1, NULL, Y, n), ARGISH),
        "int8 ldy < n": (lambda: lib.pqk_matmul_int8(-1, packed, X, 2, k, NULL, Y, n - 1), ARGISH),
        "int8 bad isa": (lambda: lib.pqk_matmul_int8(55, packed, X, 1, k, NULL, Y, n), {ERR_ARG, ERR_ISA}),
        "int8 NaN x": (lambda: lib.pqk_matmul_int8(-1, packed, C.ptr(nan_x, "float*"), 1, k, NULL, Y, n),
                       {lib.PQK_ERR_NONFINITE}),
        # matmul_float
        "float q NULL": (lambda: lib.pqk_matmul_float(-1, Q40, NULL, NULL, NULL, n, k, p0, X, 1, k, NULL, Y, n),
                         {ERR_ARG}),
        "float params NULL": (lambda: lib.pqk_matmul_float(-1, Q40, Q, NULL, NULL, n, k, NULL, X, 1, k, NULL, Y, n),
                              {ERR_ARG}),
        "float k not multiple": (lambda: lib.pqk_matmul_float(-1, Q40, Q, NULL, NULL, n, 40, p0, X, 1, k, NULL, Y,
                                                              n), {ERR_SHAPE}),
        "float negative n": (lambda: lib.pqk_matmul_float(-1, Q40, Q, NULL, NULL, -n, k, p0, X, 1, k, NULL, Y, n),
                             {ERR_SHAPE}),
        "float negative m": (lambda: lib.pqk_matmul_float(-1, Q40, Q, NULL, NULL, n, k, p0, X, -1, k, NULL, Y, n),
                             {ERR_SHAPE}),
        "float bad format": (lambda: lib.pqk_matmul_float(-1, 77, Q, NULL, NULL, n, k, p0, X, 1, k, NULL, Y, n),
                             {ERR_ARG}),
        "float bad isa": (lambda: lib.pqk_matmul_float(8, Q40, Q, NULL, NULL, n, k, p0, X, 1, k, NULL, Y, n),
                          {ERR_ARG, ERR_ISA}),
        # adapters
        "lora rank 0": (lambda: lib.pqk_matmul_int8_lora(-1, packed, X, 1, k, NULL, Y, n, lora(rank=0), 1, NULL),
                        {ERR_ARG}),
        "lora rank -3": (lambda: lib.pqk_matmul_int8_lora(-1, packed, X, 1, k, NULL, Y, n, lora(rank=-3), 1, NULL),
                         {ERR_ARG}),
        "lora A NULL": (lambda: lib.pqk_matmul_int8_lora(-1, packed, X, 1, k, NULL, Y, n, lora(a=NULL), 1, NULL),
                        {ERR_ARG}),
        "lora Bp NULL": (lambda: lib.pqk_matmul_int8_lora(-1, packed, X, 1, k, NULL, Y, n, lora(bp=NULL), 1, NULL),
                         {ERR_ARG}),
        "lora bad dtype": (lambda: lib.pqk_matmul_int8_lora(-1, packed, X, 1, k, NULL, Y, n, lora(dtype=3), 1,
                                                            NULL), {ERR_ARG}),
        "lora adapters NULL, n=1": (lambda: lib.pqk_matmul_int8_lora(-1, packed, X, 1, k, NULL, Y, n, NULL, 1, NULL),
                                    {ERR_ARG}),
        "lora n_adapters -1": (lambda: lib.pqk_matmul_int8_lora(-1, packed, X, 1, k, NULL, Y, n, lora(), -1, NULL),
                               {ERR_ARG}),
        "lora adapter id out of range": (lambda: lib.pqk_matmul_int8_lora(
            -1, packed, X, 4, k, NULL, Y, n, lora(), 1, C.ptr(ids_bad, "int32_t*")), {ERR_ARG}),
        "lora adapter id -2": (lambda: lib.pqk_matmul_int8_lora(
            -1, packed, X, 4, k, NULL, Y, n, lora(), 1, C.ptr(ids_neg, "int32_t*")), {ERR_ARG}),
        "float lora rank 0": (lambda: lib.pqk_matmul_float_lora(-1, Q40, Q, NULL, NULL, n, k, p0, X, 1, k, NULL, Y, n,
                                                                lora(rank=0), 1, NULL), {ERR_ARG}),
        "float lora id out of range": (lambda: lib.pqk_matmul_float_lora(
            -1, Q40, Q, NULL, NULL, n, k, p0, X, 4, k, NULL, Y, n, lora(), 1, C.ptr(ids_bad, "int32_t*")),
            {ERR_ARG}),
        # bad adapters are ARG errors with no rows too, and before a packed float kernel's "too many
        # rows" (a review: OK for m = 0 whatever the adapters, UNSUPPORTED for bad ids at m = 4)
        "int8 lora m=0 rank 0": (lambda: lib.pqk_matmul_int8_lora(-1, packed, NULL, 0, k, NULL, NULL, n,
                                                                  lora(rank=0), 1, NULL), {ERR_ARG}),
        "float lora m=0 n_adapters -5": (lambda: lib.pqk_matmul_float_lora(-1, Q40, Q, NULL, NULL, n, k, p0, NULL, 0,
                                                                           k, NULL, NULL, n, lora(), -5, NULL), {ERR_ARG}),
        "float packed m=0 rank 0": (lambda: lib.pqk_matmul_float_packed(-1, packed, NULL, 0, k, NULL, NULL, n,
                                                                        lora(rank=0), 1, NULL), {ERR_ARG}),
        "float bf16 m=0 A NULL": (lambda: lib.pqk_matmul_float_bf16(-1, packed, NULL, 0, k, NULL, NULL, n,
                                                                    lora(a=NULL), 1, NULL), {ERR_ARG}),
        "float packed id out of range": (lambda: lib.pqk_matmul_float_packed(
            -1, packed, X, 4, k, NULL, Y, n, lora(), 1, C.ptr(ids_bad, "int32_t*")), {ERR_ARG}),
        # sizes whose byte counts would not fit 64 bits (a hostile header): refused, never wrapped
        "row_bytes int4 k=2^62": (lambda: lib.pqk_row_bytes_of(INT4, 1 << 62, C.qparams(-1), ffi.new("pqk_row_bytes*")),
                                  {ERR_SHAPE}),
        "row_bytes int2 k=2^61": (lambda: lib.pqk_row_bytes_of(FID["int2"], 1 << 61, C.qparams(-1),
                                                               ffi.new("pqk_row_bytes*")), {ERR_SHAPE}),
        "pack n=2^62": (lambda: lib.pqk_pack(Q40, Q, NULL, NULL, 1 << 62, 32, p0, ffi.new("pqk_packed**")),
                        {ERR_SHAPE}),
        "pack n x k > 2^56": (lambda: lib.pqk_pack(Q40, Q, NULL, NULL, 1 << 30, 1 << 30, p0, ffi.new("pqk_packed**")),
                              {ERR_SHAPE}),
        "dequantize n=2^62": (lambda: lib.pqk_dequantize(-1, Q40, Q, NULL, NULL, 1 << 62, 32, p0, YK), {ERR_SHAPE}),
        "quantize ldx=2^41": (lambda: lib.pqk_quantize(-1, Q40, X, 2, k, 1 << 41, p0, B, NULL, NULL), {ERR_SHAPE}),
        "int8 m x ldy > 2^56": (lambda: lib.pqk_matmul_int8(-1, packed, X, 1 << 30, k, NULL, Y, 1 << 30), {ERR_SHAPE}),
        "float n=2^62": (lambda: lib.pqk_matmul_float(-1, Q40, Q, NULL, NULL, 1 << 62, k, p0, X, 1, k, NULL, Y, n),
                         {ERR_SHAPE}),
        # rows x summed ranks (8193 adapters of rank 2^31 - 1, 2^24 rows) wrapped int64 to 0: a
        # zero-sized shrink buffer written through (SIGSEGV); the A / B are never read
        "lora rows x ranks beyond the limits": (
            lambda: lib.pqk_matmul_int8_lora(-1, packed, X, 1 << 24, k, NULL, Y, n, huge_ranks, 8193, NULL),
            {ERR_SHAPE}),
        # zero rows still validate the variant
        "quantize n=0 bad isa": (lambda: lib.pqk_quantize(99, Q40, NULL, 0, k, k, p0, NULL, NULL, NULL), {ERR_ARG}),
        "dequantize n=0 bad isa": (lambda: lib.pqk_dequantize(99, Q40, NULL, NULL, NULL, 0, k, p0, NULL), {ERR_ARG}),
        "int8 m=0 bad isa": (lambda: lib.pqk_matmul_int8(99, packed, NULL, 0, k, NULL, NULL, n), {ERR_ARG}),
        "float m=0 bad isa": (lambda: lib.pqk_matmul_float(99, Q40, NULL, NULL, NULL, n, k, p0, NULL, 0, k, NULL, NULL,
                                                           n), {ERR_ARG}),
    }
    for i in unrunnable:
        cases[f"quantize unrunnable isa {i}"] = (
            lambda i=i: lib.pqk_quantize(i, Q40, X, 1, k, k, p0, B, NULL, NULL), {ERR_ISA})
    return cases, keep


_BAD, _KEEP = _bad_cases()


@pytest.mark.parametrize("name", list(_BAD))
def test_bad_input_returns_error_status(name):
    call, expected = _BAD[name]
    st = call()
    msg = C.last_error()
    assert st != lib.PQK_OK, f"{name}: accepted"
    assert st in expected, f"{name}: status {C.STATUS_NAMES.get(st, st)} ({msg!r}), expected one of " \
                           f"{sorted(C.STATUS_NAMES[e] for e in expected)}"
    assert msg.strip(), f"{name}: empty pqk_last_error()"


def test_bad_input_non_status_functions():
    # "" as the header says for string queries with bad arguments (was NULL)
    for s in (lib.pqk_format_name(99), lib.pqk_format_name(-1), lib.pqk_isa_name(-7), lib.pqk_isa_name(1 << 30)):
        assert s != ffi.NULL and C.cstr(s) == ""
    assert lib.pqk_isa_runnable(42) == 0 and lib.pqk_isa_compiled(-5) == 0
    assert lib.pqk_slot_variant(0, ffi.NULL, 0) == -1
    assert lib.pqk_slot_variant(0, b"no_such_slot", 0) == -1
    assert lib.pqk_slot_variant(0, b"quantize", 99) == -1
    assert lib.pqk_slot_variant(99, b"gemm_int8", 0) == -1
    assert lib.pqk_slot_variant(-1, b"gemm_int8", 0) == lib.pqk_slot_variant(_native.active_isa(), b"gemm_int8", 0) >= 0
    p = C.qparams(100)  # nf4 block 100: refused, and params keeps what the caller passed
    assert lib.pqk_row_bytes_of(FID["nf4"], 256, p, ffi.new("pqk_row_bytes*")) == lib.PQK_ERR_ARG
    assert p.group == 100
    p = C.qparams(0)  # success writes the resolved default back
    C.check(lib.pqk_row_bytes_of(FID["nf4"], 256, p, ffi.new("pqk_row_bytes*")))
    assert p.group == 64
    assert lib.pqk_int8_supported(99, 64, C.qparams()) == 0
    assert lib.pqk_int8_supported(FID["q4_0"], 48, C.qparams()) == 0
    assert lib.pqk_int8_supported(FID["q4_0"], 64, ffi.NULL) in (0, 1)
    lib.pqk_packed_free(ffi.NULL)  # no-op
    assert lib.pqk_packed_nbytes(ffi.NULL) <= 0


def test_pack_failure_clears_out_and_zero_columns_are_a_no_op():
    """From a C ABI review: pqk_pack with q NULL left *out as the caller had it (other failures set
    it NULL), and pqk_matmul_float refused n = 0 ("bad m/n") where quantize / dequantize take it."""
    out = ffi.new("pqk_packed**")
    out[0] = ffi.cast("pqk_packed*", 1)
    assert lib.pqk_pack(FID["q4_0"], ffi.NULL, ffi.NULL, ffi.NULL, 4, 32, C.qparams(), out) == lib.PQK_ERR_ARG
    assert out[0] == ffi.NULL
    x, y = np.ones((2, 32), np.float32), np.full((2, 1), 7.0, np.float32)
    q = np.zeros((1, 18), np.uint8)
    st = lib.pqk_matmul_float(-1, FID["q4_0"], C.ptr(q, "void*"), ffi.NULL, ffi.NULL, 0, 32, C.qparams(),
                              C.ptr(x, "float*"), 2, 32, ffi.NULL, C.ptr(y, "float*"), 1)
    assert st == lib.PQK_OK, C.last_error()
    assert (y == 7.0).all()  # nothing written
    st = lib.pqk_matmul_float(-1, FID["q4_0"], C.ptr(q, "void*"), ffi.NULL, ffi.NULL, -1, 32, C.qparams(),
                              C.ptr(x, "float*"), 2, 32, ffi.NULL, C.ptr(y, "float*"), 1)
    assert st == lib.PQK_ERR_SHAPE and "n < 0" in C.last_error()


def test_error_then_success_and_message_per_call():
    """A failing call sets the message; a later good call leaves the library usable."""
    assert lib.pqk_quantize(-1, 99, ffi.NULL, 1, 32, 32, C.qparams(), ffi.NULL, ffi.NULL, ffi.NULL) != 0
    assert C.last_error()
    x = np.ones((1, 32), F32)
    q = np.zeros(18, np.uint8)
    C.check(lib.pqk_quantize(-1, FID["q4_0"], C.ptr(x, "float*"), 1, 32, 32, C.qparams(), C.ptr(q), ffi.NULL,
                             ffi.NULL))
    assert np.array_equal(q, pq.quantize(x, "q4_0").sections()[0].reshape(-1))
    with pytest.raises(C.PqkError, match="PQK_ERR_SHAPE") as ei:
        C.check(lib.pqk_row_bytes_of(FID["q4_0"], 31, C.qparams(), ffi.new("pqk_row_bytes*")))
    assert ei.value.status == lib.PQK_ERR_SHAPE


# ------------------------------------------------------------------ 5. one dispatch state
def test_threads_shared_with_pybind():
    before = pq.get_num_threads()
    try:
        C.check(lib.pqk_set_num_threads(3))
        assert pq.get_num_threads() == 3 == lib.pqk_get_num_threads()
        pq.set_num_threads(1)
        assert lib.pqk_get_num_threads() == 1
        C.check(lib.pqk_set_num_threads(0))  # <= 0: one per CPU
        assert pq.get_num_threads() == lib.pqk_get_num_threads() >= 1
        for n in (1025, 100000, 2**31 - 1):  # refused before any thread starts (100000 ran for minutes)
            assert lib.pqk_set_num_threads(n) == lib.PQK_ERR_ARG
            assert b"above 1024" in ffi.string(lib.pqk_last_error())
        assert pq.get_num_threads() >= 1
    finally:
        pq.set_num_threads(before)
    assert lib.pqk_get_num_threads() == before


_CHILD_THREADS = r'''
import ctypes, os, resource, sys
lib = ctypes.CDLL(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # room for some thread stacks, not 400
st = lib.pqk_set_num_threads(400)
tasks = len(os.listdir("/proc/self/task"))
st2 = lib.pqk_set_num_threads(400)  # a retry must try again, not report the old figure
print(st, lib.pqk_get_num_threads(), tasks, st2, lib.pqk_get_num_threads())
'''


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc (Linux)")
def test_set_num_threads_failure_leaves_a_consistent_pool():
    """When the OS refuses threads, pqk_set_num_threads says NOMEM and the pool stays at one
    thread (it once claimed all n with only some started, and a retry of n did nothing)."""
    env = dict(os.environ)
    env.pop("PYQKERN_ISA", None)
    p = subprocess.run([sys.executable, "-c", _CHILD_THREADS, pq.get_library()], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    st, n, tasks, st2, n2 = map(int, p.stdout.split())
    assert st == st2 == lib.PQK_ERR_NOMEM, p.stdout
    assert n == n2 == 1 and tasks <= 2, p.stdout  # the Python thread (+ none of the pool's)


def test_env_isa_error_is_err_isa():
    """A bad PYQKERN_ISA makes calls with PQK_ISA_ACTIVE return PQK_ERR_ISA (pyqkern.h), with the reason."""
    code = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); i = ctypes.c_int32(); "
            "lib.pqk_last_error.restype = ctypes.c_char_p; "
            "print(lib.pqk_active_isa(ctypes.byref(i)), lib.pqk_last_error().decode())")
    env = dict(os.environ, PYQKERN_ISA="bogus")
    p = subprocess.run([sys.executable, "-c", code, pq.get_library()], capture_output=True, text=True, env=env,
                       timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    st, msg = p.stdout.split(" ", 1)
    assert int(st) == lib.PQK_ERR_ISA and "PYQKERN_ISA=bogus" in msg, p.stdout


def test_private_module_refuses_overflowing_sizes_and_misaligned_arrays():
    """The pybind11 module's own buffer checks: sizes whose byte counts overflow int64 are a
    ValueError (they once wrapped, let a tiny buffer pass and crashed), and float arrays at
    addresses that are not a multiple of 4 are refused (the public API copies them first)."""
    q = np.zeros(64, np.uint8)
    y = np.zeros(64, F32)
    with pytest.raises(ValueError):
        _native.pack(FID["q4_0"], q, None, None, 1 << 62, 32, 0, 0)
    with pytest.raises(ValueError):
        _native.dequantize(-1, FID["q4_0"], q, None, None, 1 << 62, 32, 0, 0, y)
    with pytest.raises(ValueError):
        _native.dequantize(-1, FID["int4"], q, np.zeros(64, np.uint8), None, 1, 1 << 62, -1, 1, y)
    raw = np.zeros(4 * 2 * 32 + 1, np.uint8)
    xm = raw[1:].view(F32).reshape(2, 32)
    assert not xm.flags.aligned
    xm[...] = _rng(3).standard_normal((2, 32))
    with pytest.raises(ValueError, match="aligned"):
        _native.quantize(-1, FID["q4_0"], xm, 0, 0, np.zeros(36, np.uint8), None, None)
    w = pq.quantize(np.ascontiguousarray(xm), "q4_0")
    assert pq.quantize(xm, "q4_0") == w
    for compute in ("int8", "float"):
        assert np.array_equal(pq.matmul(xm, w, compute=compute), pq.matmul(np.ascontiguousarray(xm), w, compute=compute))
    lin = pq.QLinear(w)
    assert np.array_equal(lin(xm), lin(np.ascontiguousarray(xm)))


def test_same_library_instance():
    """cffi's dlopen of get_library() is the file the pybind11 module loaded (not a second copy)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps on this OS")
    real = os.path.realpath(pq.get_library())
    mapped = {line.split(None, 5)[-1].strip() for line in maps.read_text().splitlines() if "libpyqkern" in line}
    assert mapped == {real}, mapped


def test_bias_inside_y_is_read_before_y_is_written():
    """The kernels write y before or while they read the bias: a bias inside y's extent (C
    callers; a review found the Python routes wrong too) gives the same bits as a separate one."""
    r = _rng(7)
    n, k = 37, 256
    qt = pq.quantize((r.standard_normal((n, k)) * 0.2).astype(F32), "q4_0")
    params = C.qparams(0, 0)
    q, s, z = (np.ascontiguousarray(a) if a.size else None for a in qt.sections())
    packed = C.pack(FID["q4_0"], q, s, z, n, k, params)
    bias = r.standard_normal(n).astype(F32)
    for m, row in ((1, 0), (20, 5)):
        x = r.standard_normal((m, k)).astype(F32)
        want = pq.matmul(x, qt, bias, compute="int8")
        y = np.zeros((m, n), F32)
        y[row] = bias
        C.check(lib.pqk_matmul_int8(-1, packed, C.ptr(x, "float*"), m, k, C.ptr(y[row], "float*"),
                                    C.ptr(y, "float*"), n))
        assert np.array_equal(_f32_bits(y), _f32_bits(want)), m
        y = np.zeros((m, n), F32)
        y[row] = bias
        C.check(lib.pqk_matmul_float(-1, FID["q4_0"], C.ptr(q), C.ptr(s), C.ptr(z), n, k, params,
                                     C.ptr(x, "float*"), m, k, C.ptr(y[row], "float*"), C.ptr(y, "float*"), n))
        assert np.allclose(y, pq.matmul(x, qt, bias, compute="float"), rtol=1e-5, atol=1e-5), m
    # the Python routes: out holding the bias, every backend, and QLinear's decode path
    ad = pq.LoRA(r.standard_normal((4, k)).astype(F32) * 0.1, r.standard_normal((n, 4)).astype(F32) * 0.1)
    x = r.standard_normal((1, k)).astype(F32)
    for backend, compute in (("native", "int8"), ("native", "float"), ("numba", "float"), ("reference", "float")):
        want = pq.matmul(x, qt, bias, lora=ad, compute=compute, backend=backend)
        out = bias.copy().reshape(1, n)
        got = pq.matmul(x, qt, out[0], lora=ad, compute=compute, backend=backend, out=out)
        assert np.array_equal(_f32_bits(got), _f32_bits(want)), (backend, compute)
    lin = pq.QLinear(qt, bias)
    lin.add_adapter("a", ad)
    want = lin(x)
    assert np.array_equal(_f32_bits(lin(x, out=lin.bias.reshape(1, n))), _f32_bits(want))
