"""Fused Numba matmul (pq.matmul(..., backend="numba"), compute="float").

- every format / parameterisation, M in {1, 3, 8}, K at block edges (one block, a few blocks,
  int4 per-channel and int8 tails of K % 32 != 0), odd N, with and without bias: within the
  float32 dot-product bound of float64 x @ dequantize(W).T (+ bias);
- the decode is exact: with one-hot activations every y element is one decoded weight, which
  must equal pq.dequantize's value;
- the result does not depend on the Numba thread count (1 vs 2 threads: same bits), nor on the
  batch: M <= 8 runs one kernel per format, more rows another, and a row alone gives the bits it gives in a batch
  (except the sign of a NaN result: x86 keeps the first NaN operand of an add, and LLVM may order
  the operands of the lane sums differently in the two kernels).
"""
from __future__ import annotations

import numpy as np
import pytest

numba = pytest.importorskip("numba")

import pyqkern as pq  # noqa: E402

F32 = np.float32

# (format, quantize kwargs, K values at block edges)
CASES = [
    ("q4_0", {}, (32, 96)),
    ("q4_1", {}, (32, 96)),
    ("q8_0", {}, (32, 96)),
    ("iq4_nl", {}, (32, 96)),
    ("q4_k", {}, (256, 512)),
    ("q6_k", {}, (256, 512)),
    ("nf4", {"group": 32}, (32, 96)),
    ("nf4", {"group": 64}, (64, 192)),
    ("nf4", {"group": 64, "double_quant": True}, (64, 192)),
    ("fp4", {"group": 64}, (64, 192)),
    ("int4", {"group": 16}, (16, 48, 80)),
    ("int4", {"group": 16, "sym": True}, (16, 48)),
    ("int4", {"group": 32}, (32, 96)),
    ("int4", {"group": 128, "sym": True}, (128, 256)),
    ("int4", {"group": -1}, (2, 30, 34, 64, 98)),
    ("int4", {"group": -1, "sym": True}, (6, 66)),
    ("int8", {}, (1, 31, 32, 33, 95)),
    ("int3", {"group": 16}, (48,)),
    ("int3", {"group": 64}, (192,)),
    ("int3", {"group": -1}, (40, 72, 96)),
    ("int2", {"group": 32, "sym": True}, (96,)),
    ("int2", {"group": -1}, (36, 100, 128)),
]
IDS = [f + "".join(f"-{k}{v}" for k, v in kw.items()) for f, kw, _ in CASES]


def _weights(rng, n, k):
    w = rng.standard_normal((n, k)).astype(F32)
    w[:, ::7] *= F32(4)          # uneven magnitudes inside blocks
    if n > 2:
        w[1] = 0                  # an all-zero row
        w[2, : min(k, 32)] = 0    # an all-zero block
    return w


def _quant(fmt, kw, n, k, seed):
    rng = np.random.default_rng(seed)
    return pq.quantize(_weights(rng, n, k), fmt, **kw), rng


@pytest.mark.parametrize("fmt,kw,ks", CASES, ids=IDS)
def test_within_fp32_bound(fmt, kw, ks):
    for ki, k in enumerate(ks):
        for n in (1, 5, 19):
            qt, rng = _quant(fmt, kw, n, k, 1000 * ki + n)
            wd = pq.dequantize(qt, backend="reference").astype(np.float64)
            for m in (1, 3, 8):
                x = rng.standard_normal((m, k)).astype(F32)
                for bias in (None, rng.standard_normal(n).astype(F32)):
                    y = pq.matmul(x, qt, bias, backend="numba")
                    assert y.dtype == F32 and y.shape == (m, n)
                    x64 = x.astype(np.float64)
                    ref = x64 @ wd.T
                    mag = np.abs(x64) @ np.abs(wd).T
                    if bias is not None:
                        ref = ref + bias
                        mag = mag + np.abs(bias)
                    bound = (k + 1) * 2.0 ** -23 * mag
                    err = np.abs(y - ref)
                    assert (err <= bound).all(), (fmt, kw, m, n, k, float((err - bound).max()))


@pytest.mark.parametrize("fmt,kw,ks", CASES, ids=IDS)
def test_decode_exact(fmt, kw, ks):
    """x = one-hot rows: y[m, n] = w[n, k_m] * 1 + (+-0)... = the decoded weight, bit for bit
    (up to the sign of zero)."""
    k = ks[-1]
    n = 7
    qt, _ = _quant(fmt, kw, n, k, 7)
    want = pq.dequantize(qt, backend="reference")
    cols = sorted({0, 1, 15, 16, 17, 31, k // 2, k - 2, k - 1} & set(range(k)))
    x = np.zeros((len(cols), k), F32)
    x[np.arange(len(cols)), cols] = 1
    y = pq.matmul(x, qt, backend="numba")
    np.testing.assert_array_equal(y, want[:, cols].T)
    # and every column once (bounded: K <= 512)
    y = pq.matmul(np.eye(k, dtype=F32), qt, backend="numba")
    np.testing.assert_array_equal(y, want.T)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
@pytest.mark.parametrize("fmt,kw", [("q4_0", {}), ("q4_k", {}), ("nf4", {"group": 64}),
                                    ("int4", {"group": 16}), ("int4", {"group": -1}), ("int8", {})])
def test_thread_count_independent(fmt, kw):
    k = 544 if fmt == "int8" else (512 if fmt == "q4_k" else 448)
    n = 67
    qt, rng = _quant(fmt, kw, n, k, 3)
    x = rng.standard_normal((3, k)).astype(F32)
    b = rng.standard_normal(n).astype(F32)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        y1 = pq.matmul(x, qt, b, backend="numba")
        numba.set_num_threads(2)
        y2 = pq.matmul(x, qt, b, backend="numba")
    finally:
        numba.set_num_threads(old)
    np.testing.assert_array_equal(y1.view(np.uint32), y2.view(np.uint32))


@pytest.mark.parametrize("fmt,kw,ks", CASES, ids=IDS)
def test_gemv_rows_equal_batch_rows(fmt, kw, ks):
    n = 21
    for k in ks:
        qt, rng = _quant(fmt, kw, n, k, k)
        x = rng.standard_normal((5, k)).astype(F32)
        x[1, :3] = [1e30, -1e-30, 0.0][:k]
        b = rng.standard_normal(n).astype(F32)
        ad = pq.LoRA(rng.standard_normal((4, k)).astype(F32), rng.standard_normal((n, 4)).astype(F32), alpha=8)
        for bias, lora in ((None, None), (b, None), (b, ad)):
            yb = pq.matmul(x, qt, bias, lora=lora, backend="numba")
            for i in range(x.shape[0]):
                yi = pq.matmul(x[i:i + 1], qt, bias, lora=lora, backend="numba")
                np.testing.assert_array_equal(yi[0].view(np.uint32), yb[i].view(np.uint32), err_msg=f"{fmt} k={k} row {i}")


@pytest.mark.parametrize("fmt", ["q4_0", "int4"])
def test_batch_over_several_x_tiles_equals_rows(fmt):
    """M > 8 runs x in tiles of rows (2 MiB: 16 rows at K = 32768); rows of every tile, their
    edges included, are what each row alone gives (a review: all of x per weight row streamed
    x from DRAM N times)."""
    from pyqkern.numba_kernels import matmul as nbm

    k, n, m = 32768, 3, 40
    assert nbm.X_TILE_BYTES // (4 * k) < m  # several tiles
    qt, rng = _quant(fmt, {}, n, k, k)
    x = rng.standard_normal((m, k)).astype(F32)
    yb = pq.matmul(x, qt, compute="float", backend="numba")
    for i in range(m):
        yi = pq.matmul(x[i:i + 1], qt, compute="float", backend="numba")
        np.testing.assert_array_equal(yi[0].view(np.uint32), yb[i].view(np.uint32), err_msg=f"{fmt} row {i}")


def test_leading_dims_out_and_strided_x():
    qt, rng = _quant("q4_0", {}, 9, 64, 11)
    x = rng.standard_normal((2, 3, 128)).astype(F32)[..., ::2]   # non-contiguous rows
    out = np.empty((2, 3, 9), F32)
    y = pq.matmul(x, qt, backend="numba", out=out)
    assert y is out
    ref = pq.matmul(np.ascontiguousarray(x).reshape(6, 64), qt, backend="numba").reshape(2, 3, 9)
    np.testing.assert_array_equal(y, ref)
    with pytest.raises(NotImplementedError):
        pq.matmul(x, qt, compute="int8", backend="numba")


def test_fp16_table_matches_the_bit_decoder():
    """the matmul kernels read fp16 scales through a 65536-entry table: every pattern (subnormals,
    Inf, NaN payloads, -0) must give simple.fp16_to_fp32's bits."""
    from pyqkern.numba_kernels.matmul import _F16_TABLE
    from pyqkern.numba_kernels.simple import fp16_to_fp32

    @numba.njit
    def decode_all(out):
        for i in range(65536):
            out[i] = fp16_to_fp32(np.uint16(i))

    want = np.empty(65536, F32)
    decode_all(want)
    assert _F16_TABLE.dtype == F32
    np.testing.assert_array_equal(_F16_TABLE.view(np.uint32), want.view(np.uint32))
