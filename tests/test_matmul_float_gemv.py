"""compute="float" at decode size through the formats' fused decode kernels (gemv_f32 slot, AVX2
and AVX-512: every format but int2 / int3, int4 with groups of 32 or more), which decode each
weight in registers instead of dequantizing a chunk into a buffer.

- each weight decodes to exactly pq.dequantize's float: one-hot activation rows (m = 1..4, 7) give
  y[i, r] = W[r, j_i] exactly (a -0.0 weight gives +0.0);
- M = 1..8, N not a multiple of the 4- and 2-row passes, K with int8 tails (k % 32 != 0), bias:
  within the fp32 bound of test_matmul, the same bits for 1, 2 and 3 threads, and a row's result
  does not depend on the other rows of its call;
- NaN / Inf in x give NaN / Inf where float64 arithmetic does.
Bound, adapters and K chunking for every format are in test_matmul.py.
"""
import numpy as np
import pytest

import pyqkern as pq
from pyqkern import _native, _ops

from test_matmul import assert_float_close, bits_equal, random_qtensor

FUSED = ["nf4", "fp4", "iq4_nl", "q8_0", "int8", "q4_0", "q4_1", "q4_k", "q6_k", "int4", "int4-sym32", "int4-pc",
         "nf4-g1024", "fp4-g512"]
PARAMS = {"nf4": {"group": 64}, "fp4": {"group": 32}, "int4": {"group": 128}, "int4-sym32": {"group": 32, "sym": True},
          "int4-sym128": {"group": 128, "sym": True},
          "int4-pc": {"group": -1}, "nf4-g1024": {"group": 1024}, "fp4-g512": {"group": 512}}
BLOCK = {"q4_k": 256, "q6_k": 256, "nf4": 64, "int4": 128, "nf4-g1024": 1024, "fp4-g512": 512}


def _fmt(case):
    return case.split("-")[0]


def _variants_with(case):
    return [v for v in pq.variants() if _native.gemv_f32_sources(_ops.isa_id(v))[_fmt(case)]]


def test_the_fused_kernels_are_registered_on_x86():
    names = pq.variants()
    for v, impl in (("avx2", "avx2"), ("avxvnni", "avx2"), ("avx512", "avx512"), ("avx512vnni", "avx512")):
        if v in names:
            src = _native.gemv_f32_sources(_ops.isa_id(v))
            assert all(src[_fmt(f)] == impl for f in FUSED), (v, src)
            assert src["int2"] is None and src["int3"] is None  # these keep the dequantize-a-chunk path
    assert _native.gemv_f32_sources(_ops.isa_id("ref"))["q4_0"] is None


def _k_for(case, nblocks):
    return nblocks * BLOCK.get(case, BLOCK.get(_fmt(case), 32))


def _case(fmt, seed, nblocks, int8_tail, n):
    """(variants with the kernel, rng, k, qt, reference dequantization) for a test case."""
    vs = _variants_with(fmt)
    if not vs:
        pytest.skip("no variant of this build has a fused float decode kernel on this CPU")
    rng = np.random.default_rng(seed)
    k = _k_for(fmt, nblocks) + (int8_tail if fmt == "int8" else 0)
    qt = random_qtensor(_fmt(fmt), n, k, rng, **PARAMS.get(fmt, {}))
    return vs, rng, k, qt, pq.dequantize(qt, backend="reference")


@pytest.mark.parametrize("fmt", FUSED)
def test_one_hot_rows_give_the_dequantized_weights(fmt):
    vs, rng, k, qt, wd = _case(fmt, 7, 4, 5, 23)
    for v in vs:
        for m in (1, 2, 3, 4, 7):
            for j0 in range(0, k, m):
                cols = np.arange(j0, min(k, j0 + m))
                x = np.zeros((len(cols), k), np.float32)
                x[np.arange(len(cols)), cols] = 1.0
                y = pq.matmul(x, qt, compute="float", isa=v)
                # exact values; a -0.0 weight sums to +0.0 with the zero lanes, as in any dot product
                assert np.array_equal(y, wd[:, cols].T), (fmt, v, m, j0)


SHAPES = [(f, kb, 0) for f in FUSED for kb in (1, 3)] + [("int8", kb, t) for kb, t in ((2, 1), (1, 31), (5, 17), (0, 7))]


@pytest.mark.parametrize("fmt,k_blocks,tail", SHAPES, ids=[f"{f}-{kb}x32+{t}" for f, kb, t in SHAPES])
def test_bound_threads_and_row_independence(fmt, k_blocks, tail):
    vs = _variants_with(fmt)
    if not vs:
        pytest.skip("no variant of this build has a fused float decode kernel on this CPU")
    rng = np.random.default_rng(k_blocks * 100 + tail)
    k = _k_for(fmt, k_blocks) + tail
    n = 39  # 4-row passes, then 2-row, then single rows
    qt, sub = _with_rows(fmt, n, k, rng, 5, 13)
    wd = pq.dequantize(qt, backend="reference")
    bias = rng.standard_normal(n).astype(np.float32)
    before = pq.get_num_threads()
    try:
        for m in (1, 2, 3, 4, 5, 8):
            x = rng.standard_normal((m, k)).astype(np.float32)
            x[rng.random((m, k)) < 0.02] *= 100
            for v in vs:
                outs = []
                for th in (1, 2, 3):
                    pq.set_num_threads(th)
                    outs.append(pq.matmul(x, qt, bias, compute="float", isa=v))
                assert all(bits_equal(o, outs[0]) for o in outs), (fmt, v, m)
                assert_float_close(outs[0], x, wd, bias)
                # rows 5..12 alone: the same bits as inside the whole call (other passes, tails)
                assert bits_equal(pq.matmul(x, sub, bias[5:13], compute="float", isa=v), outs[0][:, 5:13]), (fmt, v, m)
    finally:
        pq.set_num_threads(before)


GGML = ("q4_0", "q4_1", "q8_0", "q4_k", "q6_k", "iq4_nl")


def _with_rows(case, n, k, rng, r0, r1):
    """(qt [n, k], the QTensor of its rows r0..r1 alone)."""
    fmt = _fmt(case)
    if fmt in GGML:  # random ggml blocks, one row after another
        qt = random_qtensor(fmt, n, k, rng)
        sub = pq.QTensor.from_bytes(fmt, (r1 - r0, k), qt.data.reshape(n, -1)[r0:r1].ravel())
    else:  # quantized row by row
        w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 1.0, size=(n, 1))).astype(np.float32)
        kw = PARAMS.get(case, {})
        qt, sub = pq.quantize(w, fmt, **kw), pq.quantize(w[r0:r1], fmt, **kw)
    assert bits_equal(pq.dequantize(sub), pq.dequantize(qt)[r0:r1])
    return qt, sub


@pytest.mark.parametrize("fmt", FUSED)
def test_nan_and_inf_in_x(fmt):
    vs, rng, k, qt, wd = _case(fmt, 3, 2, 3, 9)
    wd = wd.astype(np.float64)
    x = rng.standard_normal((4, k)).astype(np.float32)
    x[0, 3] = np.nan
    x[1, k - 1] = np.inf
    x[2, 5], x[2, 6] = np.inf, -np.inf
    with np.errstate(all="ignore"):
        ref = x.astype(np.float64) @ wd.T
    for v in vs:
        y = pq.matmul(x, qt, compute="float", isa=v)
        np.testing.assert_array_equal(np.isnan(y), np.isnan(ref), err_msg=v)
        fin = ~np.isnan(ref)
        np.testing.assert_array_equal(np.isinf(y[fin]), np.isinf(ref[fin]), err_msg=v)
        np.testing.assert_array_equal(np.sign(y[np.isinf(ref)]), np.sign(ref[np.isinf(ref)]), err_msg=v)


@pytest.mark.parametrize("fmt", ["q4_0", "int4-sym32", "int4-sym128"])
def test_non_finite_and_extreme_scales(fmt):
    """Scales that are +-Inf, NaN or fp16's largest finite value (a hostile or damaged file): the
    decode kernels give NaN / Inf where float64 arithmetic on pq.dequantize's weights does, and
    the finite values within the bound. (AVX2's q4_0 decodes (c - 8) * d as one FMA, which would
    make every code of an Inf block NaN; such blocks take the table.)"""
    rng = np.random.default_rng(5)
    # int4: 40 groups of 32 per row, or 10 of 128 (the AVX2 kernel whose group's chunks are
    # unrolled); AVX2 computes a row whose result is not finite again with the tested decoder
    g = PARAMS.get(fmt, {}).get("group", 32)
    n, k = 6, (64 if fmt == "q4_0" else 1280)
    qt = pq.quantize(rng.standard_normal((n, k)).astype(np.float32), _fmt(fmt), **PARAMS.get(fmt, {}))
    q, s, z = (np.ascontiguousarray(a).copy() if a.size else None for a in qt.sections())
    if fmt == "q4_0":   # block bytes: fp16 d, then 16 code bytes
        raw = q.reshape(n, -1, 18)
        for r, h in enumerate((0x7C00, 0xFC00, 0x7E00, 0x7BFF)):
            raw[r, r % 2, :2] = np.frombuffer(np.uint16(h).tobytes(), np.uint8)
            raw[r, r % 2, 2:] = 0xFF   # every code 15: weights 7 * d, +-Inf in one sign, no NaN
        data = raw.reshape(-1)
    else:               # int4 sections: codes, then fp16 scales per group
        sc = s.view(np.uint16).reshape(n, -1)
        codes = q.reshape(n, -1)
        for r, h in enumerate((0x7C00, 0xFC00, 0x7E00, 0x7BFF)):
            sc[r, r % 2] = h
            codes[r, g // 2 * (r % 2):g // 2 * (r % 2 + 1)] = 0xFF   # the group's codes all 15
        data = np.concatenate([q.reshape(-1), sc.reshape(-1).view(np.uint8)])
    bad = pq.QTensor(qt.format, qt.shape, data, qt.params)
    wd = pq.dequantize(bad).astype(np.float64)
    x = np.abs(rng.standard_normal((3, k))).astype(np.float32)
    x[1, :32] = 0.0   # zeros against Inf weights: NaN
    with np.errstate(all="ignore"):
        ref = x.astype(np.float64) @ wd.T
    for v in _variants_with(fmt):
        y = pq.matmul(x, bad, compute="float", isa=v)
        np.testing.assert_array_equal(np.isnan(y), np.isnan(ref), err_msg=v)
        fin = np.isfinite(ref)
        np.testing.assert_array_equal(np.isinf(y[~np.isnan(ref)]), np.isinf(ref[~np.isnan(ref)]), err_msg=v)
        np.testing.assert_array_equal(np.sign(y[np.isinf(ref)]), np.sign(ref[np.isinf(ref)]), err_msg=v)
        np.testing.assert_allclose(y[fin], ref[fin], rtol=1e-5, atol=1e-3, err_msg=v)


@pytest.mark.parametrize("tail", list(range(1, 32)))
def test_int8_tail_reads_only_its_row(tail):
    """K = 32 + tail: the last chunk's x is only this row's `tail` elements; Inf / NaN at the start
    of the next x row (and in the padding of a row stride ldx > k, through the C ABI) must not reach
    this row (0 * Inf would make it NaN)."""
    vs = _variants_with("int8")
    if not vs:
        pytest.skip("no variant of this build has a fused float decode kernel on this CPU")
    rng = np.random.default_rng(tail)
    k, n = 32 + tail, 7
    qt = random_qtensor("int8", n, k, rng)
    wd = pq.dequantize(qt, backend="reference")
    for m in (2, 3, 4, 8):
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[1:, 0] = np.inf                      # the first element of every row after the first
        x[1:, 1] = np.nan
        for v in vs:
            y = pq.matmul(x, qt, compute="float", isa=v)
            assert np.isfinite(y[0]).all(), (v, m, tail)
            assert_float_close(y[:1], x[:1], wd)


def test_strided_x_and_y_through_the_c_abi():
    """ldx > k (NaN in the padding) and ldy > n at M = 1..8 give the bits of the contiguous call,
    and nothing past n in a y row is written."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bindings" / "cffi"))
    import pyqkern_cffi as C
    from pyqkern import _formats
    lib = C.lib
    rng = np.random.default_rng(11)
    n = 21
    for case in FUSED:
        fmt = _fmt(case)
        k = _k_for(case, 2) + (7 if fmt == "int8" else 0)
        qt = random_qtensor(fmt, n, k, rng, **PARAMS.get(case, {}))
        params = C.qparams(qt.params["group"], qt.params["sym"])
        q, s, z = (np.ascontiguousarray(a) if a.size else None for a in qt.sections())
        for v in _variants_with(case):
            isa = _ops.isa_id(v)
            for m in (1, 2, 4, 6, 8):
                x = rng.standard_normal((m, k)).astype(np.float32)
                xs = np.full((m, k + 5), np.nan, np.float32)
                xs[:, :k] = x
                y1 = np.empty((m, n), np.float32)
                y2 = np.full((m, n + 3), -7.0, np.float32)
                C.check(lib.pqk_matmul_float(isa, _formats.FORMAT_IDS[fmt], C.ptr(q), C.ptr(s), C.ptr(z), n, k, params,
                                             C.ptr(x, "float*"), m, k, C.ffi.NULL, C.ptr(y1, "float*"), n))
                C.check(lib.pqk_matmul_float(isa, _formats.FORMAT_IDS[fmt], C.ptr(q), C.ptr(s), C.ptr(z), n, k, params,
                                             C.ptr(xs, "float*"), m, k + 5, C.ffi.NULL, C.ptr(y2, "float*"), n + 3))
                assert bits_equal(y2[:, :n], y1), (case, v, m)
                assert (y2[:, n:] == -7.0).all(), (case, v, m)


# (case, k, m): K blocks of the float decode kernels are kc chunks of 32 (kc = 24 at M = 7..8,
# 192 at M = 1 for one-chunk steps): a last block one chunk long, and an int8 tail after several
# blocks (it must be added once, in the last block)
K_BLOCK_CASES = [("int8", 25 * 32 + 7, 8), ("int8", 193 * 32 + 5, 1), ("int8", 49 * 32 + 31, 7),
                 ("q8_0", 25 * 32, 8), ("q4_0", 49 * 32, 8), ("iq4_nl", 193 * 32, 1), ("q4_k", 65 * 256, 2)]


@pytest.mark.parametrize("case,k,m", K_BLOCK_CASES, ids=[f"{c}-k{k}-m{m}" for c, k, m in K_BLOCK_CASES])
def test_k_block_boundaries(case, k, m):
    vs = _variants_with(case)
    if not vs:
        pytest.skip("no variant of this build has a fused float decode kernel on this CPU")
    rng = np.random.default_rng(k + m)
    n = 19
    qt = random_qtensor(_fmt(case), n, k, rng, **PARAMS.get(case, {}))
    wd = pq.dequantize(qt, backend="reference")
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    for v in vs:
        assert_float_close(pq.matmul(x, qt, bias, compute="float", isa=v), x, wd, bias)
