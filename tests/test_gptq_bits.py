"""GPTQ checkpoints with 2, 3 and 8 bits <-> pyqkern int2 / int3 / int8 (4-bit: tests/test_convert.py).

The packed tensors here are built and read by a deliberately naive per-value implementation of
GPTQ's layout written from the spec (AutoGPTQ's pack): qweight int32
[K*b/32, N] packs the codes of each column along K, qzeros int32 [G, N*b/32] the stored zeros of
each group row along N; b = 2 and 8 put 32/b codes in a word, code j at bits b*j; b = 3 packs 32
codes into 3 words: codes 0..9 at bits 3j of word 0, code 10 split (its low 2 bits in bits 30..31
of word 0, its high bit in bit 0 of word 1), codes 11..20 at bits 3j+1 of word 1, code 21 split (low
bit in bit 31 of word 1, high 2 bits in bits 0..1 of word 2), codes 22..31 at bits 3j+2 of word 2.
v1 stores zero - 1, v2 the zero itself."""
import json

import numpy as np
import pytest

import pyqkern as pq
from pyqkern.io import safetensors as st
from pyqkern.io.convert_gptq import from_gptq, load_gptq_dir, to_gptq

F32 = np.float32
VARIANTS = pq.variants()


# ------------------------------------------------------------------ the layout, value by value
def _pieces(i, bits):
    """[(word offset, bit in word, bit of the code, width)] of code i (0 <= i < 32/b, 32 for b=3)."""
    if bits != 3:
        return [(0, bits * i, 0, bits)]
    if i < 10:
        return [(0, 3 * i, 0, 3)]
    if i == 10:
        return [(0, 30, 0, 2), (1, 0, 2, 1)]
    if i < 21:
        return [(1, 3 * (i - 11) + 1, 0, 3)]
    if i == 21:
        return [(1, 31, 0, 1), (2, 0, 1, 2)]
    return [(2, 3 * (i - 22) + 2, 0, 3)]


def _per_unit(bits):
    return (32, 3) if bits == 3 else (32 // bits, 1)


def get_code(words, idx, bits):
    """Code idx of a 1-D sequence of int32 words."""
    per, nw = _per_unit(bits)
    base, i = idx // per * nw, idx % per
    c = 0
    for wo, wb, cb, width in _pieces(i, bits):
        w = int(words[base + wo]) & 0xFFFFFFFF
        c |= ((w >> wb) & ((1 << width) - 1)) << cb
    return c


def pack_seq(codes, bits):
    """1-D codes -> int32 words (the inverse of get_code)."""
    per, nw = _per_unit(bits)
    words = [0] * (len(codes) // per * nw)
    for idx, c in enumerate(codes):
        base, i = idx // per * nw, idx % per
        for wo, wb, cb, width in _pieces(i, bits):
            words[base + wo] |= ((int(c) >> cb) & ((1 << width) - 1)) << wb
    return np.array(words, np.uint32).view(np.int32)


def ref_gptq(qweight, qzeros, scales, g_idx, bits, v1):
    """W [N, K] = scales[g, n] * (q[k, n] - zero[g, n]), zero = stored (+1 for v1)."""
    per, nw = _per_unit(bits)
    k, n = qweight.shape[0] // nw * per, qweight.shape[1]
    w = np.zeros((n, k), F32)
    for nn in range(n):
        col = qweight[:, nn]
        for kk in range(k):
            g = int(g_idx[kk])
            z = get_code(qzeros[g], nn, bits) + (1 if v1 else 0)
            w[nn, kk] = F32(scales[g, nn]) * F32(get_code(col, kk, bits) - z)
    return w


def rand_gptq(rng, bits, k, n, gs, v1, sym=False, act_order=False):
    g = k // gs
    maxq, half = (1 << bits) - 1, 1 << (bits - 1)
    codes = rng.integers(0, maxq + 1, size=(k, n))
    codes[0, 0], codes[1, 0] = 0, maxq                    # both ends of the code range
    if sym:
        zeros = np.full((g, n), half - 1 if v1 else half)
    else:
        zeros = rng.integers(0, maxq if v1 else maxq + 1, size=(g, n))   # v1 cannot store maxq
    qweight = np.stack([pack_seq(codes[:, c], bits) for c in range(n)], axis=1)
    qzeros = np.stack([pack_seq(zeros[r], bits) for r in range(g)], axis=0)
    sc = rng.uniform(0.001, 0.05, size=(g, n)).astype(np.float16)
    g_idx = (np.arange(k) // gs).astype(np.int32)
    if act_order:
        g_idx = rng.permutation(g_idx).astype(np.int32)
    return qweight, qzeros, sc, g_idx


def test_naive_layout_matches_the_3bit_word_scheme():
    """The test's own packer, checked on a hand-computed unit: codes 0..31 = i % 8."""
    words = pack_seq([i % 8 for i in range(32)], 3).view(np.uint32)
    w0 = sum((i % 8) << (3 * i) for i in range(10)) | ((10 % 8) & 3) << 30
    w1 = ((10 % 8) >> 2) | sum(((i % 8) << (3 * (i - 11) + 1)) for i in range(11, 21)) | ((21 % 8) & 1) << 31
    w2 = ((21 % 8) >> 1) | sum(((i % 8) << (3 * (i - 22) + 2)) for i in range(22, 32))
    assert words.tolist() == [w0 & 0xFFFFFFFF, w1 & 0xFFFFFFFF, w2 & 0xFFFFFFFF]


# ------------------------------------------------------------------ 2 and 3 bits
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("v1", [True, False], ids=["v1", "v2"])
@pytest.mark.parametrize("gs", [32, 64, -1])
def test_roundtrip_and_dequant(bits, v1, gs):
    rng = np.random.default_rng(bits * 10 + v1 + max(gs, 0))
    k, n = 128, 32
    qw, qz, sc, gi = rand_gptq(rng, bits, k, n, k if gs == -1 else gs, v1)
    fmt = "v1" if v1 else "v2"
    qt = from_gptq(qw, qz, sc, gi, bits=bits, format=fmt)
    assert qt.format == f"int{bits}" and qt.shape == (n, k) and qt.group == gs and not qt.sym
    ref = ref_gptq(qw, qz, sc, gi, bits, v1)
    for b in ("native", "reference", "numba"):
        np.testing.assert_array_equal(pq.dequantize(qt, backend=b), ref)
    back = to_gptq(qt, format=fmt)
    assert back["bits"] == bits
    for name, a in (("qweight", qw), ("qzeros", qz), ("scales", sc), ("g_idx", gi)):
        assert back[name].dtype == a.dtype and back[name].shape == a.shape, name
        np.testing.assert_array_equal(back[name], a, err_msg=name)
    assert from_gptq(**back, format=fmt) == qt
    assert from_gptq(qw, qz, sc, None, bits=bits, format=fmt) == qt


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("v1", [True, False], ids=["v1", "v2"])
def test_sym_detection_and_zero_point_formats(bits, v1):
    rng = np.random.default_rng(30 + bits)
    k, n, gs = 64, 32, 32
    half = 1 << (bits - 1)
    qw, qz, sc, gi = rand_gptq(rng, bits, k, n, gs, v1, sym=True)
    qt = from_gptq(qw, qz, sc, gi, bits=bits)                  # format="auto"
    assert qt.sym and qt.format == f"int{bits}"
    np.testing.assert_array_equal(pq.dequantize(qt), ref_gptq(qw, qz, sc, gi, bits, v1))
    back = to_gptq(qt, format="v1" if v1 else "v2")
    np.testing.assert_array_equal(back["qzeros"], qz)
    np.testing.assert_array_equal(back["qweight"], qw)
    # the other zero-point convention: every stored zero moves by one
    other = to_gptq(qt, format="v2" if v1 else "v1")
    assert {get_code(other["qzeros"][0], i, bits) for i in range(n)} == {half if v1 else half - 1}
    assert from_gptq(**other) == qt
    # an explicit format wins over the heuristic (read with the wrong convention => asymmetric)
    assert not from_gptq(qw, qz, sc, gi, bits=bits, format="v2" if v1 else "v1").sym
    with pytest.raises(ValueError, match=f"not all {half}"):
        from_gptq(qw, qz, sc, gi, bits=bits, format="v2" if v1 else "v1", sym=True)


@pytest.mark.parametrize("bits", [2, 3])
def test_v1_overflow_and_v2_zero_zero(bits):
    rng = np.random.default_rng(40 + bits)
    maxq = (1 << bits) - 1
    k, n, gs = 64, 32, 32
    qw, qz, sc, gi = rand_gptq(rng, bits, k, n, gs, v1=False)
    zeros = np.array([[get_code(qz[r], c, bits) for c in range(n)] for r in range(k // gs)])
    zeros[0, 3], zeros[1, 5] = maxq, 0
    qz = np.stack([pack_seq(zeros[r], bits) for r in range(k // gs)])
    with pytest.raises(ValueError, match="overflow"):
        from_gptq(qw, qz, sc, gi, bits=bits, format="v1")
    with pytest.raises(ValueError, match="overflow"):
        from_gptq(qw, qz, sc, gi, bits=bits)                   # auto assumes v1 for asymmetric zeros
    qt = from_gptq(qw, qz, sc, gi, bits=bits, format="v2")
    np.testing.assert_array_equal(pq.dequantize(qt), ref_gptq(qw, qz, sc, gi, bits, False))
    with pytest.raises(ValueError, match="zero point is 0"):
        to_gptq(qt, format="v1")


@pytest.mark.parametrize("bits", [2, 3])
def test_act_order_exact_and_matmul(bits):
    rng = np.random.default_rng(50 + bits)
    k, n, gs = 128, 32, 32
    qw, qz, sc, gi = rand_gptq(rng, bits, k, n, gs, v1=True, act_order=True)
    assert not np.array_equal(gi, np.sort(gi))
    qt = from_gptq(qw, qz, sc, gi, bits=bits, format="v1")
    assert qt.perm is not None
    ref = ref_gptq(qw, qz, sc, gi, bits, True)
    np.testing.assert_array_equal(pq.dequantize(qt), ref)
    back = to_gptq(qt, format="v1")
    for name, a in (("qweight", qw), ("qzeros", qz), ("scales", sc), ("g_idx", gi)):
        np.testing.assert_array_equal(back[name], a, err_msg=name)
    x = rng.standard_normal((3, k)).astype(F32)
    want = x.astype(np.float64) @ ref.T.astype(np.float64)
    for compute in ("float", "int8"):
        tol = 1e-4 if compute == "float" else 2e-2
        np.testing.assert_allclose(pq.matmul(x, qt, compute=compute), want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("fmt", ["int2", "int3"])
def test_from_pyqkern_quantize(fmt):
    rng = np.random.default_rng(60)
    bits = int(fmt[3])
    w = rng.standard_normal((32, 128)).astype(F32)
    for kw in ({"group": 32}, {"group": 64, "sym": True}, {"group": -1}):
        qt = pq.quantize(w, fmt, **kw)
        d = to_gptq(qt)
        assert d["qweight"].shape == (128 * bits // 32, 32) and d["qzeros"].shape[1] == 32 * bits // 32
        np.testing.assert_array_equal(ref_gptq(d["qweight"], d["qzeros"], d["scales"], d["g_idx"], bits, False),
                                      pq.dequantize(qt))
        assert from_gptq(**d, format="v2") == qt
    qt = pq.quantize(w, fmt, group=32).with_perm(rng.permutation(128))
    back = from_gptq(**to_gptq(qt), format="v2")
    np.testing.assert_array_equal(pq.dequantize(back), pq.dequantize(qt))


def test_shape_errors():
    rng = np.random.default_rng(70)
    qw, qz, sc, gi = rand_gptq(rng, 3, 64, 32, 32, v1=False)
    with pytest.raises(ValueError, match="multiple of 3"):
        from_gptq(qw[:5], qz, sc, bits=3, format="v2")
    with pytest.raises(ValueError, match="qzeros"):
        from_gptq(qw, qz[:, :2], sc, bits=3, format="v2")
    with pytest.raises(ValueError, match="multiple of 32"):
        from_gptq(qw[:, :16], qz, sc[:, :16], bits=3, format="v2")
    with pytest.raises(NotImplementedError, match="bits"):
        from_gptq(qw, qz, sc, bits=True)
    with pytest.raises(ValueError, match="multiples of 32"):
        to_gptq(pq.quantize(np.ones((16, 64), F32), "int3", group=32))
    with pytest.raises(ValueError, match="multiples of 16"):
        to_gptq(pq.quantize(np.ones((8, 64), F32), "int2", group=32))


# ------------------------------------------------------------------ 8 bits
@pytest.mark.parametrize("v1", [True, False], ids=["v1", "v2"])
@pytest.mark.parametrize("act_order_gidx", [False, True])
def test_8bit_one_group_is_exact_int8(v1, act_order_gidx):
    rng = np.random.default_rng(80 + v1)
    k, n = 96, 24
    qw, qz, sc, gi = rand_gptq(rng, 8, k, n, k, v1, sym=True)
    if act_order_gidx:
        gi = np.zeros(k, np.int32)            # desc_act with one group: every channel in group 0
    fmt = "v1" if v1 else "v2"
    qt = from_gptq(qw, qz, sc, gi, bits=8)    # auto: stored zeros all 127 (v1) / 128 (v2)
    assert qt.format == "int8" and qt.shape == (n, k) and qt.perm is None
    ref = ref_gptq(qw, qz, sc, gi, 8, v1)
    for b in ("native", "reference", "numba"):
        np.testing.assert_array_equal(pq.dequantize(qt, backend=b), ref)
    codes = np.ascontiguousarray(qt.sections()[0]).view(np.int8)
    assert codes.min() == -128 and codes.max() == 127           # the whole uint8 code range survives
    back = to_gptq(qt, format=fmt)
    assert back["bits"] == 8
    for name, a in (("qweight", qw), ("qzeros", qz), ("scales", sc), ("g_idx", np.zeros(k, np.int32))):
        assert back[name].dtype == a.dtype, name
        np.testing.assert_array_equal(back[name], a, err_msg=name)
    assert from_gptq(**back, format=fmt) == qt
    # both computes on the converted weight; int8 compute equals the spec on every variant
    x = rng.standard_normal((5, k)).astype(F32)
    spec = pq.matmul(x, qt, compute="int8", backend="reference")
    for v in VARIANTS:
        assert np.array_equal(pq.matmul(x, qt, compute="int8", isa=v), spec), v
    want = x.astype(np.float64) @ ref.T.astype(np.float64)
    np.testing.assert_allclose(pq.matmul(x, qt, compute="float"), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(spec, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def test_8bit_lossy_cases_raise():
    rng = np.random.default_rng(90)
    k, n = 64, 16
    # several groups: int8 has one scale per output channel
    qw, qz, sc, gi = rand_gptq(rng, 8, k, n, 32, v1=False, sym=True)
    with pytest.raises(ValueError, match="2 groups.*group_size -1"):
        from_gptq(qw, qz, sc, gi, bits=8, format="v2")
    # asymmetric zero points
    qw, qz, sc, gi = rand_gptq(rng, 8, k, n, k, v1=False)
    with pytest.raises(ValueError, match="symmetric.*zero point 128"):
        from_gptq(qw, qz, sc, gi, bits=8, format="v2")
    qw, qz, sc, gi = rand_gptq(rng, 8, k, n, k, v1=False, sym=True)
    with pytest.raises(ValueError, match="sym=False"):
        from_gptq(qw, qz, sc, gi, bits=8, format="v2", sym=False)
    assert from_gptq(qw, qz, sc, gi, bits=8, format="v2", sym=True).format == "int8"
    with pytest.raises(ValueError, match="overflow"):           # v1 stored zero 255
        from_gptq(qw, np.full_like(qz, -1), sc, gi, bits=8, format="v1")
    # pyqkern's own int8 quantizer makes fp32 scales: GPTQ's fp16 scales would round them
    with pytest.raises(ValueError, match="fp16"):
        to_gptq(pq.quantize(rng.standard_normal((16, 64)).astype(F32), "int8"))
    ok = pq.QTensor.from_bytes("int8", (8, 32), np.concatenate(
        [rng.integers(0, 256, 8 * 32, dtype=np.uint8), np.full(8, 0.5, F32).view(np.uint8)]))
    d = to_gptq(ok, format="v1")
    assert from_gptq(**d, format="v1") == ok
    np.testing.assert_array_equal(ref_gptq(d["qweight"], d["qzeros"], d["scales"], d["g_idx"], 8, True),
                                  pq.dequantize(ok))


# ------------------------------------------------------------------ checkpoint directories
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_load_gptq_dir_bits(tmp_path, bits):
    rng = np.random.default_rng(100 + bits)
    k, n = 64, 32
    gs = k if bits == 8 else 32
    a = rand_gptq(rng, bits, k, n, gs, v1=True, sym=bits == 8)
    b = rand_gptq(rng, bits, k, n, gs, v1=True, sym=True, act_order=bits != 8)
    st.save(tmp_path / "model.safetensors",
            {"m.q.qweight": a[0], "m.q.qzeros": a[1], "m.q.scales": a[2], "m.q.g_idx": a[3],
             "m.k.qweight": b[0], "m.k.qzeros": b[1], "m.k.scales": b[2], "m.k.g_idx": b[3]})
    (tmp_path / "quantize_config.json").write_text(json.dumps(
        {"bits": bits, "group_size": -1 if bits == 8 else gs, "desc_act": bits != 8, "sym": bits == 8,
         "quant_method": "gptq", "checkpoint_format": "gptq"}))
    mods = load_gptq_dir(tmp_path)
    assert sorted(mods) == ["m.k", "m.q"]
    assert {q.format for q in mods.values()} == {f"int{bits}"}
    np.testing.assert_array_equal(pq.dequantize(mods["m.q"]), ref_gptq(*a, bits, True))
    np.testing.assert_array_equal(pq.dequantize(mods["m.k"]), ref_gptq(*b, bits, True))
    # config.json quantization_config, gptq_v2 (the same bytes read with zero = stored)
    (tmp_path / "quantize_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(
        {"quantization_config": {"bits": bits, "group_size": gs, "quant_method": "gptq",
                                 "checkpoint_format": "gptq_v2", "sym": False}}))
    if bits == 8:   # v2 reading of v1-symmetric bytes: zero 127, which int8 cannot hold
        with pytest.raises(ValueError, match="'m.k'.*8-bit.*zero point"):
            load_gptq_dir(tmp_path)
    else:
        np.testing.assert_array_equal(pq.dequantize(load_gptq_dir(tmp_path)["m.q"]), ref_gptq(*a, bits, False))


def test_load_gptq_dir_8bit_groups_rejected(tmp_path):
    rng = np.random.default_rng(110)
    a = rand_gptq(rng, 8, 64, 16, 32, v1=True, sym=True)
    st.save(tmp_path / "model.safetensors", {"l.qweight": a[0], "l.qzeros": a[1], "l.scales": a[2]})
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 8, "group_size": 32, "quant_method": "gptq"}))
    with pytest.raises(ValueError, match="'l'.*groups"):
        load_gptq_dir(tmp_path)


@pytest.mark.parametrize("group", [32, 64])
def test_gptq_act_order_result_round_trips_through_checkpoints(group):
    """pyqkern.gptq keeps each group's columns in original order, as a g_idx implies, so its
    act-order result comes back from a GPTQ / compressed-tensors checkpoint as the same bytes and
    the same int8-path results (review: the perm came back sorted within groups, int8 outputs
    differed by 0.09)."""
    from pyqkern.io import from_compressed_tensors, to_compressed_tensors

    rng = np.random.default_rng(7)
    W = rng.standard_normal((32, 256)).astype(F32)
    X = (rng.standard_normal((128, 256)) * np.linspace(0.1, 3, 256)).astype(F32)
    qt = pq.gptq.quantize(W, X=X, format="int4", group_size=group, act_order=True)
    assert qt.perm is not None and not np.array_equal(qt.perm, np.sort(qt.perm))
    x = rng.standard_normal((3, 256)).astype(F32)
    for back in (from_gptq(**to_gptq(qt)), from_compressed_tensors(**to_compressed_tensors(qt))):
        assert back == qt
        np.testing.assert_array_equal(pq.matmul(x, back, compute="int8"), pq.matmul(x, qt, compute="int8"))
