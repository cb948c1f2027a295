"""compute="float" at decode size on the packed 4-bit codes: the AVX512-BF16 GEMV kernel (M <= 4,
4-bit codes without a code book) takes x as it is, with exact products and fp32 sums; on CPUs
without it the AVX2 variant's fp32 kernel (gemv_f32p, M <= 8, x widened from bf16 where it
comes so) sums the same (u - o) * x products per block in the same order. Both under the same
bound as the fp32 path:
    |y - y_ref| <= K * 2^-23 * (|x| @ |W|.T)   with y_ref = widen(x) @ dequantize(W).T
Everything they do not take (other formats, M > 4, tiny or huge x, AVX-512 variants without
AVX512-BF16) goes the fp32 way, so results stay within that bound whatever route a call takes."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pyqkern as pq
from pyqkern import _ops
from pyqkern._matmul import _packed, _packed_float_kernel

from test_matmul import assert_float_close, bits_equal, random_qtensor

BF16 = ml_dtypes.bfloat16
KERNEL_FORMATS = ["q4_0", "int2", "int3", "int4"]
MIN_FORMATS = ["q4_1", "q4_k"]  # declined: see test_min_term_formats_take_the_fp32_route
NAT = _ops._native()


def bf16_variant():
    """The variant whose table holds the bf16 kernel on this CPU (None if none does)."""
    for v in pq.variants():
        if NAT.matmul_sources(_ops.isa_id(v)).get("gemv_bf16"):
            return v
    return None


def kernel_variant():
    """The variant whose table holds a packed float kernel on this CPU: the bf16 one, else the
    fp32 one (gemv_f32p; None if neither)."""
    v = bf16_variant()
    if v is None:
        v = next((v for v in pq.variants() if NAT.matmul_sources(_ops.isa_id(v)).get("gemv_f32p")), None)
    return v


def f32_rows(v):
    """The most float32 rows of x the variant's packed float kernel takes (the bf16 kernel splits
    each into three parts)."""
    return 2 if NAT.matmul_sources(_ops.isa_id(v)).get("gemv_bf16") else 8


def fp32_route():
    """The variant whose compute="float" is the fp32 route: the one below the bf16 kernel's
    table (avx512) where it runs, else the active one (no bf16 kernel on such CPUs)."""
    return "avx512" if "avx512" in pq.variants() else pq.info()["active_variant"]


def qt_for(fmt, n, k, rng, sym=None):
    if fmt in ("int2", "int3", "int4"):
        return random_qtensor(fmt, n, k, rng, group=int(rng.choice([32, 64, 128])) if k % 128 == 0 else 32,
                              sym=bool(rng.integers(0, 2)) if sym is None else sym)
    return random_qtensor(fmt, n, k, rng)


def test_kernel_present_where_the_cpu_has_avx512_bf16():
    feats = pq.info()["features"]
    v = bf16_variant()
    if "avx512bf16" in feats and "avx512vnni" in feats:
        assert v == "avx512vnni"
    else:
        assert v is None
    # the fp32 kernel: in the AVX2 variant's table, not in the AVX-512 ones' (their own 16-lane
    # decode kernels keep the float GEMV)
    for var in pq.variants():
        src = NAT.matmul_sources(_ops.isa_id(var)).get("gemv_f32p")
        assert src == ("avx2" if var in ("avx2", "avxvnni") else None), (var, src)
    active = pq.info()["active_variant"]
    want = "bf16" if active == v else "f32" if active in ("avx2", "avxvnni") else None
    assert _packed_float_kernel(None) == want


@pytest.mark.parametrize("fmt", KERNEL_FORMATS + MIN_FORMATS)
@settings(max_examples=8, deadline=None)
@given(m=st.sampled_from([1, 2, 3, 4, 5, 8, 9]), n=st.sampled_from([1, 7, 16, 33]),
       kb=st.sampled_from([1, 2, 4, 8]), use_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_bf16_float_within_bound(fmt, m, n, kb, use_bias, seed):
    rng = np.random.default_rng(seed)
    k = kb * (256 if fmt == "q4_k" else 128)
    qt = qt_for(fmt, n, k, rng)
    x = rng.standard_normal((m, k)).astype(BF16)
    x[:, rng.integers(0, k, 3)] = BF16(1e4)  # outliers
    bias = rng.standard_normal(n).astype(np.float32) if use_bias else None
    wd = pq.dequantize(qt, backend="reference")
    x32 = x.astype(np.float32)
    y = pq.matmul(x, qt, bias, compute="float")
    assert_float_close(y, x32, wd, bias)
    for v in pq.variants():
        assert_float_close(pq.matmul(x, qt, bias, compute="float", isa=v), x32, wd, bias)


@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_kernel_taken_and_thread_count_independent(fmt):
    v = kernel_variant()
    assert v is not None or "avx512bf16" not in pq.info()["features"]
    rng = np.random.default_rng(3)
    n, k = 37, 512
    qt = qt_for(fmt, n, k, rng)
    x = rng.standard_normal((3, k)).astype(BF16)
    bias = rng.standard_normal(n).astype(np.float32)
    y = np.empty((3, n), np.float32)
    if v is not None:  # the kernel takes it (elsewhere: the fp32 route, checked the same way below)
        assert NAT.matmul_float_bf16(_ops.isa_id(v), _packed(qt), x.view(np.uint16), bias, y)
    else:
        y = pq.matmul(x.astype(np.float32), qt, bias, compute="float")
    assert_float_close(y, x.astype(np.float32), pq.dequantize(qt), bias)
    before = pq.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            pq.set_num_threads(t)
            outs.append(pq.matmul(x, qt, bias, compute="float"))
    finally:
        pq.set_num_threads(before)
    assert all(bits_equal(o, outs[0]) for o in outs)
    assert bits_equal(outs[0], y)


def test_routes_it_declines_and_inputs_it_accepts():
    rng = np.random.default_rng(4)
    n, k = 24, 256
    x = rng.standard_normal((2, k)).astype(BF16)
    v = kernel_variant()
    y = np.empty((2, n), np.float32)
    for fmt in ("nf4", "q8_0", "iq4_nl"):  # code books / 8-bit codes: the fp32 route
        qt = random_qtensor(fmt, n, k, rng)
        assert_float_close(pq.matmul(x, qt, compute="float"), x.astype(np.float32), pq.dequantize(qt))
    qt = qt_for("int4", n, k, rng, sym=False)
    wd = pq.dequantize(qt)
    if v is not None:
        isa = _ops.isa_id(v)
        p = _packed(qt)
        big = 5 if bf16_variant() else 9  # M > 4 (bf16 kernel), M > 8 (fp32 kernel)
        assert not NAT.matmul_float_bf16(isa, p, np.ascontiguousarray(np.repeat(x, 5, 0)[:big]).view(np.uint16), None,
                                         np.empty((big, n), np.float32))
        den = x.copy()
        den[1, 7] = np.array([1], np.uint16).view(BF16)[0]                        # a bf16 denormal
        assert not NAT.matmul_float_bf16(isa, p, den.view(np.uint16), None, y)
        assert_float_close(pq.matmul(den, qt, compute="float"), den.astype(np.float32), wd)
        if "avx512" in pq.variants():  # no slot there
            assert not NAT.matmul_float_bf16(_ops.isa_id("avx512"), p, x.view(np.uint16), None, y)
    # the same answer for every way of passing bf16: ml_dtypes, uint16 bits, torch, 1-D, out=
    want = pq.matmul(x, qt, compute="float")
    assert bits_equal(pq.matmul(x.view(np.uint16), qt, compute="float"), want)
    torch = pytest.importorskip("torch")
    xt = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    assert bits_equal(pq.matmul(xt, qt, compute="float"), want)
    assert bits_equal(pq.matmul(x[1], qt, compute="float"), want[1])
    out = np.empty((2, n), np.float32)
    assert pq.matmul(x, qt, compute="float", out=out) is out and bits_equal(out, want)
    assert bits_equal(pq.QLinear(qt, compute="float")(x), want)
    # NaN / Inf propagate as in fp32
    bad = x.copy()
    bad[0, 5] = BF16(np.nan)
    yb = pq.matmul(bad, qt, compute="float")
    assert np.isnan(yb[0]).any() and np.isfinite(yb[1]).all()
    with pytest.raises(ValueError, match="K="):
        pq.matmul(np.ones((1, k + 1), BF16), qt, compute="float")


def test_act_order_permutation():
    """A GPTQ act-order weight (stored as W[:, perm]) takes x[:, perm] on this path too."""
    rng = np.random.default_rng(5)
    n, k = 16, 256
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    perm = rng.permutation(k)
    qt = pq.quantize(w[:, perm], "int4", group=64).with_perm(perm)
    x = rng.standard_normal((1, k)).astype(BF16)
    wd = pq.dequantize(qt)  # in the original column order
    assert_float_close(pq.matmul(x, qt, compute="float"), x.astype(np.float32), wd)


@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
@settings(max_examples=6, deadline=None)
@given(m=st.sampled_from([1, 2, 3, 6]), n=st.sampled_from([1, 16, 33]), kb=st.sampled_from([1, 2, 8]),
       scale=st.sampled_from([1e-35, 1e-20, 1.0, 1e20]), use_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fp32_x_split_within_bound(fmt, m, n, kb, scale, use_bias, seed):
    """float32 x (M <= 2) goes through the same kernel split exactly into three bf16 parts: the
    fp32 bound holds for any magnitude (tiny values that would make a part denormal go the fp32
    way)."""
    rng = np.random.default_rng(seed)
    k = kb * (256 if fmt == "q4_k" else 128)
    qt = qt_for(fmt, n, k, rng)
    x = (rng.standard_normal((m, k)) * scale).astype(np.float32)
    x[:, rng.integers(0, k, 2)] *= 1e3
    bias = rng.standard_normal(n).astype(np.float32) if use_bias else None
    wd = pq.dequantize(qt, backend="reference")
    assert_float_close(pq.matmul(x, qt, bias, compute="float"), x, wd, bias)
    v = kernel_variant()
    if v is not None and m <= f32_rows(v):
        y = np.empty((m, n), np.float32)
        taken = NAT.matmul_float_packed(_ops.isa_id(v), _packed(qt), x, bias, y)
        assert taken == (scale > 1e-30)  # 1e-35 * N(0,1): below 2^-100 (bf16 parts would be denormals)
        if taken:
            assert_float_close(y, x, wd, bias)


def test_fp32_x_split_declines_non_finite_and_matches_fp32_semantics():
    rng = np.random.default_rng(6)
    n, k = 16, 256
    qt = qt_for("q4_0", n, k, rng)
    wd = pq.dequantize(qt)
    v = kernel_variant()
    for special in (np.inf, -np.inf, np.nan, 1e-40):
        x = rng.standard_normal((1, k)).astype(np.float32)
        x[0, 9] = special
        if v is not None:
            assert not NAT.matmul_float_packed(_ops.isa_id(v), _packed(qt), x, None, np.empty((1, n), np.float32))
        y = pq.matmul(x, qt, compute="float")   # the fp32 route: IEEE semantics as before
        want = pq.matmul(x, qt, compute="float", isa=fp32_route())
        assert bits_equal(y, want) or (np.isnan(y) == np.isnan(want)).all()
    x = rng.standard_normal((2, k)).astype(np.float32)
    if v is not None:  # the kernel's answer is what pq.matmul returns, for any thread count
        y = np.empty((2, n), np.float32)
        assert NAT.matmul_float_packed(_ops.isa_id(v), _packed(qt), x, None, y)
        before = pq.get_num_threads()
        try:
            for t in (1, 2, 3):
                pq.set_num_threads(t)
                assert bits_equal(pq.matmul(x, qt, compute="float"), y)
        finally:
            pq.set_num_threads(before)
    assert_float_close(pq.matmul(x, qt, compute="float"), x, wd)


@pytest.mark.parametrize("xdt", ["bfloat16", "float32"])
@pytest.mark.parametrize("mode", ["single", "dora", "rows", "sum"])
def test_adapters_on_the_decode_kernel(xdt, mode):
    """LoRA / DoRA / per-row adapters / summed adapters with compute="float" at decode size:
    the bf16 kernel for the base, the shrink on x and the expansion after it; within the fused
    LoRA bound of the unfused float reference."""
    from pyqkern._lora import LoRA
    from test_lora_fused import adapter, bound

    rng = np.random.default_rng(8)
    n, k, m = 40, 256, 2
    qt = qt_for("int4", n, k, rng, sym=False)
    x = rng.standard_normal((m, k)).astype(np.float32)
    if xdt == "bfloat16":
        x = x.astype(BF16)
    x32 = x.astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    ids = None
    if mode == "single":
        lora = adapter(n, k, 8, rng)
    elif mode == "dora":
        lora = adapter(n, k, 4, rng, dora=True)
    elif mode == "rows":
        lora = [adapter(n, k, 8, rng), adapter(n, k, 3, rng)]
        ids = np.array([1, -1], np.int32)
    else:
        a = adapter(n, k, 6, rng)
        lora = [a, LoRA(a.A, a.B, alpha=a.alpha, storage="bfloat16")]
    ads = lora if isinstance(lora, list) else [lora]
    ref = pq.matmul(x32, qt, bias, lora=lora, adapter_ids=ids, compute="float", backend="reference")
    lim = bound(x32, qt, ads, bias)
    y = pq.matmul(x, qt, bias, lora=lora, adapter_ids=ids, compute="float")
    assert (np.abs(y - ref) <= lim).all(), np.abs(y - ref).max()
    v = kernel_variant()
    if v is not None:  # it is the kernel's answer
        xk = x.view(np.uint16) if xdt == "bfloat16" else x
        call = NAT.matmul_float_bf16 if xdt == "bfloat16" else NAT.matmul_float_packed
        out = np.empty((m, n), np.float32)
        assert call(_ops.isa_id(v), _packed(qt), xk, bias, out, [a.native_args(qt) for a in ads], ids)
        assert bits_equal(out, y)


def test_declined_inputs_match_the_fp32_route():
    """Cases the kernel must not take go the fp32 way and give its answer: |x| near FLT_MAX or
    Inf (the kernel sums (u - o) * x before scaling, which could overflow or make Inf * 0), and
    zero points above 16 (possible only in hand-made bytes; the kernel's table covers -16..15)."""
    rng = np.random.default_rng(9)
    n, k = 8, 64
    w = (rng.standard_normal((n, k)) * 0.01).astype(np.float32)
    for fmt, kw in (("q4_0", {}), ("q4_1", {}), ("int4", dict(group=32))):
        qt = pq.quantize(w, fmt, **kw)
        for big in (3.4e38, 1e38, np.inf):
            x = np.zeros((1, k), np.float32)
            x[0, 0] = big
            for xx in (x, x.astype(BF16)):
                y = pq.matmul(xx, qt, compute="float")
                want = pq.matmul(xx, qt, compute="float", isa=fp32_route())   # no bf16 kernel there
                assert bits_equal(y, want), (fmt, big, xx.dtype, y, want)
    q, s, _ = pq.quantize(w, "int4", group=32, sym=False).sections()
    for zp in (16, 17, 40, 255):
        qz = pq.QTensor.from_bytes("int4", (n, k), np.concatenate([q.ravel(), s.ravel(),
                                                                   np.full(n * k // 32, zp, np.uint8)]),
                                   group=32, sym=False)
        x = rng.standard_normal((2, k)).astype(np.float32)
        assert_float_close(pq.matmul(x, qz, compute="float"), x, pq.dequantize(qz, backend="reference"))
        assert_float_close(pq.matmul(x.astype(BF16), qz, compute="float"), x.astype(BF16).astype(np.float32),
                           pq.dequantize(qz, backend="reference"))


@pytest.mark.parametrize("fmt", MIN_FORMATS)
def test_min_term_formats_take_the_fp32_route(fmt):
    """The kernel summed a * (u x) and m * x apart per block: where a * u + m cancels (a weight near
    0) beside a large x, that x swamped the rest (y = 0 for -6.25 below; q4_k rows off by 1e9 times
    the bound). The fp32 route dequantizes each weight first."""
    rng = np.random.default_rng(5)
    qt = random_qtensor(fmt, 16, 256, rng)
    x = rng.standard_normal((2, 256)).astype(BF16)
    v = kernel_variant()
    if v is not None:
        p = _packed(qt)
        assert not NAT.matmul_float_bf16(_ops.isa_id(v), p, x.view(np.uint16), None, np.empty((2, 16), np.float32))
        assert not NAT.matmul_float_packed(_ops.isa_id(v), p, x.astype(np.float32), None,
                                           np.empty((2, 16), np.float32))
    # one q4_1 block, d = 1, m = -1: w = u - 1, so w[1] = 0 where x[1] = 2^40
    blk = np.zeros(20, np.uint8)
    blk[0:4] = np.array([1.0, -1.0], np.float16).view(np.uint8)
    blk[4:] = [j | (j << 4) for j in range(16)]
    q41 = pq.QTensor.from_bytes("q4_1", (1, 32), blk)
    xs = np.array([((j * 5) % 7 - 3) * 0.25 for j in range(32)], np.float32)
    xs[1] = 2.0 ** 40
    want = pq.matmul(xs[None], q41, compute="float", backend="reference")
    assert want[0, 0] == -6.25
    for xin in (xs[None], xs[None].astype(BF16)):
        assert pq.matmul(xin, q41, compute="float")[0, 0] == -6.25


def _q4_0_rows(d, codes, n=16):
    """n rows of one q4_0 block: fp16 scale d, the 32 codes given"""
    b = np.zeros((n, 18), np.uint8)
    b[:, 0:2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
    b[:, 2:] = codes[:16] | (codes[16:] << 4)
    return pq.QTensor.from_bytes("q4_0", (n, 32), b.ravel())


def test_tiny_x_and_non_finite_scales_take_the_fp32_route():
    """vdpbf16ps flushes sums below 2^-126: a block sum of normal x cancelling down there gave 0 for
    3.85e-34 (x with 0 < |x| < 2^-100 now goes the fp32 way). An Inf scale times the block sum gave
    +Inf where 0 * Inf terms make x @ dequantize(W).T NaN (such weights now go the fp32 way too)."""
    codes = np.full(32, 8, np.uint8)
    codes[:2] = 9                                   # u - 8 = 1 at k = 0, 1
    qt = _q4_0_rows(65504.0, codes)
    x = np.zeros((1, 32), np.float32)
    x[0, :2] = 1.5 * 2.0 ** -126, -(2.0 ** -126)
    want = pq.matmul(x, qt, compute="float", backend="reference")
    assert want[0, 0] != 0
    for xin in (x, x.astype(BF16)):
        assert bits_equal(pq.matmul(xin, qt, compute="float"), want)
    v = kernel_variant()
    if v is not None:
        assert not NAT.matmul_float_packed(_ops.isa_id(v), _packed(qt), x, None, np.empty((1, 16), np.float32))
        assert not NAT.matmul_float_bf16(_ops.isa_id(v), _packed(qt), x.astype(BF16).view(np.uint16), None,
                                         np.empty((1, 16), np.float32))
    qi = _q4_0_rows(np.inf, np.full(32, 9, np.uint8))
    xi = np.ones((1, 32), np.float32)
    xi[0, 5] = 0.0
    with np.errstate(all="ignore"):
        assert np.isnan(pq.matmul(xi, qi, compute="float", backend="reference")).all()
        for xin in (xi, xi.astype(BF16)):
            assert np.isnan(pq.matmul(xin, qi, compute="float")).all()
    # still taken: the smallest x it accepts, and a zero
    x[0, :2] = 2.0 ** -100, 0.0
    if v is not None:
        y = np.empty((1, 16), np.float32)
        assert NAT.matmul_float_packed(_ops.isa_id(v), _packed(qt), x, None, y)
        assert y[0, 0] == np.float32(65504.0 * 2.0 ** -100)


@pytest.mark.parametrize("fmt", ["q4_0", "int4"])
def test_float16_x_gives_float32_x_bits(fmt):
    """float16 x takes the packed kernel as its exact float32 widening does (a review: it took the
    fp32 route, whose last bits differ), numpy and torch, every M of the decode sizes."""
    rng = np.random.default_rng(11)
    qt = pq.quantize(rng.standard_normal((40, 512)).astype(np.float32), fmt)
    torch = pytest.importorskip("torch")
    for m in (1, 2, 3, 8, 9):
        xh = rng.standard_normal((m, 512)).astype(np.float16)
        want = pq.matmul(xh.astype(np.float32), qt, compute="float")
        for x in (xh, torch.from_numpy(xh)):
            assert np.asarray(pq.matmul(x, qt, compute="float")).tobytes() == want.tobytes(), (fmt, m)
