"""matmul / QLinear against the NumPy specification (pyqkern.reference).

compute="int8": every native variant must equal reference.matmul_int8 bit for bit (the spec
fixes activation quantization, integer sums and the order of the float accumulation).
compute="float": within fp32 accumulation error of x @ dequantize(W).T:
    |y - y_ref| <= K * 2^-23 * (|x| @ |W|.T)   (elementwise)
Weights come from random block bytes (every ggml/int format field exercised, any finite fp16
scale) as well as from pq.quantize.
"""
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pyqkern as pq
from pyqkern import reference as R

VARIANTS = pq.variants()
try:
    import numba  # noqa: F401

    _HAVE_NUMBA = True
except ImportError:  # the hypothesis float test runs without the Numba backend then
    _HAVE_NUMBA = False
FORMATS = ["q4_0", "q4_1", "q8_0", "q4_k", "q6_k", "iq4_nl", "nf4", "int4", "int8", "int2", "int3", "fp4"]
BLOCK = {"q4_k": 256, "q6_k": 256}
F16_SCALE_OFFSETS = {"q4_0": (18, [0]), "iq4_nl": (18, [0]), "q4_1": (20, [0, 2]), "q8_0": (34, [0]),
                     "q4_k": (144, [0, 2]), "q6_k": (210, [208])}


def random_qtensor(fmt, n, k, rng, **params):
    """A QTensor of fmt built from random bytes with sane finite scales."""
    if fmt in F16_SCALE_OFFSETS:
        bs, offs = F16_SCALE_OFFSETS[fmt]
        blk = BLOCK.get(fmt, 32)
        b = rng.integers(0, 256, size=(n * k // blk, bs), dtype=np.uint8)
        for o in offs:
            d = (rng.uniform(0.001, 0.1, size=b.shape[0]) * rng.choice([-1, 1], size=b.shape[0])).astype(np.float16)
            b[:, o:o + 2] = d.view(np.uint8).reshape(-1, 2)
        return pq.QTensor.from_bytes(fmt, (n, k), b.ravel())
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 1.0, size=(n, 1))).astype(np.float32)
    return pq.quantize(w, fmt, **params)


def assert_float_close(y, x, wd, bias=None):
    ref = x.astype(np.float64) @ wd.T.astype(np.float64)
    if bias is not None:
        ref = ref + bias
    k = x.shape[1]  # the documented bound (_matmul.py), its underflow term included (no slack)
    bound = k * 2.0 ** -23 * (np.abs(x).astype(np.float64) @ np.abs(wd).T.astype(np.float64)) + k * 2.0 ** -149
    if bias is not None:
        bound = bound + np.abs(ref) * 2.0 ** -23
    err = np.abs(y - ref)
    assert (err <= bound).all(), f"max err {err.max()} vs bound at that point {bound.flat[err.argmax()]}"


def bits_equal(a, b):
    return np.array_equal(np.ascontiguousarray(a).view(np.uint32), np.ascontiguousarray(b).view(np.uint32))


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=8)
@given(m=st.sampled_from([1, 2, 3, 7, 8, 9, 31, 33, 65]),
       nb=st.integers(1, 3), n=st.sampled_from([1, 5, 16, 17, 33]), use_bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_int8_all_variants_equal_spec(fmt, m, nb, n, use_bias, seed):
    rng = np.random.default_rng(seed)
    k = nb * BLOCK.get(fmt, 32) * (2 if fmt in ("nf4", "fp4") else 1) * (4 if fmt in ("int2", "int3", "int4") else 1)
    qt = random_qtensor(fmt, n, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[rng.random((m, k)) < 0.01] *= 50  # outliers
    bias = rng.standard_normal(n).astype(np.float32) if use_bias else None
    spec = pq.matmul(x, qt, bias, compute="int8", backend="reference")
    for v in VARIANTS:
        y = pq.matmul(x, qt, bias, compute="int8", isa=v)
        assert bits_equal(y, spec), f"{fmt} variant {v} differs from the spec"
    # The int8 result differs from the float one by the activation rounding (|x - dx*xq| <=
    # dx/2 per element), for nf4 / fp4 the 1/127 rounding of their code books (|wd - w8|), and fp32
    # rounding of the block products: a * (u - o) and the min term m are separate products (as in
    # llama.cpp), so that rounding is relative to |a (u - o)| + |m|, which exceeds |w| where they
    # cancel (a block of weights d * u + m == 0 exactly: int8 gave 5e-4 where |w| @ |x| is 0).
    wd = pq.dequantize(qt).astype(np.float64)
    q, s, z = qt.sections()
    blk, u, a, o, mm = R.decompose(fmt, q, s, z, k, qt.group, qt.sym)
    au = np.repeat(a, blk, axis=1) * (u - np.repeat(o, blk, axis=1))
    w8 = au + (0 if mm is None else np.repeat(mm, blk, axis=1))
    parts = np.maximum(np.abs(wd), np.abs(au) + (0 if mm is None else np.abs(np.repeat(mm, blk, axis=1))))
    _, dx = R.quantize_activations(x)
    half_dx = np.repeat(dx.astype(np.float64) / 2, 32, axis=1)
    exact = x.astype(np.float64) @ wd.T + (bias if use_bias else 0)
    bound = (half_dx @ np.abs(w8).T + np.abs(x).astype(np.float64) @ np.abs(wd - w8).T
             + 1e-5 * (np.abs(x).astype(np.float64) @ parts.T + (np.abs(bias) if use_bias else 0)) + 1e-6)
    assert (np.abs(spec - exact) <= bound).all()


INT8_GEMV_CASES = [(f, {}) for f in FORMATS if f not in ("int2", "int3", "int4")] + \
    [(f, {"group": g, "sym": sym}) for f in ("int2", "int3", "int4") for g in (32, 128, -1) for sym in (False, True)] + \
    [("int4", {"group": g, "sym": sym}) for g in (64, 256) for sym in (False, True)]


@pytest.mark.parametrize("fmt,params", INT8_GEMV_CASES,
                         ids=[f + "".join(f"-{k}{v}" for k, v in p.items()) for f, p in INT8_GEMV_CASES])
def test_int8_gemv_all_variants_equal_spec(fmt, params):
    """Decode sizes (M = 1, 2) take their own kernels on several variants: every format and
    parameterisation, a partial last tile, bias, against the spec bit for bit, over tile ranges
    whose ends depend on the thread count: N = 63 (4 tiles, the last partial), 16 * 36 - 5 (at 1
    thread the last group of 16 tiles ends in the partial one), 531 (2 threads: ranges of 4-5
    tiles). y is written into a longer buffer whose tail must stay untouched."""
    rng = np.random.default_rng(zlib.crc32(repr((fmt, params)).encode()))
    k = 256 * (2 if fmt in ("nf4", "fp4") else 1)
    before = pq.get_num_threads()
    try:
        for n in (41, 63, 16 * 36 - 5, 531):
            qt = random_qtensor(fmt, n, k, rng, **params)
            bias = rng.standard_normal(n).astype(np.float32)
            for m in (1, 2):
                x = rng.standard_normal((m, k)).astype(np.float32)
                x[0, :: 17] *= 40
                for b in (None, bias):
                    spec = pq.matmul(x, qt, b, compute="int8", backend="reference")
                    for th in (1, 2):
                        pq.set_num_threads(th)
                        for v in VARIANTS:
                            buf = np.full(m * n + 32, 1234.5, np.float32)
                            got = pq.matmul(x, qt, b, compute="int8", isa=v, out=buf[:m * n].reshape(m, n))
                            assert bits_equal(got, spec), (fmt, params, n, m, th, v)
                            assert (buf[m * n:] == 1234.5).all(), ("wrote past y", fmt, params, n, m, th, v)
    finally:
        pq.set_num_threads(before)


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=6, deadline=None)
@given(m=st.sampled_from([1, 2, 3, 7, 8, 9, 31, 33, 65]), nb=st.integers(1, 3), n=st.sampled_from([1, 7, 16, 19, 33]),
       use_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_float_within_bound(fmt, m, nb, n, use_bias, seed):
    """compute="float" on every variant, the reference and (where installed) Numba: the issue's
    M set, K at one to three block edges, N not a multiple of a tile, bias or not, outliers."""
    rng = np.random.default_rng(seed)
    k = BLOCK.get(fmt, 32) * (2 if fmt in ("nf4", "fp4") else 1) * (4 if fmt in ("int2", "int3", "int4") else 1) * nb
    qt = random_qtensor(fmt, n, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[rng.random((m, k)) < 0.01] *= 50  # outliers
    bias = rng.standard_normal(n).astype(np.float32) if use_bias else None
    wd = pq.dequantize(qt, backend="reference")
    for v in VARIANTS:
        assert_float_close(pq.matmul(x, qt, bias, compute="float", isa=v), x, wd, bias)
    assert_float_close(pq.matmul(x, qt, bias, compute="float", backend="reference"), x, wd, bias)
    if _HAVE_NUMBA:
        assert_float_close(pq.matmul(x, qt, bias, compute="float", backend="numba"), x, wd, bias)


@pytest.mark.parametrize("params", [dict(group=16), dict(group=32, sym=True), dict(group=-1), dict(group=256)])
def test_int4_groups(params):
    rng = np.random.default_rng(0)
    k = 512
    qt = random_qtensor("int4", 19, k, rng, **params)
    x = rng.standard_normal((5, k)).astype(np.float32)
    wd = pq.dequantize(qt)
    assert_float_close(pq.matmul(x, qt, compute="float"), x, wd)
    if params["group"] == 16:  # activation blocks of 32 span two weight groups: float only
        with pytest.raises(ValueError, match="int8"):
            pq.matmul(x, qt, compute="int8")
        assert bits_equal(pq.matmul(x, qt), pq.matmul(x, qt, compute="float"))  # auto -> float
    else:
        spec = pq.matmul(x, qt, compute="int8", backend="reference")
        for v in VARIANTS:
            assert bits_equal(pq.matmul(x, qt, compute="int8", isa=v), spec)


def test_int4_zero_points_above_15_int8_all_variants():
    """int4's zero points are bytes: one above 15 (an imported or damaged file; quantize keeps them
    <= 15) takes AVX2's GEMM off its int16 offset start (a pair sum could leave int16) for its
    tile, and at 32 rows or more off its codes unpacked as c - o (they would not fit a signed
    byte); the other tiles keep them. Every variant equals the reference spec, at M > 2 (GEMM)."""
    rng = np.random.default_rng(3)
    qt = pq.quantize(rng.standard_normal((40, 256)).astype(np.float32), "int4", group=128)
    q, s, z = (np.ascontiguousarray(a).copy() for a in qt.sections())
    z = z.reshape(-1)
    z[5], z[17] = 200, 16   # rows 2 and 8: tile 0; tiles 1 and 2 keep offsets <= 15
    bad = pq.QTensor(qt.format, qt.shape, np.concatenate([q.reshape(-1), s.reshape(-1).view(np.uint8), z]),
                     qt.params)
    for m in (3, 7, 37):
        x = rng.standard_normal((m, 256)).astype(np.float32)
        spec = pq.matmul(x, bad, compute="int8", backend="reference")
        for v in VARIANTS:
            assert bits_equal(pq.matmul(x, bad, compute="int8", isa=v), spec), (v, m)


def float_same_bits_any_threads(x, qt, bias, v):
    """compute="float" on variant v with 1, 2 and 3 threads: the same bits; returns the result."""
    outs = []
    for th in (1, 2, 3):
        pq.set_num_threads(th)
        outs.append(pq.matmul(x, qt, bias, compute="float", isa=v))
    assert all(bits_equal(o, outs[0]) for o in outs), v
    return outs[0]


CHUNK_CASES = [("q4_0", {}, 1056), ("q4_1", {}, 4096), ("q8_0", {}, 544), ("iq4_nl", {}, 1056), ("q4_k", {}, 768),
               ("q6_k", {}, 1280), ("nf4", {"group": 64}, 1088), ("nf4", {"group": 1024}, 2048), ("fp4", {"group": 128}, 640),
               ("int4", {"group": 128}, 1152), ("int4", {"group": -1}, 1000), ("int4", {"group": 16}, 528),
               ("int3", {"group": 64}, 576), ("int3", {"group": -1}, 1032), ("int2", {"group": 32}, 544),
               ("int2", {"group": -1}, 1028), ("int8", {}, 1037)]


@pytest.mark.parametrize("fmt,params,k", CHUNK_CASES, ids=[f"{f}-{p.get('group', '')}-{k}" for f, p, k in CHUNK_CASES])
def test_float_few_rows_in_k_chunks(fmt, params, k):
    """compute="float" with M <= 4 and K > 512 takes each row group in K chunks (L1-sized): within
    the bound on every variant, with bias and with adapters, and the same bits for any thread count."""
    rng = np.random.default_rng(k)
    n = 21
    qt = random_qtensor(fmt, n, k, rng, **params)
    wd = pq.dequantize(qt, backend="reference")
    bias = rng.standard_normal(n).astype(np.float32)
    A = rng.standard_normal((4, k)).astype(np.float32) * 0.1
    B = rng.standard_normal((n, 4)).astype(np.float32) * 0.1
    ad = pq.LoRA(A, B, alpha=4)
    wl = wd + (B @ A) * np.float32(ad.scale)
    before = pq.get_num_threads()
    try:
        for m in (1, 2, 4):
            x = rng.standard_normal((m, k)).astype(np.float32)
            for v in VARIANTS:
                assert_float_close(float_same_bits_any_threads(x, qt, bias, v), x, wd, bias)
                ya = pq.matmul(x, qt, compute="float", isa=v, lora=ad)
                err = np.abs(ya - x.astype(np.float64) @ wl.T.astype(np.float64))
                bound = 2 * k * 2.0 ** -23 * (np.abs(x).astype(np.float64) @ (np.abs(wd) + np.abs(wl - wd)).T) + 1e-6
                assert (err <= bound).all(), (v, m, float(err.max()))
    finally:
        pq.set_num_threads(before)


PANEL_CASES = [("q4_0", {}, 800), ("q8_0", {}, 288), ("q4_k", {}, 512), ("nf4", {"group": 64}, 320),
               ("int4", {"group": 128}, 640), ("int4", {"group": -1}, 262), ("int8", {}, 257), ("int3", {"group": -1}, 24)]


@pytest.mark.parametrize("fmt,params,k", PANEL_CASES, ids=[f"{f}-{k}" for f, _, k in PANEL_CASES])
def test_float_many_rows_panel(fmt, params, k):
    """compute="float" with M >= 16: the panel kernel where the variant has one (K in blocks of 256,
    panels of 32 rows, weight rows in 8s): within the bound on every variant for M across panel
    edges, N not a multiple of 8, K across the block edge; bias, adapters; any thread count."""
    rng = np.random.default_rng(k)
    n = 19
    qt = random_qtensor(fmt, n, k, rng, **params)
    wd = pq.dequantize(qt, backend="reference")
    bias = rng.standard_normal(n).astype(np.float32)
    ad = pq.LoRA(rng.standard_normal((3, k)).astype(np.float32), rng.standard_normal((n, 3)).astype(np.float32),
                 alpha=3)
    before = pq.get_num_threads()
    try:
        for m in (16, 31, 32, 33, 70, 530):   # 530: two passes of 512 rows
            x = rng.standard_normal((m, k)).astype(np.float32)
            x[m // 2, : min(k, 4)] = [1e20, -1e20, 1e-30, 0.0][: min(k, 4)]
            for v in VARIANTS:
                assert_float_close(float_same_bits_any_threads(x, qt, bias, v), x, wd, bias)
                # adapters on this path: the base part is the same call, the expansion as in other paths
                xa = rng.standard_normal((m, k)).astype(np.float32)
                delta = pq.matmul(xa, qt, compute="float", isa=v, lora=ad) - pq.matmul(xa, qt, compute="float", isa=v)
                want = (xa.astype(np.float64) @ ad.A.astype(np.float64).T) @ ad.B.T.astype(np.float64) * ad.scale
                assert np.allclose(delta, want, rtol=1e-4, atol=1e-4 * np.abs(want).max()), (v, m)
    finally:
        pq.set_num_threads(before)


def test_float_many_rows_adapter_ids_across_passes():
    """M > 512 rows in two passes of the float path, each row with its own adapter (or none): every
    row's adapter delta as computed for that row alone."""
    rng = np.random.default_rng(5)
    n, k, m = 24, 96, 530
    lin = pq.QLinear(random_qtensor("q8_0", n, k, rng), compute="float")
    ads = [pq.LoRA(rng.standard_normal((r, k)).astype(np.float32), rng.standard_normal((n, r)).astype(np.float32),
                   alpha=2 * r) for r in (2, 4, 6)]
    for i, ad in enumerate(ads):
        lin.add_adapter(f"a{i}", ad)
    x = rng.standard_normal((m, k)).astype(np.float32)
    ids = rng.integers(-1, 3, m).astype(np.int32)
    ids[0], ids[-1] = 2, 1
    delta = lin(x, adapter_ids=ids) - lin(x, adapter_ids=np.full(m, -1, np.int32))
    for i in range(m):
        want = np.zeros(n) if ids[i] < 0 else \
            (x[i].astype(np.float64) @ ads[ids[i]].A.T.astype(np.float64)) @ ads[ids[i]].B.T.astype(np.float64) * ads[ids[i]].scale
        assert np.allclose(delta[i], want, rtol=1e-4, atol=1e-4 * (1 + np.abs(want).max())), i


def test_thread_count_does_not_change_results():
    rng = np.random.default_rng(1)
    qt = random_qtensor("q4_0", 300, 1024, rng)
    x = rng.standard_normal((37, 1024)).astype(np.float32)
    before = pq.get_num_threads()
    try:
        outs = {}
        for th in (1, 2, 3, 5):
            pq.set_num_threads(th)
            outs[th] = (pq.matmul(x, qt, compute="int8"), pq.matmul(x, qt, compute="float"))
        for th in outs:
            assert bits_equal(outs[th][0], outs[1][0]) and bits_equal(outs[th][1], outs[1][1])
    finally:
        pq.set_num_threads(before)


def test_shapes_dtypes_out_and_qlinear():
    rng = np.random.default_rng(2)
    qt = random_qtensor("int4", 40, 256, rng)
    bias = rng.standard_normal(40).astype(np.float32)
    x = rng.standard_normal((2, 3, 256)).astype(np.float32)
    y = pq.matmul(x, qt, bias)
    assert y.shape == (2, 3, 40) and y.dtype == np.float32
    assert bits_equal(y.reshape(6, 40), pq.matmul(x.reshape(6, 256), qt, bias))
    # 1-D x
    assert pq.matmul(x[0, 0], qt).shape == (40,)
    # float16 / bfloat16 activations are converted exactly
    xh = x.astype(np.float16)
    assert bits_equal(pq.matmul(xh, qt), pq.matmul(xh.astype(np.float32), qt))
    import ml_dtypes
    xb = x.astype(ml_dtypes.bfloat16)
    assert bits_equal(pq.matmul(xb, qt), pq.matmul(xb.astype(np.float32), qt))
    # non-contiguous x (column slice, transposed) gives the same as a contiguous copy
    big = rng.standard_normal((300, 9)).astype(np.float32)
    xt = big[:256, :].T  # (9, 256) non-contiguous
    assert bits_equal(pq.matmul(xt, qt), pq.matmul(np.ascontiguousarray(xt), qt))
    xs = rng.standard_normal((6, 512)).astype(np.float32)[:, ::2]
    assert bits_equal(pq.matmul(xs, qt), pq.matmul(np.ascontiguousarray(xs), qt))
    # out=
    out = np.empty((2, 3, 40), np.float32)
    r = pq.matmul(x, qt, bias, out=out)
    assert r is out and bits_equal(out, y)
    # M = 0
    assert pq.matmul(np.zeros((0, 256), np.float32), qt).shape == (0, 40)
    # QLinear: prepacked once, same result as matmul
    lin = pq.QLinear(qt, bias)
    assert bits_equal(lin(x), y)
    assert lin.packed_nbytes > 0 and lin.weight is qt
    assert "int4" in repr(lin)


def test_bad_input():
    rng = np.random.default_rng(3)
    qt = random_qtensor("q4_0", 16, 64, rng)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="K=32"):
        pq.matmul(np.zeros((2, 32), np.float32), qt)
    with pytest.raises(TypeError):
        pq.matmul(x.astype(np.int32), qt)
    with pytest.raises(TypeError):
        pq.matmul(x, "not a qtensor")
    with pytest.raises(TypeError):
        pq.matmul([[1.0] * 64], qt)
    with pytest.raises(ValueError, match="compute"):
        pq.matmul(x, qt, compute="fast")
    with pytest.raises(ValueError, match="bias"):
        pq.matmul(x, qt, np.zeros(15, np.float32))
    with pytest.raises(ValueError, match="out"):
        pq.matmul(x, qt, out=np.empty((2, 15), np.float32))
    with pytest.raises(TypeError):
        pq.matmul(x, qt, out=np.empty((2, 16), np.float64))
    with pytest.raises(ValueError):
        pq.matmul(x, qt, out=np.empty((16, 2), np.float32).T)
    # out over the weight's own bytes: the float kernels read them while writing y (a review: errors
    # of 1e6 from M = 5 on), so refused on every route (QLinear's int8 fast path reads its packed copy)
    q2 = pq.QTensor.from_bytes(qt.format, qt.shape, qt.data.copy())
    over = q2.data[:2 * 16 * 4].view(np.float32).reshape(2, 16)
    for compute in ("float", "int8"):
        with pytest.raises(ValueError, match="overlaps the weight"):
            pq.matmul(x, q2, compute=compute, out=over)
    # NaN/Inf: int8 cannot quantize them -> error naming the row; float propagates (IEEE)
    xn = x.copy()
    xn[1, 5] = np.nan
    with pytest.raises(ValueError, match="row 1"):
        pq.matmul(xn, qt, compute="int8")
    yf = pq.matmul(xn, qt, compute="float")
    assert np.isnan(yf[1]).all() and np.isfinite(yf[0]).all()
    xi = x.copy()
    xi[0, 0] = np.inf
    with pytest.raises(ValueError):
        pq.matmul(xi, qt, compute="int8")


def test_matmul_releases_gil_and_is_thread_safe():
    import threading

    rng = np.random.default_rng(4)
    qt = random_qtensor("q8_0", 256, 1024, rng)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    want = pq.matmul(x, qt)
    results, errors = [], []

    def run():
        try:
            for _ in range(5):
                results.append(pq.matmul(x, qt))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=run) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert len(results) == 15 and all(bits_equal(r, want) for r in results)


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "nf4", "int4", "int8"])
def test_numba_backend_float_matmul(fmt):
    pytest.importorskip("numba")
    rng = np.random.default_rng(5)
    qt = random_qtensor(fmt, 24, 256, rng)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    assert_float_close(pq.matmul(x, qt, backend="numba"), x, pq.dequantize(qt))
    with pytest.raises(NotImplementedError):
        pq.matmul(x, qt, compute="int8", backend="numba")


def test_activation_quantization_edges_all_variants():
    """Activations with .5 ties after scaling, zeros, tiny and huge values: every variant's int8
    result equals the spec (the quantized activations feed every integer sum)."""
    rng = np.random.default_rng(6)
    k = 128
    qt = random_qtensor("q8_0", 17, k, rng)
    x = np.zeros((6, k), np.float32)
    x[0] = rng.standard_normal(k)
    x[1, :32] = 127.0
    x[1, 32:64] = (np.arange(32) - 16) + 0.5          # ties once scaled by 1/dx with amax 127
    x[1, 40] = 127.0
    x[2, :] = 1e-39                                    # subnormal activations
    x[3, ::3] = _int8_x_max(qt)                        # the largest magnitude int8 takes here
    x[4, 5] = -1.0                                     # single negative outlier
    x[5] = np.float32(1.0) / 3
    spec = pq.matmul(x, qt, compute="int8", backend="reference")
    for v in VARIANTS:
        assert bits_equal(pq.matmul(x, qt, compute="int8", isa=v), spec), v


def _int8_x_max(qt):
    """the largest float32 below compute=int8's limit for qt's x (reference.int8_x_exp_limit)"""
    q, s, z = qt.sections()
    e = R.int8_x_exp_limit(qt.format, q, s, z, qt.shape[1], qt.params.get("group"), qt.params.get("sym"))
    return np.nextafter(np.float32(2.0) ** (e - 127), np.float32(0)) if e < 255 else np.finfo(np.float32).max


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "q4_k", "q6_k", "iq4_nl", "nf4", "int4", "int8"])
def test_int8_refuses_x_whose_scale_products_overflow(fmt):
    """Review: a block scale of 65504 times dx for |x| ~ 1e36 overflowed to Inf, times a block
    sum of 0 made NaN (float compute: 0.48); q4_1's dx * block sum overflowed for |x| ~ 2e37
    with small weights (Inf for 9.6e35). compute=int8 now refuses x at or above a limit from the
    weight's largest scale and min, on every variant and the reference alike, and takes x just
    below it with finite results."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    w[3, :32] *= 1e4 if fmt in ("q4_0", "q8_0") else 1.0   # one large block scale
    qt = pq.quantize(w, fmt, **({"group": 32} if fmt == "int4" else {}))
    top = _int8_x_max(qt)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    x[1, 7] = top
    spec = pq.matmul(x, qt, compute="int8", backend="reference")
    assert np.isfinite(spec).all()
    for v in VARIANTS:
        assert bits_equal(pq.matmul(x, qt, compute="int8", isa=v), spec), v
    if top < np.finfo(np.float32).max:
        x[2, 100] = -np.nextafter(top, np.float32(np.inf))
        for kw in [{"backend": "reference"}] + [{"isa": v} for v in VARIANTS]:
            with pytest.raises(ValueError, match=r"magnitude 2\^\d+ or more \(row 2\)"):
                pq.matmul(x, qt, compute="int8", **kw)
        assert np.isfinite(pq.matmul(x, qt, compute="float")).all()
    x[2, 100] = np.nan
    for kw in [{"backend": "reference"}] + [{"isa": v} for v in VARIANTS]:
        with pytest.raises(ValueError, match=r"NaN or Inf \(row 2\)"):
            pq.matmul(x, qt, compute="int8", **kw)


def test_int8_names_a_weight_with_inf_scales():
    """q4_0 of values near the float32 limit stores Inf fp16 scales (with a warning, as ggml does):
    compute=int8 refuses any nonzero x, and says the weight is the cause, not x (a C ABI review:
    the message blamed x = 0.5 for being 2^-126 or more)."""
    w = np.full((16, 64), 1e38, np.float32)
    with pytest.warns(UserWarning, match="too large"):
        qt = pq.quantize(w, "q4_0")
    x = np.full((2, 64), 0.5, np.float32)
    for kw in [{"backend": "reference"}] + [{"isa": v} for v in VARIANTS]:
        with pytest.raises(ValueError, match="the weight has Inf or NaN scales"):
            pq.matmul(x, qt, compute="int8", **kw)
    x[0, 3] = np.nan  # NaN in the first row refused is still named as such
    with pytest.raises(ValueError, match=r"x contains NaN or Inf \(row 0\)"):
        pq.matmul(x, qt, compute="int8")


def test_activation_quantization_block_groups_all_variants():
    """Rows of 33 blocks (kernels may take 16 blocks at a time, then a tail), each block drawn
    from zeros, -0, subnormals, huge values, ties and plain values: every variant's int8 result
    equals the spec bit for bit."""
    rng = np.random.default_rng(16)
    k = 32 * 33
    qt = random_qtensor("q8_0", 19, k, rng)
    x = rng.standard_normal((5, k)).astype(np.float32)
    kinds = [lambda: np.zeros(32), lambda: np.full(32, -0.0), lambda: rng.standard_normal(32) * 1e-41,
             lambda: np.clip(rng.standard_normal(32), -1, 1) * _int8_x_max(qt), lambda: rng.integers(-3, 4, 32) * 1e-45,
             lambda: np.arange(32) - 15.5, lambda: rng.standard_normal(32)]
    for i in range(5):
        for b in range(33):
            x[i, 32 * b:32 * b + 32] = kinds[(i * 7 + b * 3) % len(kinds)]()
    spec = pq.matmul(x, qt, compute="int8", backend="reference")
    for v in VARIANTS:
        assert bits_equal(pq.matmul(x, qt, compute="int8", isa=v), spec), v


def test_input_permutation_act_order():
    """QTensor.with_perm: the stored weight is W[:, perm] (GPTQ act-order, groups in order);
    dequantize returns W in the original column order, matmul reads x[..., perm], adapters too."""
    from pyqkern._lora import LoRA

    rng = np.random.default_rng(9)
    n, k = 24, 256
    w = rng.standard_normal((n, k)).astype(np.float32)
    perm = rng.permutation(k)
    stored = pq.quantize(np.ascontiguousarray(w[:, perm]), "int4", group=64)
    qt = stored.with_perm(perm)
    assert qt.data is stored.data and qt != stored
    wd = pq.dequantize(qt)
    assert np.array_equal(wd[:, perm], pq.dequantize(stored))
    for backend in ("native", "reference", "numba"):
        assert np.array_equal(pq.dequantize(qt, backend=backend), wd)
    x = rng.standard_normal((5, k)).astype(np.float32)
    assert_float_close(pq.matmul(x, qt, compute="float"), x, wd)
    for backend in ("reference", "numba"):  # the reference once multiplied permuted x by unpermuted W
        assert_float_close(pq.matmul(x, qt, compute="float", backend=backend), x, wd)
    assert bits_equal(pq.matmul(x, qt, compute="int8"), pq.matmul(x[:, perm], stored, compute="int8"))
    assert bits_equal(pq.matmul(x, qt, compute="int8", backend="reference"),
                      pq.matmul(x[:, perm], stored, compute="int8"))
    assert bits_equal(pq.QLinear(qt)(x), pq.matmul(x, qt))
    ad = LoRA((rng.standard_normal((4, k)) * 0.1).astype(np.float32), (rng.standard_normal((n, 4)) * 0.1).astype(np.float32))
    want = x.astype(np.float64) @ wd.T.astype(np.float64) + ad.scale * (x @ ad.A.T) @ ad.B.T
    for compute in ("float", "int8"):
        y = pq.matmul(x, qt, lora=ad, compute=compute)
        ref = pq.matmul(x, qt, lora=ad, compute=compute, backend="reference")
        assert np.allclose(y, ref, rtol=1e-4, atol=1e-4)
        if compute == "float":
            assert np.allclose(y, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="permutation"):
        stored.with_perm(np.zeros(k, np.int64))
    with pytest.raises(NotImplementedError, match="act-order"):
        pq.lora.merge(qt, ad)


def test_int8_min_term_cancellation_within_stated_bound():
    """q4_1 blocks whose weights are all exactly 0 (fp16 d * u + m == 0): compute="float" gives 0,
    int8 a few 1e-4 (its min term is a separate product), within the bound stated above with
    |a u| + |m| (not |w|, which is 0 here) in the fp32 term; the bits equal the spec on every variant"""
    rng = np.random.default_rng(1)
    n, k = 16, 64
    b = np.zeros((n * 2, 20), np.uint8)
    au_m = np.zeros((n, k))
    for blk in range(n * 2):
        while True:
            u = int(rng.integers(1, 16))
            d = np.float16(rng.uniform(0.01, 1))
            m = np.float16(-u * float(d))
            if float(m) == -u * float(d):
                break
        b[blk, 0:2] = np.frombuffer(d.tobytes(), np.uint8)
        b[blk, 2:4] = np.frombuffer(m.tobytes(), np.uint8)
        b[blk, 4:] = u | (u << 4)
        au_m[blk // 2, (blk % 2) * 32:(blk % 2) * 32 + 32] = 2 * u * float(d)
    qt = pq.QTensor.from_bytes("q4_1", (n, k), b.ravel())
    assert not pq.dequantize(qt).any()
    x = (rng.standard_normal((3, k)) * 100).astype(np.float32)
    assert not pq.matmul(x, qt, compute="float").any()
    spec = pq.matmul(x, qt, compute="int8", backend="reference")
    assert np.abs(spec).max() > 0                       # the cancellation is real
    assert (np.abs(spec) <= 1e-5 * (np.abs(x).astype(np.float64) @ au_m.T) + 1e-6).all()
    for v in VARIANTS:
        assert bits_equal(pq.matmul(x, qt, compute="int8", isa=v), spec), v


def test_qlinear_compute_switch_while_called():
    """Review: QLinear.compute dropped the packed copy before it cleared the decode fast path's
    flag, so a call in between (another thread) passed None to the kernel (TypeError). Made
    deterministic with a trace hook calling lin(x) at every line of the setter after the first."""
    import sys

    rng = np.random.default_rng(0)
    lin = pq.QLinear(pq.quantize(rng.standard_normal((64, 128)).astype(np.float32), "q4_0"), compute="int8")
    x = rng.standard_normal((2, 128)).astype(np.float32)
    want = {"int8": lin(x).copy()}
    lin.compute = "float"
    want["float"] = lin(x).copy()
    lin.compute = "int8"
    setter = type(lin).compute.fset.__code__
    got = []

    def trace(frame, event, arg):
        if frame.f_code is setter:
            def local(f, ev, a):
                if ev == "line":
                    sys.settrace(None)  # the call below runs untraced
                    got.append(lin(x).copy())
                    sys.settrace(trace)
                return local
            return local
        return None

    for target in ("float", "int8"):
        sys.settrace(trace)
        try:
            lin.compute = target
        finally:
            sys.settrace(None)
    assert len(got) >= 6
    for y in got:
        assert np.array_equal(y, want["int8"]) or np.array_equal(y, want["float"])
    assert lin.compute == "int8" and np.array_equal(lin(x), want["int8"])
