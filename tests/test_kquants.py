"""q4_k, q6_k and iq4_nl: every implementation gives llama.cpp's bytes.

What is checked
- quantize: every runnable native variant (``isa=``), numba and the NumPy reference give
  identical bytes, on special blocks (zeros of both signs, a single outlier, subnormals, values
  at and near the fp16 maximum, constant blocks, exact ties, sub-blocks whose 6-bit scale rounds
  to 0, values large enough to overflow inside the algorithms) and on hypothesis data (any
  finite float32).
- dequantize: identical bits to ``gguf.quants.dequantize`` on our bytes and on random block
  bytes with finite fp16 scales.
- defining properties: the largest q4_k scale / min is stored as 63 and the largest q6_k scale
  as -128; each code is the nearest grid point (iq4_nl: nearest table entry) up to the rounding
  the format implies; all-zero and subnormal blocks; exact equivariance under power-of-two
  scaling, and q6_k / iq4_nl under negation; round-trip error against simpler formats.

How exactness against llama.cpp was established
1. The C++ reference (csrc/kernels/ref/kquants.cpp), the NumPy oracle
   (pyqkern/reference_kquants.py) and the Numba port were written from a reading of
   llama.cpp's ggml/src/ggml-quants.c (the copy vendored in llama-cpp-python 0.3.36):
   quantize_row_q4_K_ref, quantize_row_q6_K_ref, and quantize_iq4_nl with quant_weights = NULL
   (what llama-quantize runs without --imatrix: q4_k / q6_k then call the _ref functions,
   iq4_nl searches 15 scales, ntry = 7), keeping the order of every float operation.
2. The ``ggml`` fixture below compiles that very file: ``pip download --no-deps --no-binary
   llama-cpp-python llama-cpp-python==0.3.36`` fetches the sdist (cached in pytest's cache
   directory), ggml-quants.c is taken from its vendor/llama.cpp/ggml tree and built with
   ``cc -O2 -ffp-contract=off -DNDEBUG`` (baseline x86-64, no -march: no FMA, as our reference
   kernels) together with a small stub for the four ggml.c symbols it links against, into a
   shared library in a temporary directory, which is called through ctypes (quantize_q4_K,
   quantize_q6_K, quantize_iq4_nl with NULL weights; dequantize_row_*). The tests marked
   "llama_cpp" require every implementation to produce its bytes. No llama.cpp source is kept
   in this repository.
   Environment: PYQKERN_GGML_SRC=<dir containing ggml/src/ggml-quants.c> uses a local llama.cpp
   or ggml checkout instead of the sdist; PYQKERN_LLAMA_CPP_PYTHON overrides the pinned
   requirement; PYQKERN_SKIP_LLAMA_CPP=1 skips these tests (offline machines). They are
   skipped, with the reason, only when the sources cannot be obtained or there is no C compiler.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pyqkern as pq
from pyqkern import reference_kquants as rk
from pyqkern.numba_kernels import kquants as nk

gguf_quants = pytest.importorskip("gguf.quants")
from gguf.constants import GGMLQuantizationType  # noqa: E402

F32 = np.float32
FMTS = ("q4_k", "q6_k", "iq4_nl")
BLOCK = {"q4_k": (256, 144), "q6_k": (256, 210), "iq4_nl": (32, 18)}   # weights, bytes
FP16_FIELDS = {"q4_k": (0, 2), "q6_k": (208,), "iq4_nl": (0,)}
QTYPE = {"q4_k": GGMLQuantizationType.Q4_K, "q6_k": GGMLQuantizationType.Q6_K,
         "iq4_nl": GGMLQuantizationType.IQ4_NL}
IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=F32)
K = 512   # two super-blocks per row, 16 iq4_nl blocks


# ---------------------------------------------------------------- helpers
def quantize(x, fmt, impl=("native", None)):
    backend, isa = impl
    return pq.quantize(np.ascontiguousarray(x, dtype=F32), fmt, backend=backend, isa=isa).data


def blocks_of(data, fmt):
    return np.asarray(data).reshape(-1, BLOCK[fmt][1])


def fp16_field(blocks, off):
    return blocks[:, off:off + 2].copy().view(np.float16).astype(F32)[:, 0]


def dequantize(data, fmt, shape, backend="native", isa=None):
    return pq.dequantize(pq.QTensor.from_bytes(fmt, shape, np.asarray(data).reshape(-1)), backend=backend, isa=isa)


def same_bits(a, b):
    return np.array_equal(np.asarray(a, F32).view(np.uint32), np.asarray(b, F32).view(np.uint32))


def special_rows(k=K):
    """[name, row of k float32] covering the corners of the three algorithms."""
    r = np.random.default_rng(1234)
    g = r.standard_normal(k).astype(F32)
    rows = {
        "zeros": np.zeros(k, F32),
        "neg_zeros": np.full(k, -0.0, F32),
        "mixed_zeros": np.where(np.arange(k) % 3 == 0, F32(-0.0), F32(0.0)).astype(F32),
        "outlier_pos": np.where(np.arange(k) == 37, F32(3.5), F32(0)).astype(F32),
        "outlier_neg": np.where(np.arange(k) == 300, F32(-1e4), F32(0)).astype(F32),
        "outlier_in_gauss": np.where(np.arange(k) == 100, F32(1000), g).astype(F32),
        "subnormal": (r.choice([-1, 1], k) * r.integers(1, 2**23, k) * 2.0**-149).astype(F32),
        "subnormal_and_tiny": np.where(np.arange(k) % 50 == 0, F32(1e-30),
                                       (r.integers(1, 2**23, k) * 2.0**-149).astype(F32)).astype(F32),
        "fp16_max_uniform": r.uniform(-65504, 65504, k).astype(F32),
        "fp16_max_const": np.full(k, 65504, F32),
        "fp16_max_pm": r.choice([-65504.0, 65504.0, 0.0, 65472.0, -65520.0], k).astype(F32),
        "const_pos": np.full(k, 0.7, F32),
        "const_neg": np.full(k, -0.7, F32),
        "positive": r.uniform(1, 2, k).astype(F32),
        "negative": r.uniform(-2, -1, k).astype(F32),
        "halves": (r.integers(-32, 33, k) / 2).astype(F32),
        "table_values": (r.choice(IQ4NL, k) * F32(0.25)).astype(F32),
        "table_midpoints": r.choice(np.concatenate([IQ4NL, (IQ4NL[:-1] + IQ4NL[1:]) / 2]), k).astype(F32),
        # sub-blocks 1e-6 .. 1e8 apart: small ones get a 6-bit scale of 0 (codes kept from the fit)
        "wild_subblock_scales": (g * np.repeat(10.0 ** (np.arange(k // 32) % 8 * 2 - 6), 32)).astype(F32),
        "one_subblock": np.where(np.arange(k) < 32, g * F32(1e4), g * F32(1e-4)).astype(F32),
        "huge": (g * F32(1e30)).astype(F32),
        "max_float": r.choice([3.4e38, -3.4e38, 1.0, 0.0], k).astype(F32),
        "gauss": g,
        "laplace_tiny": (r.laplace(size=k) * 1e-12).astype(F32),
    }
    return rows


SPECIAL = special_rows()
SPECIAL_MATRIX = np.stack(list(SPECIAL.values()))


def scaled_rows(seed, n=4, k=K):
    """Gaussian / Laplace / uniform rows, a random power of ten per 32-block."""
    r = np.random.default_rng(seed)
    kind = seed % 3
    base = (r.standard_normal((n, k)) if kind == 0 else r.laplace(size=(n, k)) if kind == 1
            else r.uniform(-1, 1, (n, k)))
    e = r.uniform(-20, 20, (n, k // 32, 1))
    return (base.reshape(n, -1, 32) * 10.0 ** e).reshape(n, k).astype(F32)


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
any_finite_rows = hnp.arrays(F32, (2, 256), elements=finite_f32)


# ---------------------------------------------------------------- llama.cpp, built from source
LLAMA_CPP_PYTHON = os.environ.get("PYQKERN_LLAMA_CPP_PYTHON", "llama-cpp-python==0.3.36")

# The four symbols of ggml.c that ggml-quants.c links against (written here, not from ggml).
_STUB_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stddef.h>
void ggml_abort(const char *file, int line, const char *fmt, ...) {
    fprintf(stderr, "ggml_abort: %s:%d\n", file, line); abort();
}
static size_t blk(int t) { return t == 12 || t == 14 ? 256 : 32; }
size_t ggml_type_size(int t) {
    switch (t) { case 12: return 144; case 14: return 210; case 20: return 18; }
    fprintf(stderr, "stub: type %d not supported\n", t); abort();
}
size_t ggml_row_size(int t, int64_t ne) { return ggml_type_size(t) * (size_t)ne / blk(t); }
const char *ggml_type_name(int t) { return "?"; }
"""


def _sdist(cache_dir: Path) -> Path:
    """The llama-cpp-python sdist in cache_dir, downloaded with pip if missing."""
    spec = LLAMA_CPP_PYTHON
    pattern = f"llama_cpp_python-{spec.split('==', 1)[1]}.tar.gz" if "==" in spec else "llama_cpp_python-*.tar.gz"
    found = sorted(cache_dir.glob(pattern))
    if found:
        return found[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
           "--retries", "1", "--timeout", "30", "-d", str(cache_dir), spec]
    if importlib.util.find_spec("scikit_build_core") is not None:
        cmd.insert(4, "--no-build-isolation")   # its metadata step needs only scikit-build-core
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot obtain the llama.cpp sources ({spec} sdist): {e}")
    found = sorted(cache_dir.glob(pattern))
    if p.returncode != 0 or not found:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        pytest.skip(f"cannot obtain the llama.cpp sources: `pip download {spec}` failed: {' | '.join(tail)}")
    return found[-1]


def _extract_ggml(sdist: Path, dest: Path) -> Path:
    """The headers under ggml/include and ggml/src, and ggml/src/ggml-quants.c, of the vendored
    llama.cpp -> dest/ggml/..."""
    with tarfile.open(sdist) as tf:
        for m in tf:
            if not m.isfile() or "/vendor/llama.cpp/ggml/" not in m.name:
                continue
            rel = m.name.split("/vendor/llama.cpp/", 1)[1]          # ggml/...
            parts = rel.split("/")
            if ".." in parts:
                continue
            if parts[1] in ("include", "src") and (rel.endswith(".h") or rel == "ggml/src/ggml-quants.c"):
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tf.extractfile(m).read())
    if not (dest / "ggml/src/ggml-quants.c").exists():
        pytest.fail(f"{sdist.name} has no vendor/llama.cpp/ggml/src/ggml-quants.c")
    return dest


class Ggml:
    """ctypes wrapper of llama.cpp's quantize_*(..., quant_weights=NULL) and dequantize_row_*."""

    def __init__(self, path):
        self.lib = lib = ctypes.CDLL(str(path))
        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        self.q = {"q4_k": lib.quantize_q4_K, "q6_k": lib.quantize_q6_K, "iq4_nl": lib.quantize_iq4_nl}
        self.dq = {"q4_k": lib.dequantize_row_q4_K, "q6_k": lib.dequantize_row_q6_K,
                   "iq4_nl": lib.dequantize_row_iq4_nl}
        for f in self.q.values():
            f.argtypes, f.restype = [vp, vp, i64, i64, vp], ctypes.c_size_t
        for f in self.dq.values():
            f.argtypes, f.restype = [vp, vp, i64], None

    def quantize(self, x, fmt):
        x = np.ascontiguousarray(x, dtype=F32)
        n, k = x.shape
        bs, ts = BLOCK[fmt]
        out = np.zeros((n, k // bs * ts), np.uint8)
        size = self.q[fmt](x.ctypes.data, out.ctypes.data, n, k, None)
        assert size == out.size
        return out.reshape(-1)

    def dequantize(self, data, fmt, shape):
        data = np.ascontiguousarray(data, dtype=np.uint8)
        y = np.empty(shape, F32)
        self.dq[fmt](data.ctypes.data, y.ctypes.data, y.size)
        return y


@pytest.fixture(scope="session")
def ggml(request, tmp_path_factory):
    if os.environ.get("PYQKERN_SKIP_LLAMA_CPP"):
        pytest.skip("PYQKERN_SKIP_LLAMA_CPP is set")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler (cc/gcc) to build llama.cpp's ggml-quants.c")
    build = tmp_path_factory.mktemp("llama_cpp")
    src = os.environ.get("PYQKERN_GGML_SRC")
    if src:
        root = Path(src)
        if not (root / "ggml/src/ggml-quants.c").exists():
            pytest.fail(f"PYQKERN_GGML_SRC={src} has no ggml/src/ggml-quants.c")
    else:
        cache = getattr(request.config, "cache", None)
        cache_dir = Path(cache.mkdir("pyqkern_llama_cpp")) if cache is not None else build
        root = _extract_ggml(_sdist(cache_dir), build / "src")
    (build / "stub.c").write_text(_STUB_C)
    lib = build / "libggml_quants_ref.so"
    cmd = [cc, "-O2", "-ffp-contract=off", "-fno-fast-math", "-DNDEBUG", "-std=gnu11", "-fPIC", "-shared",
           "-I", str(root / "ggml/include"), "-I", str(root / "ggml/src"),
           str(root / "ggml/src/ggml-quants.c"), str(build / "stub.c"), "-o", str(lib), "-lm"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        pytest.fail("building llama.cpp's ggml-quants.c failed:\n" + p.stderr[-3000:])
    return Ggml(lib)


# ---------------------------------------------------------------- identical bytes across implementations
def _other(impl):
    """Who an implementation is compared with: the native ref kernel, or (for that one) NumPy."""
    return ("reference", None) if impl == ("native", "ref") else ("native", "ref")


@pytest.mark.parametrize("fmt", FMTS)
def test_special_blocks_identical(impl, fmt):
    assert np.array_equal(quantize(SPECIAL_MATRIX, fmt, impl), quantize(SPECIAL_MATRIX, fmt, _other(impl)))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("seed", range(3))
def test_scaled_random_identical(impl, fmt, seed):
    x = scaled_rows(seed)
    assert np.array_equal(quantize(x, fmt, impl), quantize(x, fmt, _other(impl)))


@pytest.mark.parametrize("fmt", FMTS)
@given(x=any_finite_rows)
def test_any_finite_identical(impl, fmt, x):
    assert np.array_equal(quantize(x, fmt, impl), quantize(x, fmt, _other(impl)))


def test_numba_handles_strided_rows():
    x = scaled_rows(7, n=6)[::2]
    for fmt in FMTS:
        assert np.array_equal(quantize(x, fmt, ("numba", None)), quantize(np.ascontiguousarray(x), fmt))


# ---------------------------------------------------------------- llama.cpp itself
@pytest.mark.parametrize("fmt", FMTS)
def test_llama_cpp_special_and_scaled(ggml, impl, fmt):
    for x in (SPECIAL_MATRIX, scaled_rows(11), scaled_rows(12), scaled_rows(13)):
        with np.errstate(all="ignore"):
            want = ggml.quantize(x, fmt)
        got = quantize(x, fmt, impl)
        bad = np.flatnonzero((blocks_of(got, fmt) != blocks_of(want, fmt)).any(axis=1))
        assert bad.size == 0, f"{fmt}: blocks {bad[:8]} differ from llama.cpp"


@pytest.mark.parametrize("fmt", FMTS)
@given(x=any_finite_rows)
def test_llama_cpp_any_finite(ggml, fmt, x):
    want = ggml.quantize(x, fmt)
    for impl in [("native", v) for v in pq.variants()] + [("numba", None), ("reference", None)]:
        assert np.array_equal(quantize(x, fmt, impl), want), impl


@pytest.mark.parametrize("fmt", FMTS)
def test_llama_cpp_dequantize(ggml, impl, fmt):
    x = np.concatenate([SPECIAL_MATRIX, scaled_rows(21)])
    q = quantize(x, fmt)
    rnd = np.random.default_rng(5).integers(0, 256, q.size, dtype=np.uint8)
    for data in (q, _finite_fp16(rnd, fmt)):
        want = ggml.dequantize(data, fmt, x.shape)
        assert same_bits(dequantize(data, fmt, x.shape, *impl), want)


# ---------------------------------------------------------------- dequantize == gguf
def _finite_fp16(data, fmt):
    """Random block bytes with their fp16 fields made finite (exponent 31 -> 15)."""
    b = blocks_of(np.array(data, copy=True), fmt)
    for off in FP16_FIELDS[fmt]:
        hi = b[:, off + 1]
        b[:, off + 1] = np.where(hi & 0x7C == 0x7C, hi & ~np.uint8(0x40), hi)
    return b.reshape(-1)


def _gguf_dequantize(data, fmt, shape):
    with np.errstate(invalid="ignore", over="ignore"):    # inf fields times 0
        return gguf_quants.dequantize(np.asarray(data).reshape(shape[0], -1), QTYPE[fmt]).reshape(shape)


@pytest.mark.parametrize("fmt", FMTS)
def test_dequantize_our_bytes_equals_gguf(impl, fmt):
    x = np.concatenate([SPECIAL_MATRIX, scaled_rows(31)])
    q = quantize(x, fmt)
    assert same_bits(dequantize(q, fmt, x.shape, *impl), _gguf_dequantize(q, fmt, x.shape))


@pytest.mark.parametrize("fmt", FMTS)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 3), nsb=st.integers(1, 2))
def test_dequantize_random_bytes_equals_gguf(impl, fmt, seed, rows, nsb):
    bs, ts = BLOCK[fmt]
    nblk = nsb * 256 // bs
    data = _finite_fp16(np.random.default_rng(seed).integers(0, 256, rows * nblk * ts, dtype=np.uint8), fmt)
    shape = (rows, nblk * bs)
    assert same_bits(dequantize(data, fmt, shape, *impl), _gguf_dequantize(data, fmt, shape))


# ---------------------------------------------------------------- defining properties
def _moderate_rows():
    """Rows whose fp16 fields stay finite: special rows without overflow, plus scaled data."""
    keep = [v for k_, v in SPECIAL.items() if k_ not in ("huge", "max_float", "wild_subblock_scales")]
    r = np.random.default_rng(77)
    extra = (r.standard_normal((8, K)) * 10.0 ** r.uniform(-3, 3, (8, 1))).astype(F32)
    mild = (r.standard_normal((1, K)) * np.repeat(10.0 ** (np.arange(K // 32) % 8 - 6), 32)).astype(F32)
    return np.concatenate([np.stack(keep), extra, mild])


def test_all_zero_and_subnormal_blocks():
    """All-zero (either sign) and all-subnormal blocks: q6_k is all zero bytes, iq4_nl has d = 0
    and every code 8 (table value 1, the nearest entry to 0); q4_k all zero for zeros. Every
    format dequantizes them to exact zeros."""
    z = np.stack([SPECIAL["zeros"], SPECIAL["neg_zeros"], SPECIAL["mixed_zeros"]])
    sub = np.stack([SPECIAL["subnormal"]])
    for x in (z, sub):
        q6 = quantize(x, "q6_k")
        assert not q6.any()
        nl = blocks_of(quantize(x, "iq4_nl"), "iq4_nl")
        assert not nl[:, :2].any() and (nl[:, 2:] == 0x88).all()
        for fmt in FMTS:
            assert not dequantize(quantize(x, fmt), fmt, x.shape).any(), fmt
    assert not quantize(z, "q4_k").any()


def test_q4_k_fields():
    x = _moderate_rows()
    b = blocks_of(quantize(x, "q4_k"), "q4_k")
    d, dmin = fp16_field(b, 0), fp16_field(b, 2)
    assert np.isfinite(d).all() and np.isfinite(dmin).all() and (d >= 0).all() and (dmin >= 0).all()
    sc, mn = rk.q4k_scales_unpack(b[:, 4:16])
    # the sub-block with the largest fitted scale / min is stored as 63
    assert ((sc == 63).any(axis=1) | (d == 0)).all()
    assert ((mn == 63).any(axis=1) | (dmin == 0)).all()
    # each code is the nearest point of its sub-block grid d_j * q - m_j (clamped to 0..15)
    dj = (d[:, None] * sc.astype(F32)).reshape(-1, 1)
    mj = (dmin[:, None] * mn.astype(F32)).reshape(-1, 1)
    xs = x.reshape(-1, 32)
    y = dequantize(quantize(x, "q4_k"), "q4_k", x.shape).reshape(-1, 32)
    t = (xs + mj) / np.where(dj == 0, 1, dj)
    inside = (dj > 0) & (t >= -0.5) & (t <= 15.5)
    tol = 0.5 * dj * (1 + 1e-5) + 4e-7 * (np.abs(xs) + mj + 15 * dj)
    assert (np.abs(y - xs) <= tol)[inside].all()


def test_q6_k_fields():
    x = _moderate_rows()
    b = blocks_of(quantize(x, "q6_k"), "q6_k")
    d = fp16_field(b, 208)
    sc = b[:, 192:208].view(np.int8)
    assert np.isfinite(d).all()
    # the largest |scale| is stored as -128 (d carries the sign)
    assert ((sc == -128).any(axis=1) | (d == 0)).all()
    dj = (d[:, None] * sc.astype(F32)).reshape(-1, 1)
    xs = x.reshape(-1, 16)
    y = dequantize(quantize(x, "q6_k"), "q6_k", x.shape).reshape(-1, 16)
    t = xs / np.where(dj == 0, 1, dj)
    inside = (dj != 0) & (t >= -32.5) & (t <= 31.5)
    tol = 0.5 * np.abs(dj) * (1 + 1e-5) + 4e-7 * np.abs(xs)
    assert (np.abs(y - xs) <= tol)[inside].all()


def test_iq4_nl_codes_are_nearest_entries():
    """Each code is the table entry nearest to x/d. The codes are chosen with the unrounded
    d, so against the stored fp16 d this holds up to d's rounding (|d - d16| <= 2^-11 |d16|)."""
    x = _moderate_rows()
    b = blocks_of(quantize(x, "iq4_nl"), "iq4_nl")
    d = fp16_field(b, 0).astype(np.float64)
    codes = np.concatenate([b[:, 2:] & 0x0F, b[:, 2:] >> 4], axis=1)
    xs = x.reshape(-1, 32).astype(np.float64)
    err = np.abs(xs[:, :, None] - d[:, None, None] * IQ4NL.astype(np.float64))    # [blocks, 32, 16]
    chosen = np.take_along_axis(err, codes[:, :, None].astype(np.int64), axis=2)[:, :, 0]
    ok = chosen <= err.min(axis=2) + 2.0 ** -9 * np.abs(xs)
    normal = np.abs(d) >= 2.0 ** -14          # fp16 normal: relative rounding <= 2^-11
    assert normal.sum() > len(d) // 2 and ok[normal].all()
    # blocks below ggml's GROUP_MAX_EPS (1e-15): d = 0 and every code 8
    tiny = np.abs(xs).max(axis=1) < 1e-15
    assert tiny.any() and (d[tiny] == 0).all() and (codes[tiny] == 8).all()


def test_iq4_nl_index_tie_rule():
    """best_index_int8: an exact midpoint between two entries resolves to the upper one; values
    at or beyond the ends clamp; NaN gives 15 (its float compares are all false)."""
    mids = ((IQ4NL[:-1] + IQ4NL[1:]) / 2).astype(F32)
    below = np.nextafter(mids, F32(-np.inf))
    v = np.concatenate([mids, below, IQ4NL, [F32(-1000), F32(1000), F32(np.nan)]]).astype(F32)
    want = np.concatenate([np.arange(1, 16), np.arange(0, 15), np.arange(16), [0, 15, 15]])
    assert np.array_equal(rk.iq4nl_index(v), want)
    assert np.array_equal([nk._iq4nl_index(F32(t)) for t in v], want)


@pytest.mark.parametrize("fmt", FMTS)
def test_single_outlier_is_kept(fmt):
    """A block of zeros with one value v: v comes back within fp16 rounding of the scale; the
    zeros stay exact zeros in q4_k (v > 0) and q6_k (iq4_nl has no 0 in its table)."""
    for v in (F32(3.5), F32(-1e4), F32(0.3), F32(65504)):
        x = np.zeros((1, K), F32)
        x[0, 37] = v
        y = dequantize(quantize(x, fmt), fmt, x.shape)
        assert abs(y[0, 37] - v) <= 2.0 ** -10 * abs(v), (fmt, v, y[0, 37])
        rest = np.delete(y[0], 37)
        if fmt == "q6_k" or (fmt == "q4_k" and v > 0):
            assert not rest.any()
        elif fmt == "q4_k":
            assert np.abs(rest).max() <= 2.0 ** -9 * abs(v)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("e", [-2, 3, 12])
def test_power_of_two_scaling_is_exact(fmt, e):
    """Every step of the three algorithms is a ratio, a product or a sum: scaling the input by
    2^e scales the fp16 fields by exactly 2^e and leaves every other byte unchanged (as long
    as the fields stay normal fp16 numbers)."""
    x = np.random.default_rng(e + 100).standard_normal((8, K)).astype(F32)
    a = blocks_of(quantize(x, fmt), fmt)
    b = blocks_of(quantize(x * F32(2.0 ** e), fmt), fmt)
    other = np.ones(a.shape[1], bool)
    for off in FP16_FIELDS[fmt]:
        other[off:off + 2] = False
        assert np.array_equal(fp16_field(a, off).astype(np.float64) * 2.0 ** e, fp16_field(b, off))
    assert np.array_equal(a[:, other], b[:, other])


@pytest.mark.parametrize("fmt", ["q6_k", "iq4_nl"])
def test_negation_flips_only_the_sign_of_d(fmt):
    """q6_k and iq4_nl scale by the element of largest magnitude, signed: quantizing -x gives
    the same codes and scales with d negated. (q4_k, with its min, has no such symmetry.)"""
    r = np.random.default_rng(3)
    blockwise = (r.standard_normal((4, K // 32, 32)) * 10.0 ** r.uniform(-8, 8, (4, K // 32, 1))).reshape(4, K)
    # (no overflow inside the algorithms here: for |x| >~ 1e18 the sums of x^4 overflow and the
    # NaN that ggml then stores as d has no meaningful sign)
    x = np.concatenate([_moderate_rows(), blockwise.astype(F32)])
    a = blocks_of(quantize(x, fmt), fmt).copy()
    b = blocks_of(quantize(-x, fmt), fmt)
    # blocks that take ggml's all-zero path store d = +0 either way (q6_k: the whole block is 0)
    zero_path = ~a.any(axis=1) if fmt == "q6_k" else np.abs(x).reshape(-1, 32).max(axis=1) < 1e-15
    off = FP16_FIELDS[fmt][0]
    a[~zero_path, off + 1] ^= 0x80
    assert np.array_equal(a, b)


def test_roundtrip_error_against_simpler_formats():
    """On Gaussian weights (32 x 1024): q4_k (4.5 bits/weight) beats q4_1 (5), iq4_nl beats
    q4_0 (same size), q6_k is more than 3x better than q4_k. Measured margins: 9%, 11%, 4x."""
    x = np.random.default_rng(2024).standard_normal((32, 1024)).astype(F32)

    def rmse(fmt):
        return float(np.sqrt(np.mean((dequantize(quantize(x, fmt), fmt, x.shape) - x) ** 2)))

    e = {f: rmse(f) for f in ("q4_0", "q4_1", "q4_k", "q6_k", "iq4_nl")}
    assert e["q4_k"] < e["q4_1"] < e["q4_0"]
    assert e["iq4_nl"] < e["q4_0"]
    assert e["q6_k"] * 3 < e["q4_k"]


@pytest.mark.parametrize("fmt", FMTS)
def test_near_fp16_max_fields_finite_and_accurate(fmt):
    """Weights up to the fp16 maximum still give finite fields and the same relative accuracy
    as unit-scale weights (within 5%)."""
    r = np.random.default_rng(9)
    u = r.uniform(-1, 1, (8, K)).astype(F32)
    x = (u * F32(65504)).astype(F32)
    b = blocks_of(quantize(x, fmt), fmt)
    for off in FP16_FIELDS[fmt]:
        assert np.isfinite(fp16_field(b, off)).all()
    rel_big = np.sqrt(np.mean((dequantize(quantize(x, fmt), fmt, x.shape) / F32(65504) - u) ** 2))
    rel_unit = np.sqrt(np.mean((dequantize(quantize(u, fmt), fmt, u.shape) - u) ** 2))
    assert rel_big <= 1.05 * rel_unit


def test_iq4_nl_overflowing_search_gives_x86s_nan_everywhere():
    """|x| near 1e20: the x^2 weights overflow and the scale comes out inf / inf = NaN, as in
    llama.cpp, whose sign bit was the CPU's (set on x86, clear on Arm): x86's on every variant,
    backend and architecture (tests/test_arm_qemu.py compares the Arm bytes)"""
    x = np.full((3, 64), 1e20, np.float32)
    x[:, 1::2] = -5e19
    x[1, :32] *= -1
    x[2] = np.linspace(-3e19, 4e19, 64)
    want = pq.quantize(x, "iq4_nl", backend="reference").data
    d = want.reshape(-1, 18)[:, :2].copy().view(np.uint16).ravel()
    assert (d == 0xFE00).all()
    for v in pq.variants():
        assert np.array_equal(pq.quantize(x, "iq4_nl", isa=v).data, want), v
    pytest.importorskip("numba")
    assert np.array_equal(pq.quantize(x, "iq4_nl", backend="numba").data, want)
