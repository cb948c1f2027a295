"""int2 / int3: group-wise integer formats like int4 (GPTQ's quantizer with maxq 3 / 7).

Checked against a bit-level decoder written here from the layout (int2: 4 codes per byte, low
bits first; int3: little-endian 3-bit stream), across the three backends byte for byte, and
through both matmul computes and every variant."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pyqkern as pq

VARIANTS = pq.variants()


def decode(qt):
    """Independent dequantizer: walk the row's bits one code at a time."""
    bits = {"int2": 2, "int3": 3}[qt.format]
    n, k = qt.shape
    q, s, z = qt.sections()
    g = k if qt.group == -1 else qt.group
    out = np.empty((n, k), np.float32)
    for r in range(n):
        stream = int.from_bytes(q[r].tobytes(), "little")
        scales = s[r].view(np.float16).astype(np.float32)
        for i in range(k):
            c = (stream >> (bits * i)) & ((1 << bits) - 1)
            zero = (1 << (bits - 1)) if qt.sym else int(z[r, i // g])
            out[r, i] = np.float32(c - zero) * scales[i // g]
    return out


def expected_codes(w, bits, g, sym):
    """GPTQ's quantizer in float64-free float32 steps (as reference.intq_group_params)."""
    maxq = (1 << bits) - 1
    n, k = w.shape
    gw = w.reshape(n, -1, g if g != -1 else k)
    mn = np.minimum(gw.min(axis=2), 0).astype(np.float32)
    mx = np.maximum(gw.max(axis=2), 0).astype(np.float32)
    if sym:
        a = np.maximum(-mn, mx)
        mn, mx = -a, a
    both0 = (mn == 0) & (mx == 0)
    mn[both0], mx[both0] = -1, 1
    sf = ((mx - mn) / np.float32(maxq)).astype(np.float16).astype(np.float32)
    zero = np.full(sf.shape, (maxq + 1) // 2) if sym else np.clip(np.rint(-mn / sf), 0, maxq)
    c = np.clip(np.rint(gw / sf[:, :, None]) + zero[:, :, None], 0, maxq)
    return c.reshape(n, k).astype(np.int64)


@pytest.mark.parametrize("fmt", ["int2", "int3"])
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), groups=st.integers(1, 3), g=st.sampled_from([16, 32, 64, 128, -1]),
       sym=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 300.0]), special=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_backends_agree_and_decode(fmt, n, groups, g, sym, scale, special, seed):
    rng = np.random.default_rng(seed)
    k = groups * (g if g != -1 else 40)
    w = (rng.standard_normal((n, k)) * scale).astype(np.float32)
    if special:  # an all-zero row, a constant positive row, a lone outlier
        w[0] = 0
        if n > 1:
            w[1] = scale
        w[-1, rng.integers(k)] = 50 * scale
    qts = [pq.quantize(w, fmt, group=g, sym=sym, backend=b) for b in ("native", "reference", "numba")]
    for qt in qts[1:]:
        assert qt.data.tobytes() == qts[0].data.tobytes()
    for v in VARIANTS:
        assert pq.quantize(w, fmt, group=g, sym=sym, isa=v).data.tobytes() == qts[0].data.tobytes()
    ref = decode(qts[0])
    for b in ("native", "reference", "numba"):
        assert np.array_equal(pq.dequantize(qts[0], backend=b), ref)
    # codes are GPTQ's rule, and dequantization brings the weights back within half a step
    bits = int(fmt[3])
    stream = [int.from_bytes(r.tobytes(), "little") for r in qts[0].sections()[0]]
    codes = np.array([[(s >> (bits * i)) & ((1 << bits) - 1) for i in range(k)] for s in stream])
    np.testing.assert_array_equal(codes, expected_codes(w, bits, g, sym))


@pytest.mark.parametrize("fmt", ["int2", "int3"])
@pytest.mark.parametrize("g,sym", [(32, False), (128, True), (-1, False)])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 33])
def test_matmul_every_variant(fmt, g, sym, m):
    rng = np.random.default_rng(m)
    n, k = 19, 256
    w = rng.standard_normal((n, k)).astype(np.float32)
    qt = pq.quantize(w, fmt, group=g, sym=sym)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    wd = decode(qt).astype(np.float64)
    exact = x.astype(np.float64) @ wd.T + bias
    spec = pq.matmul(x, qt, bias, compute="int8", backend="reference")
    fl = pq.matmul(x, qt, bias, compute="float", backend="reference")
    bound = k * 2.0 ** -23 * (np.abs(x) @ np.abs(wd).T + np.abs(bias)) + 1e-6
    assert (np.abs(fl - exact) <= bound).all()
    for v in VARIANTS:
        assert np.array_equal(pq.matmul(x, qt, bias, compute="int8", isa=v), spec)
        assert (np.abs(pq.matmul(x, qt, bias, compute="float", isa=v) - exact) <= bound).all()
    assert (np.abs(pq.matmul(x, qt, bias, compute="float", backend="numba") - exact) <= bound).all()
    # the int8 product is off by the activation rounding only: half a step per element
    dx = np.abs(x).reshape(m, -1, 32).max(axis=2) / 127
    lim = np.repeat(dx / 2, 32, axis=1) @ np.abs(wd).T + 1e-4 * (np.abs(x) @ np.abs(wd).T) + 1e-5
    assert (np.abs(spec - exact) <= lim).all()
    lin = pq.QLinear(qt, bias)
    assert np.array_equal(lin(x), spec)


def test_sizes_and_more_bits_less_error():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    errs = {}
    for fmt, bits in (("int2", 2), ("int3", 3), ("int4", 4)):
        qt = pq.quantize(w, fmt, group=128)
        assert qt.nbytes == 64 * (512 * bits // 8 + 4 * 2 + 4)
        assert qt.bits_per_weight == pytest.approx(bits + 24 / 128)
        errs[fmt] = float(np.abs(pq.dequantize(qt) - w).mean())
    assert errs["int2"] > errs["int3"] > errs["int4"]
    back = pq.QTensor.from_bytes("int3", (64, 512), pq.quantize(w, "int3").data, group=128)
    assert back == pq.quantize(w, "int3")


@pytest.mark.parametrize("fmt,k,opts", [("int3", 44, {"group": -1}), ("int2", 42, {"group": -1}),
                                        ("int3", 96, {"group": 64}), ("int2", 64, {"group": 8}),
                                        ("int3", 64, {"double_quant": True})])
def test_bad_params(fmt, k, opts):
    with pytest.raises(ValueError, match=fmt):
        pq.quantize(np.ones((2, k), np.float32), fmt, **opts)
