"""pyqkern.lora.backward / backward_base: QLoRA gradients against float64 references and finite
differences; dy @ W in row chunks without materialising W."""
from __future__ import annotations

import numpy as np
import pytest

import pyqkern as pq
from pyqkern import lora

N, K, R = 40, 256, 6
FORMATS = [("q4_0", {}), ("q4_k", {}), ("q6_k", {}), ("iq4_nl", {}), ("nf4", {"double_quant": True}),
           ("int4", {"group": 64}), ("int8", {})]
IDS = [f for f, _ in FORMATS]


def _setup(fmt, kw, lead=(3, 5), seed=0, alpha=12.0, rslora=False):
    rng = np.random.default_rng(seed)
    qt = pq.quantize(rng.standard_normal((N, K)).astype(np.float32), fmt, **kw)
    ad = pq.LoRA(rng.standard_normal((R, K)).astype(np.float32) * 0.1,
                 rng.standard_normal((N, R)).astype(np.float32) * 0.1, alpha, rslora=rslora)
    x = rng.standard_normal(lead + (K,)).astype(np.float32)
    dy = rng.standard_normal(lead + (N,)).astype(np.float32)
    return qt, ad, x, dy


def _ref64(x, dy, qt, ad):
    w = pq.dequantize(qt).astype(np.float64)
    a, b, s = ad.A.astype(np.float64), ad.B.astype(np.float64), ad.scale
    x2, d2 = x.reshape(-1, K).astype(np.float64), dy.reshape(-1, N).astype(np.float64)
    t = x2 @ a.T
    dt = s * d2 @ b
    return (d2 @ w + dt @ a).reshape(x.shape), dt.T @ x2, s * d2.T @ t


def _close(got, want, rtol=2e-5):
    assert got.dtype == np.float32 and got.shape == want.shape
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err < rtol, err


@pytest.mark.parametrize("fmt,kw", FORMATS, ids=IDS)
def test_backward_matches_float64(fmt, kw):
    qt, ad, x, dy = _setup(fmt, kw, rslora=(fmt == "q4_k"))
    dx, dA, dB = lora.backward(x, dy, qt, ad, chunk_rows=7)
    for got, want in zip((dx, dA, dB), _ref64(x, dy, qt, ad)):
        _close(got, want)
    assert dx.shape == x.shape and dA.shape == (R, K) and dB.shape == (N, R)


def test_backward_finite_differences():
    """Gradients of L = sum(G * y) for the float64 forward y = x W^T + s (x A^T) B^T."""
    qt, ad, x, g = _setup("q4_1", {}, lead=(4,), seed=3)
    w = pq.dequantize(qt).astype(np.float64)
    s = ad.scale

    def loss(x_, a_, b_):
        y = x_ @ w.T + s * (x_ @ a_.T) @ b_.T
        return float(np.sum(g * y))

    x64, a64, b64 = x.astype(np.float64), ad.A.astype(np.float64), ad.B.astype(np.float64)
    dx, dA, dB = lora.backward(x, g, qt, ad)
    rng = np.random.default_rng(7)
    h = 1e-3
    for _ in range(3):
        vx, va, vb = rng.standard_normal(x.shape), rng.standard_normal(a64.shape), rng.standard_normal(b64.shape)
        fd_x = (loss(x64 + h * vx, a64, b64) - loss(x64 - h * vx, a64, b64)) / (2 * h)
        fd_a = (loss(x64, a64 + h * va, b64) - loss(x64, a64 - h * va, b64)) / (2 * h)
        fd_b = (loss(x64, a64, b64 + h * vb) - loss(x64, a64, b64 - h * vb)) / (2 * h)
        np.testing.assert_allclose(np.sum(dx * vx), fd_x, rtol=1e-4)
        np.testing.assert_allclose(np.sum(dA * va), fd_a, rtol=1e-4)
        np.testing.assert_allclose(np.sum(dB * vb), fd_b, rtol=1e-4)


@pytest.mark.parametrize("fmt,kw", FORMATS, ids=IDS)
@pytest.mark.parametrize("chunk", [1, 7, 256, N])
def test_backward_base_chunked_equals_dense(fmt, kw, chunk):
    qt, _, _, dy = _setup(fmt, kw, lead=(2, 3))
    got = lora.backward_base(dy, qt, chunk_rows=chunk)
    want = dy.reshape(-1, N) @ pq.dequantize(qt)
    assert got.shape == (2, 3, K)
    _close(got.reshape(-1, K), want, rtol=1e-5)
    np.testing.assert_array_equal(got, lora.backward_base(dy, qt, chunk_rows=chunk))  # deterministic


def test_backward_base_never_dequantizes_the_whole_weight(monkeypatch):
    qt, ad, x, dy = _setup("q8_0", {})
    seen = []
    real = lora.dequantize

    def spy(q, **kw):
        seen.append(q.shape[0])
        return real(q, **kw)

    monkeypatch.setattr(lora, "dequantize", spy)
    lora.backward(x, dy, qt, ad, chunk_rows=16)
    assert seen == [16, 16, 8]


def test_backward_vector_and_empty_batch():
    qt, ad, x, dy = _setup("int8", {}, lead=())
    dx, dA, dB = lora.backward(x, dy, qt, ad)
    assert dx.shape == (K,)
    for got, want in zip((dx, dA, dB), _ref64(x, dy, qt, ad)):
        _close(got, want.reshape(got.shape))
    dx, dA, dB = lora.backward(np.zeros((0, K), np.float32), np.zeros((0, N), np.float32), qt, ad)
    assert dx.shape == (0, K) and not dA.any() and not dB.any()


def test_backward_half_inputs():
    qt, ad, x, dy = _setup("q4_0", {}, lead=(5,))
    x16, dy16 = x.astype(np.float16), dy.astype(np.float16)
    got = lora.backward(x16, dy16, qt, ad)
    want = lora.backward(x16.astype(np.float32), dy16.astype(np.float32), qt, ad)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    # bf16 as uint16 bits, ml_dtypes or torch tensors: the x forms matmul takes (review: refused)
    import ml_dtypes
    bits = lambda a: (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # noqa: E731
    xb, dyb = bits(x), bits(dy)
    want = lora.backward((xb.astype(np.uint32) << 16).view(np.float32), (dyb.astype(np.uint32) << 16).view(np.float32),
                         qt, ad)
    forms = [(xb, dyb), (xb.view(ml_dtypes.bfloat16), dyb.view(ml_dtypes.bfloat16))]
    torch = pytest.importorskip("torch")
    forms.append((torch.from_numpy(xb.view(np.int16)).view(torch.bfloat16),
                  torch.from_numpy(dyb.view(np.int16)).view(torch.bfloat16).requires_grad_(True)))
    for fx, fdy in forms:
        for g, w in zip(lora.backward(fx, fdy, qt, ad), want):
            np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(lora.backward_base(torch.from_numpy(dy), qt), lora.backward_base(dy, qt))


def test_backward_bad_inputs():
    qt, ad, x, dy = _setup("q4_0", {}, lead=(5,))
    with pytest.raises(ValueError, match="K=256"):
        lora.backward(x[:, :128], dy, qt, ad)
    with pytest.raises(ValueError, match="N=40"):
        lora.backward(x, dy[:, :10], qt, ad)
    with pytest.raises(ValueError, match="leading dimensions"):
        lora.backward(x, dy[:4], qt, ad)
    with pytest.raises(TypeError, match="float64"):
        lora.backward(x.astype(np.float64), dy, qt, ad)
    with pytest.raises(TypeError, match="int32"):
        lora.backward_base(dy.astype(np.int32), qt)
    with pytest.raises(TypeError, match="numpy array"):
        lora.backward(x.tolist(), dy, qt, ad)
    with pytest.raises(ValueError, match=r"dy is empty \(shape \(3, 0\)\)"):
        lora.backward_base(np.zeros((3, 0), np.float32), qt)
    with pytest.raises(ValueError, match="at least one dimension"):
        lora.backward_base(np.array(1.0, np.float32), qt)
    with pytest.raises(TypeError, match="QTensor"):
        lora.backward_base(dy, pq.dequantize(qt))
    with pytest.raises(ValueError, match="adapter is for"):
        lora.backward(x, dy, qt, pq.LoRA(ad.A[:, :128], ad.B))
    with pytest.raises(ValueError, match="chunk_rows"):
        lora.backward_base(dy, qt, chunk_rows=0)
    dora = pq.LoRA(ad.A, ad.B, magnitude=np.ones(N, np.float32))
    with pytest.raises(NotImplementedError, match="DoRA"):
        lora.backward(x, dy, qt, dora)
