"""GPTQ into every target (int2/int3/int4/int8, q4_0, q4_1, q8_0, iq4_nl, nf4) and the MSE scale
search (``pq.quantize(..., search="mse")`` and ``GPTQ.quantize(search="mse")``)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pyqkern as pq
from pyqkern import _grid
from pyqkern import gptq as G

from test_gptq import _rel, correlated_layer

F32 = np.float32
TARGETS = ["int2", "int3", "int4", "int8", "q4_0", "q4_1", "q8_0", "iq4_nl", "nf4", "fp4"]


@pytest.fixture(scope="module")
def layer():
    return correlated_layer(1, 40, 256, 640, 10, 29, 5)


@pytest.mark.parametrize("fmt", TARGETS)
@pytest.mark.parametrize("act_order", [False, True])
def test_every_target_beats_rtn_exact_bytes(layer, fmt, act_order):
    W, X = layer
    g = G.GPTQ(W)
    g.add_batch(X)
    qt = g.quantize(format=fmt, act_order=act_order)
    assert qt.format == fmt and qt.shape == W.shape and (qt.perm is not None) == (act_order and fmt != "int8")  # int8: one group
    for backend in ("native", "reference", "numba"):  # the bytes decode to exactly GPTQ's choice
        np.testing.assert_array_equal(pq.dequantize(qt, backend=backend), g.values)
    rep = g.report(X)
    assert rep["gptq"] == pytest.approx(_rel(X, W, g.values), rel=1e-9)
    assert rep["gptq"] < 0.8 * rep["rtn"], rep
    # the matmul runs the result (through the perm)
    y = pq.matmul(X[:3], qt, compute="float")
    np.testing.assert_allclose(y, X[:3] @ g.values.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["int3", "int8", "q4_1", "iq4_nl", "nf4", "fp4"])
def test_numba_and_numpy_loops_agree(layer, fmt):
    W, X = layer
    a = G.quantize(W, X=X, format=fmt, act_order=True, backend="numba", blocksize=64)
    b = G.quantize(W, X=X, format=fmt, act_order=True, backend="numpy", blocksize=64)
    assert a == b


def test_bits_selects_int_width(layer):
    W, X = layer
    g = G.GPTQ(W)
    g.add_batch(X)
    errs = {}
    for bits in (2, 3, 4, 8):
        qt = g.quantize(format="int4", bits=bits, group_size=-1)  # int8 is per channel
        assert qt.format == f"int{bits}"
        errs[bits] = g.report(X)["gptq"]
    assert errs[2] > errs[3] > errs[4] > errs[8]


@pytest.mark.parametrize("group", [32, 128, 256])
def test_nf4_blocks_across_lazy_blocks(layer, group):
    W, X = layer
    g = G.GPTQ(W)
    g.add_batch(X)
    qt = g.quantize(format="nf4", group_size=group, blocksize=48)  # blocks straddle lazy blocks
    assert qt.group == group
    np.testing.assert_array_equal(pq.dequantize(qt), g.values)
    rep = g.report(X)
    assert rep["gptq"] < rep["rtn"]


def test_gptq_with_mse_search(layer):
    W, X = layer
    g = G.GPTQ(W)
    g.add_batch(X)
    g.quantize(format="int3", group_size=64, search="mse")
    with_search = g.report(X)["gptq"]
    np.testing.assert_array_equal(pq.dequantize(g.qtensor), g.values)
    g.quantize(format="int3", group_size=64)
    assert with_search < 1.05 * g.report(X)["gptq"]


# ---------------------------------------------------------------- MSE search for round-to-nearest
@pytest.mark.parametrize("fmt,opts", [("int2", {}), ("int3", {"sym": True}), ("int4", {"group": 32}),
                                      ("int4", {"group": -1}), ("int8", {}), ("q4_0", {}), ("q4_1", {}),
                                      ("q8_0", {}), ("iq4_nl", {}), ("nf4", {}), ("nf4", {"group": 128}),
                                      ("fp4", {}), ("fp4", {"group": 32})])
@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), zero_row=st.booleans())
def test_search_never_worse_per_block(fmt, opts, n, seed, zero_row):
    rng = np.random.default_rng(seed)
    k = 256
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 3, (n, 1))).astype(F32)
    w[rng.random(w.shape) < 0.01] *= 10
    if zero_row:
        w[0] = 0
    qs = pq.quantize(w, fmt, search="mse", **opts)
    qr = pq.quantize(w, fmt, **opts)
    assert qs.format == fmt and qs.params == qr.params and qs.nbytes == qr.nbytes
    ds = pq.dequantize(qs)
    np.testing.assert_array_equal(ds, pq.dequantize(qs, backend="reference"))
    gs = _grid.block_size(fmt, k, qs.params.get("group", 0))
    # per block, the searched grid is no worse in the search's own norm than the plain rule on
    # the same grid family (the plain rule is the search's first candidate)
    blocks = w.reshape(-1, gs)
    P0 = _grid.params(fmt, blocks, bool(qs.params.get("sym", 0)))
    _, v0 = _grid.codes_values(fmt, blocks, P0)
    e_search = (np.abs(ds.reshape(-1, gs) - blocks).astype(np.float64) ** 2.4).sum(axis=1)
    e_plain = (np.abs(v0 - blocks).astype(np.float64) ** 2.4).sum(axis=1)
    assert (e_search <= e_plain * (1 + 1e-9) + 1e-30).all()
    if zero_row:
        assert (ds[0] == 0).all()


def test_search_lowers_error_on_heavy_tails():
    rng = np.random.default_rng(3)
    w = rng.standard_t(3, size=(128, 512)).astype(F32)
    for fmt in ("int2", "int3", "int4", "q4_0", "nf4", "fp4"):
        e_rtn = np.mean((pq.dequantize(pq.quantize(w, fmt)) - w) ** 2)
        e_mse = np.mean((pq.dequantize(pq.quantize(w, fmt, search="mse")) - w) ** 2)
        assert e_mse < 0.97 * e_rtn, (fmt, e_mse, e_rtn)


def test_search_bad_input():
    w = np.ones((2, 64), F32)
    with pytest.raises(ValueError, match="search"):
        pq.quantize(w, "q4_0", search="grid")
    with pytest.raises(ValueError, match="search"):
        pq.quantize(np.ones((2, 256), F32), "q4_k", search="mse")
    with pytest.raises(ValueError, match="double_quant"):
        pq.quantize(w, "nf4", search="mse", double_quant=True)
    w[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pq.quantize(w, "q4_0", search="mse")


def test_float32_hessian_accumulation(layer):
    W, X = layer
    g64, g32 = G.GPTQ(W), G.GPTQ(W, hessian_dtype="float32")
    for i in range(0, len(X), 100):
        g64.add_batch(X[i:i + 100])
        g32.add_batch(X[i:i + 100])
    assert g32.H.dtype == np.float64
    np.testing.assert_allclose(g32.H, g64.H, rtol=1e-4, atol=1e-4 * np.abs(g64.H).max())
    np.testing.assert_allclose(g64.H, 2.0 / len(X) * X.astype(np.float64).T @ X, rtol=1e-9, atol=1e-9)
    q32 = g32.quantize(format="int4", group_size=64)
    assert g32.report(X)["gptq"] < 0.8 * g32.report(X)["rtn"]
    assert q32.shape == W.shape
    with pytest.raises(ValueError, match="hessian_dtype"):
        G.GPTQ(W, hessian_dtype="float16")
