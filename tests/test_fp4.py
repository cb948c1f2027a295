"""fp4: bitsandbytes FP4 (absmax per block like nf4, two codes per byte with the first element in
the HIGH nibble, a 16-entry FP4 code book in bit-pattern order with the sign in bit 3).

Checked against a decoder and an encoder written here from the spec (raw
magnitudes {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12, code = nearest value of x * (1/absmax)), across
the three backends and every native variant byte for byte, through both matmul computes, with
double quantization, and against external implementations: onnxruntime's MatMulBnb4
(quant_type 0 = FP4) and, where it is installed, bitsandbytes itself."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pyqkern as pq

F32 = np.float32
VARIANTS = pq.variants()
BACKENDS = ("native", "reference", "numba")
RAW = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]          # magnitude of bits 0..2, before / 12


def code_value(c):
    mag = F32(F32(RAW[c & 7]) / F32(12))
    return -mag if c & 8 else mag


def codes_of(qt):
    """[N, K] 4-bit codes, element 2i from the high nibble of byte i."""
    q = qt.sections()[0]
    out = np.empty(qt.shape, np.int64)
    out[:, 0::2] = q >> 4
    out[:, 1::2] = q & 0xF
    return out


def decode(qt):
    """Independent dequantizer: one element at a time from the bytes and the absmax."""
    n, k = qt.shape
    q, s, _ = qt.sections()
    g = qt.group
    out = np.empty((n, k), F32)
    for r in range(n):
        amax = s[r].view(F32)
        for i in range(k):
            byte = int(q[r, i // 2])
            c = byte >> 4 if i % 2 == 0 else byte & 0xF
            out[r, i] = code_value(c) * amax[i // g]
    return out


def expected_codes(w, g):
    """Spec encoder: v = x * (1 / max(absmax, 1e-38)) in fp32; nearest magnitude (float64
    distances, a tie to the smaller magnitude), sign bit for v < 0."""
    n, k = w.shape
    b = w.reshape(n, -1, g).astype(F32)
    amax = np.abs(b).max(axis=2, keepdims=True)
    v = (b * (F32(1) / np.maximum(amax, F32(1e-38)))).astype(F32).astype(np.float64)
    mags = np.array([float(code_value(c)) for c in range(8)])
    order = np.argsort(mags, kind="stable")                  # ascending magnitudes, their codes
    dist = np.abs(np.abs(v)[..., None] - mags[order])
    c = order[np.argmin(dist, axis=-1)]                      # argmin keeps the first (smaller) on ties
    return (c | np.where(v < 0, 8, 0)).reshape(n, k)


def test_code_book_and_format_entry():
    from pyqkern import reference
    want = np.array([code_value(c) for c in range(16)], F32)
    assert want.view(np.uint32).tolist() == reference.FP4_CODE.view(np.uint32).tolist()   # incl. -0.0
    assert np.signbit(reference.FP4_CODE[8]) and reference.FP4_CODE[3] == 1 and reference.FP4_CODE[11] == -1
    assert "fp4" in pq.formats() and pq.formats()[-1] == "fp4"
    qt = pq.quantize(np.ones((2, 128), F32), "fp4")
    assert qt.group == 64 and qt.nbytes == 2 * (64 + 2 * 4) and qt.bits_per_weight == pytest.approx(4.5)
    assert "fp4" in repr(qt) and "group=64" in repr(qt)
    # every code decodes through each backend to its table value times absmax
    q = np.arange(256, dtype=np.uint8).reshape(4, 64)
    s = np.array([[2.5, -0.75]] * 4, F32).view(np.uint8)
    t = pq.QTensor.from_bytes("fp4", (4, 128), np.concatenate([q.ravel(), s.ravel()]))
    for b in BACKENDS:
        assert np.array_equal(pq.dequantize(t, backend=b), decode(t))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), blocks=st.integers(1, 3), g=st.sampled_from([32, 64, 128, 256, 1024]),
       scale=st.sampled_from([1e-3, 1.0, 300.0]), special=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_backends_agree_and_match_spec(n, blocks, g, scale, special, seed):
    rng = np.random.default_rng(seed)
    k = blocks * g
    w = (rng.standard_normal((n, k)) * scale).astype(F32)
    if special:  # an all-zero block, a constant row, a lone outlier, signed zeros and tiny values
        w[0, :g] = 0
        if n > 1:
            w[1] = -scale
        w[-1, rng.integers(k)] = 50 * scale
        w[0, g // 2] = -0.0
        if k > g:
            w[0, g:g + 4] = [1e-30, -1e-30, 0.0, -0.0]
    qts = [pq.quantize(w, "fp4", group=g, backend=b) for b in BACKENDS]
    for qt in qts[1:]:
        assert qt.data.tobytes() == qts[0].data.tobytes()
    for v in VARIANTS:
        assert pq.quantize(w, "fp4", group=g, isa=v).data.tobytes() == qts[0].data.tobytes()
    np.testing.assert_array_equal(codes_of(qts[0]), expected_codes(w, g))
    amax = np.abs(w.reshape(n, -1, g)).max(axis=2)
    assert np.array_equal(qts[0].sections()[1].view(F32), amax)
    ref = decode(qts[0])
    for b in BACKENDS:
        y = pq.dequantize(qts[0], backend=b)
        assert np.array_equal(y.view(np.uint32), ref.view(np.uint32)), b     # same bits, signed zeros too
    for v in VARIANTS:
        assert np.array_equal(pq.dequantize(qts[0], isa=v).view(np.uint32), ref.view(np.uint32)), v


def test_ties_signs_and_zero_blocks():
    """Exact fp32 midpoints go to the smaller magnitude, the next float up to the larger one; the
    sign bit follows v < 0 (-0.0 keeps code 0, a tiny negative value gets 8 = -0.0); an all-zero
    block stores absmax 0 and codes 0; a subnormal absmax uses the clamped reciprocal."""
    mags = sorted((float(code_value(c)), c) for c in range(8))
    mids = [F32((F32(a) + F32(b)) * F32(0.5)) for (a, _), (b, _) in zip(mags, mags[1:])]
    row = [F32(1.0)]
    want = [3]
    for i, m in enumerate(mids):
        up = np.nextafter(m, F32(2))
        for v, c in ((m, mags[i][1]), (up, mags[i + 1][1]), (-m, mags[i][1] | 8), (-up, mags[i + 1][1] | 8)):
            row.append(F32(v))
            want.append(c)
    row += [F32(-0.0), F32(-1e-30), F32(1e-30), F32(0.0)]
    want += [0, 8, 0, 0]
    row += [F32(0.0)] * (64 - len(row))
    want += [0] * (64 - len(want))
    w = np.array([row, [0.0] * 64, [1e-39] * 63 + [-2e-39]], F32)
    for b in BACKENDS:
        qt = pq.quantize(w, "fp4", group=64, backend=b)
        c = codes_of(qt)
        assert c[0].tolist() == want, b
        assert c[1].tolist() == [0] * 64 and qt.sections()[1].view(F32)[1, 0] == 0
        assert np.array_equal(c[2], expected_codes(w, 64)[2]), b
        assert not pq.dequantize(qt, backend=b)[1].any()


@pytest.mark.parametrize("group", [32, 64, 128, 4096])
def test_error_bound_and_exact_absmax(group):
    rng = np.random.default_rng(group)
    n, k = 3, max(1024, group)
    w = (rng.standard_normal((n, k)) * 0.05).astype(F32)
    qt = pq.quantize(w, "fp4", group=group)
    assert qt.nbytes == n * k // 2 + n * (k // group) * 4
    y = pq.dequantize(qt)
    amax = np.abs(w.reshape(n, -1, group)).max(axis=2, keepdims=True)
    half_gap = max(float(b - a) for a, b in zip(sorted(float(code_value(c)) for c in range(8))[:-1],
                                                 sorted(float(code_value(c)) for c in range(8))[1:])) / 2
    assert (np.abs(y - w).reshape(n, -1, group) <= amax * half_gap * (1 + 1e-6)).all()
    assert np.array_equal(np.abs(y.reshape(n, -1, group)).max(axis=2, keepdims=True), amax)
    # fp4 and nf4 share the layout and differ only in the code book
    nf = pq.quantize(w, "nf4", group=group)
    assert nf.nbytes == qt.nbytes and np.array_equal(nf.sections()[1], qt.sections()[1])


@pytest.mark.parametrize("group", [64, 256])
def test_double_quant(group):
    rng = np.random.default_rng(7)
    n, k = 16, 2048
    w = (rng.standard_normal((n, k)) * 0.05).astype(F32)
    plain = pq.quantize(w, "fp4", group=group)
    dq = pq.quantize(w, "fp4", group=group, double_quant=True)
    assert dq.params["double_quant"] and repr(dq).count("double_quant") == 1
    nblk = n * k // group
    assert dq.nbytes == n * k // 2 + nblk + 4 * -(-nblk // 256) + 4 + 4 * 256
    assert np.array_equal(dq.sections()[0], plain.sections()[0])      # same codes, compressed absmax
    for b in BACKENDS:
        assert pq.quantize(w, "fp4", group=group, double_quant=True, backend=b) == dq
        assert np.array_equal(pq.dequantize(dq, backend=b), decode(dq))
    a_plain = plain.sections()[1].view(F32)
    assert np.abs(dq.sections()[1].view(F32) - a_plain).max() <= 0.01 * np.abs(a_plain - a_plain.mean()).max()
    again = pq.QTensor.from_bytes("fp4", (n, k), dq.data.tobytes(), group=group, double_quant=True)
    assert again == dq
    x = rng.standard_normal((3, k)).astype(F32)
    assert np.array_equal(pq.matmul(x, dq, compute="int8"), pq.matmul(x, dq, compute="int8", backend="reference"))


@pytest.mark.parametrize("dq", [False, True], ids=["absmax", "double"])
@pytest.mark.parametrize("g", [32, 64, 512])
@pytest.mark.parametrize("m", [1, 3, 9, 33])
def test_matmul_every_variant(g, m, dq):
    rng = np.random.default_rng(m + g)
    n, k = 19, 1024
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 1.0, size=(n, 1))).astype(F32)
    qt = pq.quantize(w, "fp4", group=g, double_quant=dq)
    x = rng.standard_normal((m, k)).astype(F32)
    x[rng.random((m, k)) < 0.01] *= 50
    bias = rng.standard_normal(n).astype(F32)
    wd = decode(qt).astype(np.float64)
    exact = x.astype(np.float64) @ wd.T + bias
    bound = k * 2.0 ** -23 * (np.abs(x) @ np.abs(wd).T + np.abs(bias)) + 1e-6
    spec = pq.matmul(x, qt, bias, compute="int8", backend="reference")
    assert (np.abs(pq.matmul(x, qt, bias, compute="float", backend="reference") - exact) <= bound).all()
    assert (np.abs(pq.matmul(x, qt, bias, compute="float", backend="numba") - exact) <= bound).all()
    for v in VARIANTS:
        assert np.array_equal(pq.matmul(x, qt, bias, compute="int8", isa=v), spec), v
        assert (np.abs(pq.matmul(x, qt, bias, compute="float", isa=v) - exact) <= bound).all(), v
    # int8: the code book rounded to 1/127 of absmax (w8) and activations rounded to dx/2 per element
    amax = np.repeat(qt.sections()[1].view(F32).astype(np.float64), g, axis=1)
    table = np.array([np.rint(127 * float(code_value(c))) for c in range(16)])
    w8 = table[codes_of(qt)] * (amax / 127)
    dx = np.abs(x).reshape(m, -1, 32).max(axis=2) / 127
    lim = (np.repeat(dx / 2, 32, axis=1) @ np.abs(w8).T + np.abs(x) @ np.abs(wd - w8).T
           + 1e-5 * (np.abs(x) @ np.abs(wd).T + np.abs(bias)) + 1e-6)
    assert (np.abs(spec - exact) <= lim).all()
    assert np.array_equal(pq.QLinear(qt, bias)(x), spec)


@pytest.mark.parametrize("k,opts", [(96, {}), (192, {"group": 128}), (256, {"group": 48}), (256, {"group": 16}),
                                    (8192, {"group": 8192}), (256, {"group": -1}), (256, {"sym": True})])
def test_bad_params(k, opts):
    for b in BACKENDS:
        with pytest.raises(ValueError, match="fp4"):
            pq.quantize(np.ones((2, k), F32), "fp4", backend=b, **opts)


def test_matches_onnxruntime_matmulbnb4():
    """ORT's com.microsoft.MatMulBnb4 with quant_type 0 implements bitsandbytes FP4: an identity
    input reads back every dequantized weight exactly."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(20)
    n, k, bs = 24, 128, 64
    w = rng.standard_normal((n, k)).astype(F32)
    w[0, :5] = [0.0, -0.0, -1e-30, 1e-30, 0.0]
    qt = pq.quantize(w, "fp4", group=bs)
    q, s, _ = qt.sections()
    node = helper.make_node("MatMulBnb4", ["A", "B", "absmax"], ["Y"], domain="com.microsoft", K=k, N=n,
                            block_size=bs, quant_type=0)
    graph = helper.make_graph([node], "fp4", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(q.reshape(-1), "B"),
                               numpy_helper.from_array(s.view(F32).reshape(-1), "absmax")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    assert np.array_equal(sess.run(None, {"A": np.eye(k, dtype=F32)})[0], decode(qt).T)


def test_matches_bitsandbytes_if_installed():
    """bitsandbytes' own FP4 (CPU): same absmax and codes (up to which of the two zero codes,
    +0 / -0, a value within 1/384 of absmax of zero gets: bitsandbytes' torch path assigns them by
    the order of its sorted code table), same dequantized values; its serialized quant state reads
    losslessly and ours loads into its QuantState."""
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional")
    from pyqkern.io import from_bnb, to_bnb
    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 512)).astype(F32)
    for bs in (64, 256):
        q, state = F.quantize_4bit(torch.from_numpy(w), blocksize=bs, quant_type="fp4")
        qt = pq.quantize(w, "fp4", group=bs)
        assert np.array_equal(state.absmax.numpy(), qt.sections()[1].view(F32).reshape(-1))
        theirs = q.numpy().reshape(-1)
        tc = np.stack([theirs >> 4, theirs & 15], axis=1).reshape(w.shape)
        ours = codes_of(qt)
        assert np.array_equal(tc & 7, ours & 7)
        assert np.array_equal(tc[(tc & 7) != 0], ours[(ours & 7) != 0])
        assert np.array_equal(F.dequantize_4bit(q, state).numpy(), pq.dequantize(qt))
    for dq in (False, True):
        q, state = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="fp4", compress_statistics=dq)
        packed = {key: v.numpy() for key, v in state.as_dict(packed=True).items()}
        got = from_bnb(q.numpy(), packed)
        assert got.format == "fp4" and bool(got.params["double_quant"]) == dq
        assert np.array_equal(pq.dequantize(got), F.dequantize_4bit(q, state).numpy())
        weight, ours = to_bnb(got, packed=True)
        back = F.QuantState.from_dict({key: torch.from_numpy(v) for key, v in ours.items()}, torch.device("cpu"))
        assert back.quant_type == "fp4" and back.nested == dq
        assert np.array_equal(F.dequantize_4bit(torch.from_numpy(weight), back).numpy(), pq.dequantize(got))
