"""Bad input raises an exception that names the problem; odd but valid memory layouts
(transposed, strided, negative strides, misaligned) give exactly the contiguous result."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import pyqkern as pq

F32 = np.float32
FORMATS = ["q4_0", "q4_1", "q8_0", "q4_k", "q6_k", "iq4_nl", "nf4", "int4", "int8", "int2", "int3", "fp4"]
# formats with a kernel in every backend today are exercised widely; the rest ride along
LAYOUT_FORMATS = ["q4_0", "q4_1", "q8_0", "nf4", "int4", "int8", "q4_k", "q6_k", "iq4_nl", "int2", "int3", "fp4"]


def w_ok(n=4, k=256, seed=0):
    return (np.random.default_rng(seed).standard_normal((n, k)) * 0.1).astype(F32)


# ---------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.float64, np.complex64, np.complex128, object, bool],
                         ids=lambda d: np.dtype(d).name)
def test_wrong_dtype_is_type_error(dtype, backend):
    w = np.ones((2, 64), dtype=dtype)
    with pytest.raises(TypeError, match="dtype|float64|float32"):
        pq.quantize(w, "q8_0", backend=backend)


@pytest.mark.parametrize("obj", [[[1.0] * 32], "weights", None, 3.0, memoryview(b"\0" * 128)],
                         ids=["list", "str", "None", "float", "memoryview"])
def test_not_an_array_is_type_error(obj):
    with pytest.raises(TypeError):
        pq.quantize(obj, "q8_0")


def test_format_must_be_str():
    with pytest.raises(TypeError):
        pq.quantize(w_ok(), 0)


# ---------------------------------------------------------------- shapes
@pytest.mark.parametrize("shape", [(256,), (2, 2, 64), (1, 2, 2, 32)], ids=["1d", "3d", "4d"])
def test_wrong_ndim(shape, backend):
    with pytest.raises(ValueError, match="2-D"):
        pq.quantize(np.ones(shape, F32), "q8_0", backend=backend)


def test_zero_dim_array():
    with pytest.raises(ValueError):
        pq.quantize(np.array(1.0, dtype=F32), "q8_0")


@pytest.mark.parametrize("shape", [(0, 64), (4, 0), (0, 0)])
@pytest.mark.parametrize("fmt", ["q4_0", "nf4", "int8"])
def test_zero_size(shape, fmt, backend):
    with pytest.raises(ValueError, match="empty"):
        pq.quantize(np.zeros(shape, F32), fmt, backend=backend)


@pytest.mark.parametrize("fmt,k,opts", [
    ("q4_0", 48, {}), ("q4_1", 33, {}), ("q8_0", 16, {}), ("iq4_nl", 40, {}),
    ("q4_k", 128, {}), ("q6_k", 288, {}), ("nf4", 96, {}), ("nf4", 192, {"group": 128}),
    ("int4", 100, {}), ("int4", 48, {"group": 32}), ("int4", 63, {"group": -1}),
])
def test_k_not_multiple_of_block(fmt, k, opts, backend):
    with pytest.raises(ValueError, match=f"K={k}"):
        pq.quantize(np.ones((2, k), F32), fmt, backend=backend, **opts)


@pytest.mark.parametrize("fmt,opts", [
    ("nf4", {"group": 48}), ("nf4", {"group": 16}), ("nf4", {"group": 8192}), ("nf4", {"group": -1}),
    ("int4", {"group": 8}), ("int4", {"group": 24}), ("int4", {"group": -2}), ("int4", {"group": 1}),
    ("q4_0", {"group": 64}), ("q8_0", {"group": 32}), ("int8", {"group": 128}),
    ("nf4", {"sym": True}), ("q4_0", {"sym": True}), ("int4", {"double_quant": True}),
    ("q8_0", {"double_quant": True}),
])
def test_bad_format_options(fmt, opts, backend):
    with pytest.raises(ValueError, match=fmt):
        pq.quantize(np.ones((2, 4096), F32), fmt, backend=backend, **opts)


# ---------------------------------------------------------------- unknown names
def test_unknown_format():
    with pytest.raises(ValueError, match="unknown format"):
        pq.quantize(w_ok(), "q5_0")
    with pytest.raises(ValueError, match="unknown format"):
        pq.QTensor.from_bytes("Q4_0", (1, 32), b"\0" * 18)


@pytest.mark.parametrize("bad", ["cuda", "Native", "", None])
def test_unknown_backend(bad):
    with pytest.raises(ValueError, match="backend"):
        pq.quantize(w_ok(), "q8_0", backend=bad)
    qt = pq.quantize(w_ok(), "q8_0")
    with pytest.raises(ValueError, match="backend"):
        pq.dequantize(qt, backend=bad)


@pytest.mark.parametrize("bad", ["bogus", "sve", "AVX2", "avx2 "])
def test_unknown_isa(bad):
    with pytest.raises(ValueError, match="variant"):
        pq.quantize(w_ok(), "q8_0", isa=bad)
    qt = pq.quantize(w_ok(), "q8_0")
    with pytest.raises(ValueError, match="variant"):
        pq.dequantize(qt, isa=bad)


@pytest.mark.parametrize("backend_name", ["numba", "reference"])
def test_isa_only_for_native(backend_name):
    with pytest.raises(ValueError, match="native"):
        pq.quantize(w_ok(), "q8_0", backend=backend_name, isa="ref")
    with pytest.raises(ValueError, match="native"):
        pq.dequantize(pq.quantize(w_ok(), "q8_0"), backend=backend_name, isa="ref")


# ---------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_nonfinite_names_the_row(fmt, bad, backend):
    w = w_ok(n=9, k=512)
    w[6, 300] = bad
    w[8, 3] = bad                                    # the first bad row is the one reported
    with pytest.raises(ValueError, match=r"NaN or Inf.*row 6\b"):
        pq.quantize(w, fmt, backend=backend)


@pytest.mark.parametrize("fmt", ["q4_0", "nf4", "int8"])
def test_nonfinite_every_variant(fmt, native_variant):
    w = w_ok(n=64, k=512)
    w[41, 511] = np.nan
    with pytest.raises(ValueError, match=r"row 41\b"):
        pq.quantize(w, fmt, isa=native_variant)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_found_at_every_position(bad, native_variant):
    # each variant's all_finite kernel: every position of rows whose length is not a multiple
    # of its vector width (the tails), and finite extremes that must pass
    for k in (1, 15, 16, 17, 31, 32, 33, 47, 64, 95):
        ok = np.full((1, k), -3.4028235e38, np.float32)
        ok[0, ::2] = 1e-45                           # largest finite and smallest subnormal
        pq.quantize(ok, "int8", isa=native_variant)
        for j in range(k):
            w = ok.copy()
            w[0, j] = bad
            with pytest.raises(ValueError, match=r"NaN or Inf.*row 0\b"):
                pq.quantize(w, "int8", isa=native_variant)
    # and the int8 matmul's check of x (the same kernel, on activations)
    qt = pq.quantize(w_ok(n=16, k=96), "q8_0")
    x = np.ones((3, 96), np.float32)
    x[2, 95] = bad
    with pytest.raises(ValueError, match=r"row 2\b"):
        pq.matmul(x, qt, compute="int8", isa=native_variant)


def test_nonfinite_in_half_inputs():
    w = w_ok(n=3, k=64).astype(np.float16)
    w[1, 1] = np.inf
    with pytest.raises(ValueError, match=r"row 1\b"):
        pq.quantize(w, "q8_0")
    b = (w_ok(n=3, k=64).view(np.uint32) >> 16).astype(np.uint16)
    b[2, 7] = 0x7FC0                                 # bf16 NaN
    with pytest.raises(ValueError, match=r"row 2\b"):
        pq.quantize(b, "q8_0")


# ---------------------------------------------------------------- dequantize argument checks
@pytest.mark.parametrize("obj", [np.zeros((2, 18), np.uint8), b"\0" * 36, None, "q4_0"],
                         ids=["ndarray", "bytes", "None", "str"])
def test_dequantize_needs_qtensor(obj, backend):
    with pytest.raises(TypeError, match="QTensor"):
        pq.dequantize(obj, backend=backend)


# ---------------------------------------------------------------- layouts that must just work
def _layouts(base: np.ndarray):
    """name -> an array equal to ``base`` (any dtype) in value, with a different memory layout."""
    n, k = base.shape
    dt, isz = base.dtype, base.dtype.itemsize
    out = {}
    out["transposed"] = np.ascontiguousarray(base.T).T                  # F-order
    big = np.zeros((n, 2 * k), dt); big[:, ::2] = base
    out["col_strided"] = big[:, ::2]
    tall = np.zeros((2 * n, k), dt); tall[::2] = base
    out["row_strided"] = tall[::2]
    wide = np.zeros((n, k + 5), dt); wide[:, 3:3 + k] = base
    out["row_padded"] = wide[:, 3:3 + k]                                # row stride k+5, offset 3 items
    out["neg_row_stride"] = np.ascontiguousarray(base[::-1])[::-1]
    out["neg_col_stride"] = np.ascontiguousarray(base[:, ::-1])[:, ::-1]
    for off in (1, 2, 3):
        raw = np.zeros(base.nbytes + 8, np.uint8)
        mis = np.ndarray(base.shape, dtype=dt, buffer=raw, offset=off)
        mis[...] = base
        assert mis.ctypes.data % isz == off % isz
        out[f"misaligned_{off}"] = mis
    raw = np.zeros(n * (isz * k + 1) + 8, np.uint8)        # row stride not a multiple of the item size
    odd = np.ndarray(base.shape, dtype=dt, buffer=raw, offset=1, strides=(isz * k + 1, isz))
    odd[...] = base
    out["odd_row_stride"] = odd
    ro = base.copy(); ro.flags.writeable = False
    out["readonly"] = ro
    for name, a in out.items():
        assert a.dtype == dt and np.array_equal(a, base), name
    return out


LAYOUT_NAMES = list(_layouts(np.zeros((2, 32), F32)))


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("fmt", LAYOUT_FORMATS)
def test_odd_layouts_native_variants(fmt, layout, native_variant):
    base = w_ok(n=5, k=512, seed=3)
    x = _layouts(base)[layout]
    want = pq.quantize(base, fmt, isa=native_variant)
    assert pq.quantize(x, fmt, isa=native_variant) == want


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "nf4", "int4"])
def test_odd_layouts_other_backends(fmt, layout, backend):
    base = w_ok(n=3, k=256, seed=4)
    x = _layouts(base)[layout]
    assert pq.quantize(x, fmt, backend=backend) == pq.quantize(base, fmt, backend=backend)


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("kind", ["float16", "bfloat16", "bf16_as_uint16"])
def test_odd_layouts_half_inputs(kind, layout):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    f32 = w_ok(n=3, k=128, seed=5)
    base = {"float16": f32.astype(np.float16), "bfloat16": f32.astype(ml_dtypes.bfloat16),
            "bf16_as_uint16": f32.astype(ml_dtypes.bfloat16).view(np.uint16)}[kind]
    x = _layouts(base)[layout]
    want = pq.quantize(base, "q8_0")
    assert want == pq.quantize(base.astype(F32) if kind != "bf16_as_uint16"
                               else (base.astype(np.uint32) << 16).view(F32), "q8_0")
    assert pq.quantize(x, "q8_0") == want


def test_dequantize_from_misaligned_and_strided_bytes(native_variant):
    base = w_ok(n=4, k=256, seed=6)
    for fmt in ("q4_0", "q8_0", "nf4", "int4", "int8"):
        qt = pq.quantize(base, fmt)
        want = pq.dequantize(qt, isa=native_variant)
        raw = np.zeros(qt.nbytes + 3, np.uint8)
        raw[3:] = qt.data
        mis = pq.QTensor.from_bytes(fmt, qt.shape, raw[3:])        # data at an odd address
        assert np.array_equal(pq.dequantize(mis, isa=native_variant), want), fmt
        spaced = np.zeros(2 * qt.nbytes, np.uint8)
        spaced[::2] = qt.data
        st = pq.QTensor.from_bytes(fmt, qt.shape, spaced[::2])     # non-contiguous byte view
        assert np.array_equal(pq.dequantize(st, isa=native_variant), want), fmt


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "iq4_nl", "q4_k", "q6_k", "int2", "int3", "int4"])
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_weights_beyond_fp16_scales_refused(fmt, backend):
    """Review: finite weights whose scale overflows fp16 were stored as an Inf scale (q4_0 at
    1e6: dequantize Inf / NaN), all-zero blocks (q6_k at 1e20) or a scale clamped to 65504
    (int4 at 1e6: off by ~100%), silently. The bytes stay the origin's (bit-exact), and
    quantize warns, naming the row; weights within the range, and zero / tiny rows, do not."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 256)).astype(np.float32)
    z = np.zeros((3, 256), np.float32)
    z[1, :5] = 1e-30
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pq.quantize(w * np.float32(1000.0), fmt, backend=backend)
        pq.quantize(z, fmt, backend=backend)
    for big in (1e9, 1e20, 3e38):  # beyond every fp16-scaled format (q6_k holds up to ~2^28)
        x = w.copy()
        x[2] = np.clip(x[2] * np.float32(big), -3e38, 3e38)
        with pytest.warns(UserWarning, match=r"row 2 \(1 row in all\): weights too large for the format's fp16 scales"):
            pq.quantize(x, fmt, backend=backend)


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "int2", "int3", "int4", "int8", "iq4_nl", "nf4"])
def test_extreme_weights_raise_no_numpy_warnings(fmt):
    """Review: subnormal weights (1 / d overflows) and weights near 3.4e38 (max - min overflows)
    leaked NumPy RuntimeWarnings from search='mse' and the reference backend; the bytes were right
    (the native ones), only the noise was not. The fp16-range UserWarning stays."""
    for v in (1e-40, 1e-45, 3.3e38):
        w = np.full((2, 256), v, np.float32)
        w[:, ::3] *= np.float32(-0.7)
        for kw in ({"search": "mse"}, {"backend": "reference"}, {}):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("error", RuntimeWarning)
                got = pq.quantize(w, fmt, **kw)
            if "backend" in kw:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    assert got.data.tobytes() == pq.quantize(w, fmt).data.tobytes(), (fmt, v)


def test_scale_range_warning_names_the_weight_row_once():
    """Review: search='mse' (iq4_nl quantizes its blocks as rows) warned twice, once with a block
    index for the row; lora.merge (row chunks) named the row within its chunk and then failed on
    the report (an all-NaN slice)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2, 256)).astype(np.float32)
    w[1] *= np.float32(1e9)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        pq.quantize(w, "iq4_nl", search="mse")
    msgs = [str(m.message) for m in got if "fp16 scales" in str(m.message)]
    assert len(msgs) == 1 and msgs[0].startswith("iq4_nl: row 1 (1 row in all)"), msgs
    qt = pq.quantize(rng.standard_normal((8, 64)).astype(np.float32), "q4_0")
    B = np.zeros((8, 1), np.float32)
    B[6] = 1e9
    ad = pq.LoRA(np.ones((1, 64), np.float32), B, alpha=1)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        merged, rep = pq.lora.merge(qt, ad, chunk_rows=4)
    msgs = [str(m.message) for m in got if "fp16 scales" in str(m.message)]
    assert len(msgs) == 1 and msgs[0].startswith("q4_0: row 6 (1 row in all)"), msgs
    assert rep.worst_row == 6 and pq.lora.unmerge(merged, rep) is qt
