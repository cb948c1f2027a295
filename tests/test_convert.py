"""Foreign 4-bit layouts <-> pyqkern QTensor: GPTQ (v1/v2, act-order), AWQ GEMM, ORT MatMulNBits,
bitsandbytes NF4 / FP4 (plain and double quant).

Every dequantization is checked against an independent, deliberately naive loop implementation of
the foreign layout written here from the spec, not from the converters."""
import json

import numpy as np
import pytest

import pyqkern as pq
from pyqkern.io import safetensors as st
from pyqkern.io.convert_awq import from_awq, to_awq
from pyqkern.io.convert_bnb import from_bnb, from_bnb_nf4, to_bnb, to_bnb_nf4
from pyqkern.io.convert_ct import from_compressed_tensors, to_compressed_tensors
from pyqkern.io.convert_gptq import from_gptq, load_gptq_dir, to_gptq
from pyqkern.io.convert_ort import from_ort_nbits, to_onnx_matmulnbits, to_ort_nbits

F32 = np.float32
NF4_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]
# bitsandbytes FP4 in bit-pattern order (bit 3 = sign): raw magnitudes / 12
FP4_TABLE = [F32(v) / F32(12) for v in (0.0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3)]


def _rng(seed):
    return np.random.default_rng(seed)


def _nib(word, j):
    return (int(word) & 0xFFFFFFFF) >> (4 * j) & 0xF


def _pack_words(vals):
    """python loop: 8 nibbles -> one int32 word (element j at bits 4j)."""
    w = 0
    for j, v in enumerate(vals):
        w |= (int(v) & 0xF) << (4 * j)
    return np.array([w], np.uint32).view(np.int32)[0]


def _scales(rng, shape):
    return (rng.uniform(0.001, 0.05, size=shape)).astype(np.float16)


# ------------------------------------------------------------------ independent references
def ref_gptq(qweight, qzeros, scales, g_idx, v1):
    kw, n = qweight.shape
    k = kw * 8
    w = np.zeros((n, k), F32)
    for kk in range(k):
        g = int(g_idx[kk])
        for nn in range(n):
            q = _nib(qweight[kk // 8, nn], kk % 8)
            z = _nib(qzeros[g, nn // 8], nn % 8) + (1 if v1 else 0)
            w[nn, kk] = F32(scales[g, nn]) * F32(q - z)
    return w


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def ref_awq(qweight, qzeros, scales):
    k, nw = qweight.shape
    n = nw * 8
    gs = k // scales.shape[0]
    w = np.zeros((n, k), F32)
    for kk in range(k):
        g = kk // gs
        for nn in range(n):
            slot = AWQ_ORDER.index(nn % 8)
            q = _nib(qweight[kk, nn // 8], slot)
            z = _nib(qzeros[g, nn // 8], slot)
            w[nn, kk] = F32(scales[g, nn]) * F32(q - z)
    return w


def ref_ort(b, scales, zp, k, n, bs):
    nb = -(-k // bs)
    b = b.reshape(n, nb, bs // 2)
    scales = np.asarray(scales).reshape(n, nb)
    w = np.zeros((n, k), F32)
    for nn in range(n):
        for kk in range(k):
            blk, j = kk // bs, kk % bs
            byte = int(b[nn, blk, j // 2])
            q = byte & 0xF if j % 2 == 0 else byte >> 4
            if zp is None:
                z = 8
            else:
                zb = int(zp.reshape(n, -1)[nn, blk // 2])
                z = zb & 0xF if blk % 2 == 0 else zb >> 4
            w[nn, kk] = F32(scales[nn, blk]) * F32(q - z)
    return w


def ref_bnb(weight, state, shape):
    n, k = shape
    table = FP4_TABLE if state.get("quant_type") == "fp4" else NF4_TABLE
    bs = state["blocksize"]
    flat = weight.reshape(-1)
    if "nested_absmax" in state:
        codes = state["absmax"]
        absmax = np.zeros(codes.size, F32)
        for i in range(codes.size):
            absmax[i] = F32(state["nested_quant_map"][codes[i]]) * F32(state["nested_absmax"][i // 256]) \
                + F32(state["nested_offset"])
    else:
        absmax = state["absmax"]
    out = np.zeros(n * k, F32)
    for i in range(n * k):
        byte = int(flat[i // 2])
        c = byte >> 4 if i % 2 == 0 else byte & 0xF
        out[i] = F32(table[c]) * F32(absmax[i // bs])
    return out.reshape(n, k)


# ------------------------------------------------------------------ random foreign tensors
def rand_gptq(rng, k, n, gs, v1, sym=False, act_order=False):
    g = k // gs
    codes = rng.integers(0, 16, size=(k, n))
    if sym:
        zeros = np.full((g, n), 7 if v1 else 8)
    else:
        zeros = rng.integers(0, 15 if v1 else 16, size=(g, n))
    qweight = np.array([[_pack_words(codes[8 * r: 8 * r + 8, c]) for c in range(n)] for r in range(k // 8)], np.int32)
    qzeros = np.array([[_pack_words(zeros[r, 8 * c: 8 * c + 8]) for c in range(n // 8)] for r in range(g)], np.int32)
    g_idx = (np.arange(k) // gs).astype(np.int32)
    if act_order:
        g_idx = rng.permutation(g_idx).astype(np.int32)
    return qweight, qzeros, _scales(rng, (g, n)), g_idx


@pytest.mark.parametrize("v1", [True, False], ids=["v1", "v2"])
@pytest.mark.parametrize("gs", [16, 32, -1])
def test_gptq_roundtrip_and_dequant(v1, gs):
    rng = _rng(1 + v1)
    k, n = 64, 16
    qw, qz, sc, gi = rand_gptq(rng, k, n, k if gs == -1 else gs, v1)
    qt = from_gptq(qw, qz, sc, gi, format="v1" if v1 else "v2")
    assert qt.format == "int4" and qt.shape == (n, k) and not qt.sym and qt.perm is None
    assert qt.group == gs
    np.testing.assert_array_equal(pq.dequantize(qt), ref_gptq(qw, qz, sc, gi, v1))
    back = to_gptq(qt, format="v1" if v1 else "v2")
    for name, a in (("qweight", qw), ("qzeros", qz), ("scales", sc), ("g_idx", gi)):
        assert back[name].dtype == a.dtype, name
        np.testing.assert_array_equal(back[name], a, err_msg=name)
    # and from_gptq(to_gptq(qt)) is the same QTensor; g_idx=None means k // group
    assert from_gptq(**back, format="v1" if v1 else "v2") == qt
    assert from_gptq(qw, qz, sc, None, format="v1" if v1 else "v2") == qt


def test_gptq_act_order_exact():
    rng = _rng(7)
    k, n, gs = 64, 16, 16
    qw, qz, sc, gi = rand_gptq(rng, k, n, gs, v1=True, act_order=True)
    assert not np.array_equal(gi, np.sort(gi))
    qt = from_gptq(qw, qz, sc, gi, format="v1")
    assert qt.perm is not None
    ref = ref_gptq(qw, qz, sc, gi, True)
    np.testing.assert_array_equal(pq.dequantize(qt), ref)
    back = to_gptq(qt, format="v1")
    for name, a in (("qweight", qw), ("qzeros", qz), ("scales", sc), ("g_idx", gi)):
        np.testing.assert_array_equal(back[name], a, err_msg=name)
    x = rng.standard_normal((3, k)).astype(F32)
    np.testing.assert_allclose(pq.matmul(x, qt, compute="float"), x @ ref.T, rtol=1e-4, atol=1e-4)


def test_gptq_act_order_unequal_groups_rejected():
    rng = _rng(8)
    qw, qz, sc, gi = rand_gptq(rng, 64, 16, 16, v1=False)
    gi = gi.copy()
    gi[0], gi[20] = 3, 3     # group 3 gets 17 channels, group 0 gets 15
    with pytest.raises(ValueError, match="exactly"):
        from_gptq(qw, qz, sc, gi, format="v2")


@pytest.mark.parametrize("v1", [True, False], ids=["v1", "v2"])
def test_gptq_sym_detection(v1):
    rng = _rng(3)
    qw, qz, sc, gi = rand_gptq(rng, 32, 16, 16, v1=v1, sym=True)
    qt = from_gptq(qw, qz, sc, gi)          # format="auto"
    assert qt.sym
    np.testing.assert_array_equal(pq.dequantize(qt), ref_gptq(qw, qz, sc, gi, v1))
    back = to_gptq(qt, format="v1" if v1 else "v2")
    np.testing.assert_array_equal(back["qzeros"], qz)
    np.testing.assert_array_equal(back["qweight"], qw)
    # explicit format wins over the heuristic (v1 read as v2 => zero 7 => asymmetric)
    other = from_gptq(qw, qz, sc, gi, format="v2" if v1 else "v1")
    assert not other.sym
    with pytest.raises(ValueError, match="not all 8"):
        from_gptq(qw, qz, sc, gi, format="v2" if v1 else "v1", sym=True)


def test_gptq_v1_overflow_and_auto_asym():
    rng = _rng(4)
    qw, qz, sc, gi = rand_gptq(rng, 32, 16, 16, v1=False)     # v2 zeros include 15
    z = np.array(qz).view(np.uint32)
    assert any(((int(w) >> (4 * j)) & 15) == 15 for w in z.ravel() for j in range(8))
    with pytest.raises(ValueError, match="overflow"):
        from_gptq(qw, qz, sc, gi, format="v1")
    with pytest.raises(ValueError, match="overflow"):
        from_gptq(qw, qz, sc, gi)          # auto assumes v1 for asymmetric zeros
    qt = from_gptq(qw, qz, sc, gi, format="v2")
    np.testing.assert_array_equal(pq.dequantize(qt), ref_gptq(qw, qz, sc, gi, False))
    # v2 zeros of 0 cannot be written as v1 (stored -1)
    qz0 = np.zeros_like(qz)
    with pytest.raises(ValueError, match="zero point is 0"):
        to_gptq(from_gptq(qw, qz0, sc, format="v2"), format="v1")
    # asymmetric v1 without 15s: auto == v1
    qw1, qz1, sc1, gi1 = rand_gptq(rng, 32, 16, 16, v1=True)
    assert from_gptq(qw1, qz1, sc1, gi1) == from_gptq(qw1, qz1, sc1, gi1, format="v1")


def test_gptq_bad_inputs():
    rng = _rng(6)
    qw, qz, sc, gi = rand_gptq(rng, 32, 16, 16, v1=False)
    with pytest.raises(ValueError, match="int32"):
        from_gptq(qw.astype(np.float32), qz, sc, format="v2")
    with pytest.raises(ValueError, match="qzeros"):
        from_gptq(qw, qz[:, :1], sc, format="v2")
    with pytest.raises(ValueError, match="scales"):
        from_gptq(qw, qz, sc[:, :8], format="v2")
    with pytest.raises(ValueError, match="float16"):
        from_gptq(qw, qz, sc.astype(F32) + F32(1e-7), format="v2")
    with pytest.raises(ValueError, match="g_idx"):
        from_gptq(qw, qz, sc, gi[:-1], format="v2")
    with pytest.raises(ValueError, match="g_idx"):
        from_gptq(qw, qz, sc, gi + 5, format="v2")
    with pytest.raises(ValueError, match="format"):
        from_gptq(qw, qz, sc, format="v3")
    with pytest.raises(NotImplementedError, match="2, 3, 4 and 8"):
        from_gptq(qw, qz, sc, bits=5)
    with pytest.raises(ValueError, match="qzeros"):    # 4-bit arrays read as 8-bit: the shapes disagree
        from_gptq(qw, qz, sc, bits=8)
    with pytest.raises(ValueError, match="int4 or int8 QTensor"):
        to_gptq(pq.quantize(np.zeros((8, 64), F32), "nf4"))


def test_gptq_from_pyqkern_quantize():
    rng = _rng(9)
    w = rng.standard_normal((16, 128)).astype(F32)
    for kw in ({"group": 32}, {"group": 32, "sym": True}, {"group": -1}):
        qt = pq.quantize(w, "int4", **kw)
        d = to_gptq(qt)
        np.testing.assert_array_equal(ref_gptq(d["qweight"], d["qzeros"], d["scales"], d["g_idx"], False),
                                      pq.dequantize(qt))
        assert from_gptq(**d, format="v2") == qt
        # the dict names its format: "auto" follows it (read as v1 before: off by one, review)
        assert d["checkpoint_format"] == "gptq_v2" and from_gptq(**d) == qt
        if not kw.get("sym"):
            d1 = to_gptq(qt, format="v1")
            assert d1["checkpoint_format"] == "gptq" and from_gptq(**d1) == qt
            with pytest.raises(ValueError, match="contradicts"):
                from_gptq(**d1, format="v2")
            with pytest.raises(ValueError, match="checkpoint_format must be"):
                from_gptq(**dict(d1, checkpoint_format="marlin"))
    # an arbitrary permutation survives as an equivalent one (exact dequantize and matmul)
    qt = pq.quantize(w, "int4", group=32).with_perm(rng.permutation(128))
    back = from_gptq(**to_gptq(qt), format="v2")
    np.testing.assert_array_equal(pq.dequantize(back), pq.dequantize(qt))


def test_load_gptq_dir(tmp_path):
    rng = _rng(10)
    k, n, gs = 64, 16, 32
    a = rand_gptq(rng, k, n, gs, v1=True)
    b = rand_gptq(rng, k, n, gs, v1=True, act_order=True)
    st.save(tmp_path / "model-00001-of-00002.safetensors",
            {"layers.0.q.qweight": a[0], "layers.0.q.qzeros": a[1], "layers.0.q.scales": a[2],
             "layers.0.q.g_idx": a[3], "layers.0.q.bias": np.zeros(n, np.float16)})
    st.save(tmp_path / "model-00002-of-00002.safetensors",
            {"layers.0.k.qweight": b[0], "layers.0.k.qzeros": b[1], "layers.0.k.scales": b[2],
             "layers.0.k.g_idx": b[3], "embed.weight": np.zeros((4, 4), np.float16)})
    (tmp_path / "quantize_config.json").write_text(json.dumps(
        {"bits": 4, "group_size": gs, "desc_act": True, "sym": False, "quant_method": "gptq",
         "checkpoint_format": "gptq"}))
    mods = load_gptq_dir(tmp_path)
    assert sorted(mods) == ["layers.0.k", "layers.0.q"]
    np.testing.assert_array_equal(pq.dequantize(mods["layers.0.q"]), ref_gptq(*a, True))
    np.testing.assert_array_equal(pq.dequantize(mods["layers.0.k"]), ref_gptq(*b, True))
    assert mods["layers.0.k"].perm is not None
    # config.json quantization_config, gptq_v2
    (tmp_path / "quantize_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "x", "quantization_config": {"bits": 4, "group_size": gs, "quant_method": "gptq",
                                                    "checkpoint_format": "gptq_v2", "sym": False}}))
    mods2 = load_gptq_dir(tmp_path)
    np.testing.assert_array_equal(pq.dequantize(mods2["layers.0.q"]), ref_gptq(*a, False))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"bits": 5, "quant_method": "gptq"}}))
    with pytest.raises(NotImplementedError):
        load_gptq_dir(tmp_path)


def test_load_gptq_dir_takes_its_name_literally(tmp_path):
    """glob metacharacters in the directory name: "Llama [GPTQ]" found no shards, "ckpt?" also
    loaded a sibling "ckpt1"'s modules"""
    rng = _rng(11)
    cfg = json.dumps({"bits": 4, "group_size": 32, "sym": False, "quant_method": "gptq", "checkpoint_format": "gptq"})
    for name, mod in (("Llama [GPTQ]", "a"), ("ckpt?", "b"), ("ckpt1", "c")):
        d = tmp_path / name
        d.mkdir()
        q = rand_gptq(rng, 64, 16, 32, v1=True)
        st.save(d / "model.safetensors", {f"{mod}.qweight": q[0], f"{mod}.qzeros": q[1], f"{mod}.scales": q[2]})
        (d / "quantize_config.json").write_text(cfg)
    assert sorted(load_gptq_dir(tmp_path / "Llama [GPTQ]")) == ["a"]
    assert sorted(load_gptq_dir(tmp_path / "ckpt?")) == ["b"]


# ------------------------------------------------------------------ AWQ
def rand_awq(rng, k, n, gs):
    g = k // gs
    codes = rng.integers(0, 16, size=(k, n))
    zeros = rng.integers(0, 16, size=(g, n))

    def pack(vals):                       # vals [R, N] -> [R, N/8], slot i = channel 8c + ORDER[i]
        return np.array([[_pack_words([vals[r, 8 * c + AWQ_ORDER[i]] for i in range(8)])
                          for c in range(n // 8)] for r in range(vals.shape[0])], np.int32)
    return pack(codes), pack(zeros), _scales(rng, (g, n))


def test_awq_roundtrip_and_dequant():
    rng = _rng(11)
    qw, qz, sc = rand_awq(rng, 64, 16, 32)
    qt = from_awq(qw, qz, sc)
    np.testing.assert_array_equal(pq.dequantize(qt), ref_awq(qw, qz, sc))
    back = to_awq(qt)
    for name, a in (("qweight", qw), ("qzeros", qz), ("scales", sc)):
        assert back[name].dtype == a.dtype
        np.testing.assert_array_equal(back[name], a, err_msg=name)
    assert from_awq(**back) == qt
    w = rng.standard_normal((16, 64)).astype(F32)
    for kw in ({"group": 32}, {"group": 16, "sym": True}):
        q2 = pq.quantize(w, "int4", **kw)
        d = to_awq(q2)
        np.testing.assert_array_equal(ref_awq(d["qweight"], d["qzeros"], d["scales"]), pq.dequantize(q2))
        assert from_awq(**d) == q2
    with pytest.raises(ValueError, match="permutation"):
        to_awq(q2.with_perm(rng.permutation(64)))
    with pytest.raises(ValueError, match="int32"):
        from_awq(qw.astype(np.int64), qz, sc)
    with pytest.raises(ValueError, match="qzeros"):
        from_awq(qw, qz[:1], sc)
    with pytest.raises(ValueError, match="group"):
        from_awq(qw, qz[:1].repeat(3, 0), sc[:1].repeat(3, 0))   # 3 groups do not divide K=64


# ------------------------------------------------------------------ ORT MatMulNBits
def rand_ort(rng, k, n, bs, with_zp):
    nb = -(-k // bs)
    b = rng.integers(0, 256, size=(n, nb, bs // 2), dtype=np.uint8)
    if k % bs:                            # padding codes are never read; keep them 0 for byte equality
        flat = b.reshape(n, -1)
        flat[:, k // 2:] = 0
    sc = rng.uniform(0.001, 0.05, size=(n, nb)).astype(np.float16).astype(F32)
    zp = None
    if with_zp:
        z = rng.integers(0, 16, size=(n, nb + nb % 2), dtype=np.uint8)
        z[:, nb:] = 0
        zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    return b, sc, zp


@pytest.mark.parametrize("k,bs", [(96, 32), (64, 16), (48, 64)], ids=["nb3", "nb4", "padded"])
@pytest.mark.parametrize("with_zp", [True, False], ids=["zp", "nozp"])
def test_ort_roundtrip_and_dequant(k, bs, with_zp):
    rng = _rng(k + bs)
    n = 8
    b, sc, zp = rand_ort(rng, k, n, bs, with_zp)
    qt = from_ort_nbits(b, sc, zp, K=k, N=n, block_size=bs)
    assert qt.sym == (not with_zp)
    np.testing.assert_array_equal(pq.dequantize(qt), ref_ort(b, sc, zp, k, n, bs))
    d = to_ort_nbits(qt)
    assert (d["K"], d["N"], d["block_size"], d["bits"]) == (k, n, bs, 4)
    np.testing.assert_array_equal(d["B"], b)
    np.testing.assert_array_equal(d["scales"], sc)
    assert d["scales"].dtype == np.float32
    if zp is None:
        assert d["zero_points"] is None
    else:
        np.testing.assert_array_equal(d["zero_points"], zp)
    assert from_ort_nbits(d["B"], d["scales"], d["zero_points"], K=k, N=n, block_size=bs) == qt


def test_ort_float_zero_points_and_scales():
    rng = _rng(12)
    k, n, bs = 64, 8, 32
    b, sc, zp = rand_ort(rng, k, n, bs, True)
    zf = np.zeros((n, 2), F32)
    for nn in range(n):
        for blk in range(2):
            byte = int(zp[nn, 0])
            zf[nn, blk] = byte & 15 if blk == 0 else byte >> 4
    qa = from_ort_nbits(b, sc, zp, K=k, N=n, block_size=bs)
    assert from_ort_nbits(b, sc, zf, K=k, N=n, block_size=bs) == qa
    with pytest.raises(ValueError, match="integers"):
        from_ort_nbits(b, sc, zf + F32(0.5), K=k, N=n, block_size=bs)
    bad = sc + F32(1e-6)
    with pytest.raises(ValueError, match="float16"):
        from_ort_nbits(b, bad, zp, K=k, N=n, block_size=bs)
    with pytest.warns(UserWarning, match="rounded"):
        from_ort_nbits(b, bad, zp, K=k, N=n, block_size=bs, round_scales=True)
    with pytest.raises(ValueError, match="B has shape"):
        from_ort_nbits(b[:, :1], sc, zp, K=k, N=n, block_size=bs)
    with pytest.raises(ValueError, match="uint8"):
        from_ort_nbits(b.astype(np.int8), sc, zp, K=k, N=n, block_size=bs)
    with pytest.raises(ValueError, match="block_size"):
        from_ort_nbits(b, sc, zp, K=k, N=n, block_size=24)
    with pytest.raises(ValueError, match="not a multiple"):
        from_ort_nbits(*rand_ort(rng, 80, n, 32, False)[:2], K=80, N=n, block_size=32)
    with pytest.raises(NotImplementedError):
        from_ort_nbits(b, sc, zp, K=k, N=n, block_size=bs, bits=8)


@pytest.mark.parametrize("case", ["asym32", "sym64", "perchannel48", "perm_bias"])
def test_onnx_matmulnbits_runs_in_onnxruntime(tmp_path, case):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    rng = _rng(13)
    n = 24
    k = 48 if case == "perchannel48" else 128
    w = rng.standard_normal((n, k)).astype(F32)
    bias = None
    if case == "asym32":
        qt = pq.quantize(w, "int4", group=32)
    elif case == "sym64":
        qt = pq.quantize(w, "int4", group=64, sym=True)
    elif case == "perchannel48":
        qt = pq.quantize(w, "int4", group=-1)
    else:
        qt = pq.quantize(w, "int4", group=32).with_perm(rng.permutation(k))
        bias = rng.standard_normal(n).astype(F32)
    path = tmp_path / "m.onnx"
    to_onnx_matmulnbits(path, qt, bias=bias)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((5, k)).astype(F32)
    y = sess.run(None, {"A": x})[0]
    want = pq.matmul(x, qt, bias=bias, compute="float")
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


# ------------------------------------------------------------------ bitsandbytes NF4
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True], ids=["absmax", "double"])
def test_bnb_from_pyqkern_and_back(dq, fmt, tmp_path):
    rng = _rng(14)
    w = rng.standard_normal((40, 128)).astype(F32)    # 80 blocks of 64 (< 256: one nested block)
    qt = pq.quantize(w, fmt, group=64, double_quant=dq)
    weight, state = to_bnb(qt)
    assert weight.shape == (40 * 128 // 2, 1) and weight.dtype == np.uint8
    assert state["blocksize"] == 64 and tuple(state["shape"]) == (40, 128) and state["quant_type"] == fmt
    assert np.array_equal(state["quant_map"], np.array(FP4_TABLE if fmt == "fp4" else NF4_TABLE, F32))
    assert ("nested_absmax" in state) == dq
    np.testing.assert_array_equal(ref_bnb(weight, state, (40, 128)), pq.dequantize(qt))
    assert from_bnb(weight, state, (40, 128)) == qt
    with pytest.raises(ValueError, match="contradicts the quant state's shape"):   # was re-cut to (80, 64)
        from_bnb(weight, state, (80, 64))
    # a state of a 3-D tensor (MoE experts [E, out, in]: quantize_4bit flattens any tensor) reads
    # as [E * out, in]
    experts = dict(state, shape=(4, 10, 128))
    assert from_bnb(weight, experts) == qt and from_bnb(weight, experts, (40, 128)) == qt
    with pytest.raises(ValueError, match="contradicts"):
        from_bnb(weight, experts, (10, 512))
    # leading dims whose product is 40 modulo 2^64 (an int64 product wrapped and was accepted)
    wrapped = dict(state, shape=(19825726089193272, 2548883662394197, 465135406333799, 128))
    with pytest.raises(ValueError, match="contradicts"):
        from_bnb(weight, wrapped, (40, 128))
    with pytest.raises(ValueError, match="positive integer"):
        from_bnb(weight, wrapped)
    with pytest.raises(ValueError, match="positive integer"):   # 2^62 + 1 was rounded through float64
        from_bnb(weight, dict(state, shape=np.array([2 ** 62 + 1, 128], np.int64)))
    if dq:  # uint8 absmax codes without nested_absmax: the message says what is missing (review)
        lost = {key: v for key, v in state.items() if not key.startswith("nested_")}
        with pytest.raises(ValueError, match="lacks"):
            from_bnb(weight, lost, (40, 128))
    no_type = {key: v for key, v in state.items() if key != "quant_type"}    # the quant_map tells
    assert from_bnb(weight, no_type, (40, 128)) == qt
    wp, packed = to_bnb(qt, packed=True)
    assert f"quant_state.bitsandbytes__{fmt}" in packed and len([key for key in packed if "bitsandbytes__" in key]) == 1
    assert all(isinstance(v, np.ndarray) for v in packed.values())
    prefixed = {f"model.layers.0.mlp.weight.{key}": v for key, v in packed.items()}
    assert from_bnb(wp, prefixed) == qt
    # through a safetensors file, as bitsandbytes / transformers store a Linear4bit
    st.save(tmp_path / "m.safetensors", {"model.layers.0.mlp.weight": wp, **prefixed})
    loaded, _ = st.load(tmp_path / "m.safetensors")
    state_keys = {key: v for key, v in loaded.items() if key != "model.layers.0.mlp.weight"}
    assert from_bnb(loaded["model.layers.0.mlp.weight"], state_keys) == qt
    if fmt == "nf4":
        assert from_bnb_nf4(wp, prefixed) == qt and to_bnb_nf4(qt)[0].tobytes() == weight.tobytes()
    else:
        with pytest.raises(ValueError, match="from_bnb"):
            from_bnb_nf4(wp, prefixed)
        with pytest.raises(ValueError, match="nf4 QTensor"):
            to_bnb_nf4(qt)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_bnb_random_double_quant_bytes(fmt):
    rng = _rng(15)
    n, k, bs = 72, 256, 32                              # 576 blocks -> 3 nested blocks
    nblk = n * k // bs
    weight = rng.integers(0, 256, size=(n * k // 2, 1), dtype=np.uint8)
    cmap = np.sort(rng.uniform(-1, 1, 256).astype(F32))
    state = {"quant_type": fmt, "blocksize": bs, "shape": (n, k), "dtype": "bfloat16",
             "absmax": rng.integers(0, 256, nblk, dtype=np.uint8),
             "nested_absmax": rng.uniform(0.1, 2, 3).astype(F32), "nested_quant_map": cmap,
             "nested_blocksize": 256, "nested_offset": float(F32(0.37)),
             "quant_map": np.array(FP4_TABLE if fmt == "fp4" else NF4_TABLE, F32)}
    qt = from_bnb(weight, state)
    assert qt.format == fmt
    np.testing.assert_array_equal(pq.dequantize(qt), ref_bnb(weight, state, (n, k)))
    w2, s2 = to_bnb(qt, dtype="bfloat16")
    np.testing.assert_array_equal(w2, weight)
    for key in ("absmax", "nested_absmax", "nested_quant_map", "quant_map"):
        np.testing.assert_array_equal(s2[key], state[key], err_msg=key)
    assert s2["nested_offset"] == state["nested_offset"] and s2["dtype"] == "bfloat16"
    # plain absmax
    st2 = {"blocksize": bs, "absmax": rng.uniform(0, 3, nblk).astype(F32), "quant_type": fmt}
    q2 = from_bnb(weight, st2, (n, k))
    np.testing.assert_array_equal(pq.dequantize(q2), ref_bnb(weight, st2, (n, k)))
    np.testing.assert_array_equal(to_bnb(q2)[1]["absmax"], st2["absmax"])
    assert to_bnb(q2)[0].tobytes() == weight.tobytes()


def test_converters_refuse_nan_inf_scales():
    """A checkpoint scale that is NaN / Inf would dequantize its weights to NaN / Inf: every array
    converter refuses it naming the array, as quantize refuses such weights (review: all accepted)."""
    w = _rng(31).standard_normal((64, 256)).astype(F32)
    qt = pq.quantize(w, "int4", group=64)

    def spoiled(d, key, idx, v):
        d = dict(d)
        d[key] = np.array(d[key], copy=True)
        d[key][idx] = v
        return d

    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="scales: 1 NaN or Inf"):
            from_gptq(**spoiled(to_gptq(qt), "scales", (0, 0), bad))
        with pytest.raises(ValueError, match="scales: 1 NaN or Inf"):
            from_awq(**spoiled(to_awq(qt), "scales", (0, 0), bad))
        o = spoiled(to_ort_nbits(qt), "scales", (0, 0), bad)
        with pytest.raises(ValueError, match="scales: 1 NaN or Inf"):
            from_ort_nbits(**{k: v for k, v in o.items() if k != "bits"})
        with pytest.raises(ValueError, match="scales: 1 NaN or Inf"):
            from_compressed_tensors(**spoiled(to_compressed_tensors(qt), "weight_scale", (0, 0), bad))
        bw, bs = to_bnb(pq.quantize(w, "nf4"))
        with pytest.raises(ValueError, match="absmax: 1 NaN or Inf"):
            from_bnb(bw, spoiled(bs, "absmax", 3, bad))
        bw, bs = to_bnb(pq.quantize(w, "nf4", double_quant=True))
        with pytest.raises(ValueError, match="nested_absmax: 1 NaN or Inf"):
            from_bnb(bw, spoiled(bs, "nested_absmax", 0, bad))
        with pytest.raises(ValueError, match="nested_offset"):
            from_bnb(bw, {**bs, "nested_offset": bad})


def test_bnb_bad_inputs():
    rng = _rng(16)
    weight = rng.integers(0, 256, size=(48 * 96 // 2, 1), dtype=np.uint8)
    st_ok = {"blocksize": 64, "absmax": np.ones(48 * 96 // 64, F32)}
    # two modules' states merged into one dict: b's absmax silently replaced a's (review)
    two = {**{f"m.a.weight.{k}": v for k, v in st_ok.items()}, **{f"m.b.weight.{k}": v for k, v in st_ok.items()}}
    with pytest.raises(ValueError, match="holds 'blocksize' twice"):
        from_bnb(weight, {**two, "quant_type": "nf4"}, (48, 96))
    for bad in (None, [("blocksize", 64)], 42):
        with pytest.raises(TypeError, match="quant_state must be a dict"):
            from_bnb(weight, bad, (48, 96))
    with pytest.raises(ValueError, match="blocks cross rows"):
        from_bnb_nf4(weight, st_ok, (48, 96))        # K=96 is not a multiple of 64
    st32 = {"blocksize": 32, "absmax": np.ones(48 * 96 // 32, F32)}
    from_bnb_nf4(weight, st32, (48, 96))
    with pytest.raises(ValueError, match="bytes"):
        from_bnb_nf4(weight[:-1], st32, (48, 96))
    with pytest.raises(ValueError, match="uint8"):
        from_bnb_nf4(weight.astype(np.int16), st32, (48, 96))
    with pytest.raises(ValueError, match="absmax"):
        from_bnb_nf4(weight, {"blocksize": 32, "absmax": np.ones(3, F32)}, (48, 96))
    with pytest.raises(ValueError, match="float32"):
        from_bnb_nf4(weight, {"blocksize": 32, "absmax": np.ones(144, np.float16)}, (48, 96))
    with pytest.raises(ValueError, match="quant_map"):
        from_bnb_nf4(weight, {**st32, "quant_map": np.linspace(-1, 1, 16, dtype=F32)}, (48, 96))
    with pytest.raises(ValueError, match="from_bnb"):
        from_bnb_nf4(weight, {**st32, "quant_type": "fp4"}, (48, 96))
    # FP4 states: code table, quant type and packed-key checks
    fp4 = {**st32, "quant_type": "fp4"}
    assert from_bnb(weight, fp4, (48, 96)).format == "fp4"
    with pytest.raises(ValueError, match="quant_map is not the standard FP4"):
        from_bnb(weight, {**fp4, "quant_map": np.array(NF4_TABLE, F32)}, (48, 96))
    with pytest.raises(ValueError, match="quant_map is not the standard FP4"):   # bnb's 4-decimal display table
        from_bnb(weight, {**fp4, "quant_map": np.round(np.array(FP4_TABLE, F32), 4)}, (48, 96))
    with pytest.raises(ValueError, match="af4"):
        from_bnb(weight, {**st32, "quant_type": "af4"}, (48, 96))
    with pytest.raises(ValueError, match="cannot tell"):
        from_bnb(weight, st32, (48, 96))                 # neither quant_type nor a standard quant_map
    meta = np.frombuffer(json.dumps({"quant_type": "nf4", "blocksize": 32}).encode(), np.uint8)
    with pytest.raises(ValueError, match="quant_type"):
        from_bnb(weight, {"absmax": st32["absmax"], "quant_state.bitsandbytes__fp4": meta}, (48, 96))
    plain_meta = np.frombuffer(json.dumps({"blocksize": 32}).encode(), np.uint8)
    with pytest.raises(ValueError, match="more than one"):
        from_bnb(weight, {"absmax": st32["absmax"], "quant_state.bitsandbytes__fp4": plain_meta,
                          "quant_state.bitsandbytes__nf4": plain_meta}, (48, 96))
    assert from_bnb(weight, {"absmax": st32["absmax"], "quant_state.bitsandbytes__fp4": plain_meta},
                    (48, 96)).format == "fp4"
    with pytest.raises(ValueError, match="unknown bitsandbytes quant type"):
        from_bnb(weight, {"absmax": st32["absmax"], "quant_state.bitsandbytes__int4": meta}, (48, 96))
    with pytest.raises(ValueError, match="JSON"):
        from_bnb(weight, {"absmax": st32["absmax"], "quant_state.bitsandbytes__fp4": np.zeros(4, np.uint8) + 255},
                 (48, 96))
    with pytest.raises(ValueError, match="nf4 or fp4 QTensor"):
        to_bnb(pq.quantize(np.zeros((4, 32), F32), "int4", group=16))
    with pytest.raises(ValueError, match="permutation"):
        to_bnb(pq.quantize(np.ones((4, 64), F32), "fp4").with_perm(np.arange(64)[::-1].copy()))
    with pytest.raises(ValueError, match="nested_blocksize"):
        from_bnb_nf4(weight, {"blocksize": 32, "absmax": np.zeros(144, np.uint8), "nested_absmax": np.ones(1, F32),
                              "nested_quant_map": np.zeros(256, F32), "nested_offset": 0.0,
                              "nested_blocksize": 128}, (48, 96))
    with pytest.raises(ValueError, match="nf4 QTensor"):
        to_bnb_nf4(pq.quantize(np.zeros((4, 32), F32), "int4", group=16))


# ------------------------------------------------------------------ compressed-tensors pack_quantized


def ref_ct(wp, scale, zp, g_idx, k):
    n = wp.shape[0]
    g = scale.shape[1]
    gs = k // g
    w = np.zeros((n, k), F32)
    for nn in range(n):
        for kk in range(k):
            grp = int(g_idx[kk]) if g_idx is not None else kk // gs
            q = _nib(wp[nn, kk // 8], kk % 8) - 8
            z = 0 if zp is None else _nib(zp[nn // 8, grp], nn % 8) - 8
            w[nn, kk] = F32(scale[nn, grp]) * F32(q - z)
    return w


def rand_ct(rng, n, k, gs, asym, act_order=False):
    g = k // gs
    kw = -(-k // 8)
    codes = np.zeros((n, kw * 8), np.int64)
    codes[:, :k] = rng.integers(0, 16, size=(n, k))
    wp = np.array([[_pack_words(codes[r, 8 * c: 8 * c + 8]) for c in range(kw)] for r in range(n)], np.int32)
    zp = None
    if asym:
        z = rng.integers(0, 16, size=(n, g))
        zp = np.array([[_pack_words(z[8 * r: 8 * r + 8, c]) for c in range(g)] for r in range(n // 8)], np.int32)
    gi = rng.permutation(np.arange(k) // gs).astype(np.int32) if act_order else None
    return wp, _scales(rng, (n, g)), zp, gi


@pytest.mark.parametrize("case", ["asym_g32", "sym_g16", "sym_channel_k36", "asym_actorder"])
def test_compressed_tensors_roundtrip_and_dequant(case):
    rng = _rng(17)
    n = 16
    k, gs = (36, 36) if case == "sym_channel_k36" else (64, 16 if case in ("sym_g16", "asym_actorder") else 32)
    asym = case.startswith("asym")
    wp, sc, zp, gi = rand_ct(rng, n, k, gs, asym, act_order=case == "asym_actorder")
    qt = from_compressed_tensors(wp, sc, zp, gi, np.array([n, k], np.int64))
    assert qt.sym == (not asym) and (qt.perm is not None) == (gi is not None)
    np.testing.assert_array_equal(pq.dequantize(qt), ref_ct(wp, sc, zp, gi, k))
    d = to_compressed_tensors(qt)
    np.testing.assert_array_equal(d["weight_packed"], wp)
    np.testing.assert_array_equal(d["weight_scale"], sc)
    np.testing.assert_array_equal(d["weight_shape"], [n, k])
    assert ("weight_zero_point" in d) == asym and ("weight_g_idx" in d) == (gi is not None)
    if asym:
        np.testing.assert_array_equal(d["weight_zero_point"], zp)
    if gi is not None:
        np.testing.assert_array_equal(d["weight_g_idx"], gi)
    assert from_compressed_tensors(**d) == qt


def test_compressed_tensors_bad_inputs_and_dir(tmp_path):
    rng = _rng(18)
    wp, sc, zp, _ = rand_ct(rng, 16, 64, 32, True)
    with pytest.raises(ValueError, match="int32"):
        from_compressed_tensors(wp.astype(np.uint8), sc, zp)
    with pytest.raises(ValueError, match="weight_zero_point"):
        from_compressed_tensors(wp, sc, zp[:, :1])
    with pytest.raises(ValueError, match="weight_shape"):
        from_compressed_tensors(wp, sc, zp, weight_shape=np.array([8, 64]))
    with pytest.raises(NotImplementedError):
        from_compressed_tensors(wp, sc, zp, num_bits=8)
    st.save(tmp_path / "model.safetensors", {"l.weight_packed": wp, "l.weight_scale": sc, "l.weight_zero_point": zp,
                                             "l.weight_shape": np.array([16, 64], np.int64)})
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": 4, "group_size": 32, "symmetric": False}}}}}))
    mods = load_gptq_dir(tmp_path)
    np.testing.assert_array_equal(pq.dequantize(mods["l"]), ref_ct(wp, sc, zp, None, 64))
    # another compressed-tensors format, or a config whose tensors are not there: an error, not {}
    # (review: an int-quantized checkpoint loaded as an empty dict)
    for fmt_where in ({"format": "int-quantized"}, {"group_format": "int-quantized"}):
        grp = {"weights": {"num_bits": 4}, **({"format": fmt_where["group_format"]} if "group_format" in fmt_where else {})}
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
            "quant_method": "compressed-tensors", **({"format": fmt_where["format"]} if "format" in fmt_where else {}),
            "config_groups": {"group_0": grp}}}))
        with pytest.raises(NotImplementedError, match="int-quantized.*only 'pack-quantized'"):
            load_gptq_dir(tmp_path)
    st.save(tmp_path / "model.safetensors", {"l.weight": np.zeros((16, 64), np.int8)})
    for qc, what in (({"quant_method": "compressed-tensors", "format": "pack-quantized",
                       "config_groups": {"group_0": {"weights": {"num_bits": 4}}}}, "weight_packed"),
                     ({"quant_method": "gptq", "bits": 4}, "qweight"), ({"quant_method": "awq", "bits": 4}, "qweight")):
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qc}))
        with pytest.raises(ValueError, match=rf"no \*\.{what} tensor"):
            load_gptq_dir(tmp_path)


def test_quant_config_and_state_garbage(tmp_path):
    """Hostile config / quant-state values give ValueErrors naming the file or field, not
    AttributeError / OverflowError / KeyError / RecursionError / ZeroDivisionError (fuzzing)."""
    rng = _rng(20)
    qw, qz, sc = rand_awq(rng, 64, 16, 32)
    st.save(tmp_path / "model.safetensors", {"m.qweight": qw, "m.scales": sc})   # no m.qzeros
    cases = [(b"[]", "quantize_config.json.*must be a JSON object"),
             (b'{"bits": Infinity}', "'bits' must be an integer"),
             (b"\xff", "quantize_config.json: not valid JSON"),
             (b"[" * 100000, "quantize_config.json: not valid JSON"),
             (b'{"quant_method": "awq", "bits": 4}', "module 'm' lacks tensor 'qzeros'")]
    for raw, msg in cases:
        (tmp_path / "quantize_config.json").write_bytes(raw)
        with pytest.raises(ValueError, match=msg):
            load_gptq_dir(tmp_path)
    (tmp_path / "quantize_config.json").unlink()
    for qc, msg in ((5, "quantization_config must be a JSON object"),
                    ({"quant_method": "compressed-tensors", "config_groups": []}, "config_groups")):
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qc}))
        with pytest.raises(ValueError, match=msg):
            load_gptq_dir(tmp_path)
    # bitsandbytes quant state
    w = rng.integers(0, 256, size=(4 * 64 // 2, 1), dtype=np.uint8)
    for bad, msg in (({"blocksize": 0}, "blocksize"), ({"blocksize": []}, "blocksize"),
                     ({"blocksize": [64, 0]}, "blocksize"), ({"blocksize": "64"}, "blocksize"),
                     ({"shape": [float("inf"), 64]}, "shape"), ({"shape": [4.5, 64]}, "shape")):
        state = {"blocksize": 64, "absmax": np.ones(4, F32), "shape": (4, 64), **bad}
        with pytest.raises(ValueError, match=msg):
            from_bnb_nf4(w, state)
    with pytest.raises(ValueError, match="shape must be"):
        pq.QTensor.from_bytes("int4", (float("inf"), 128), b"")
    with pytest.raises(ValueError, match="group must be an integer"):
        pq.QTensor.from_bytes("int4", (4, 128), b"", group=float("inf"))


def test_load_awq_dir(tmp_path):
    rng = _rng(19)
    qw, qz, sc = rand_awq(rng, 64, 16, 32)
    st.save(tmp_path / "model.safetensors", {"m.qweight": qw, "m.qzeros": qz, "m.scales": sc})
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": True}}))
    mods = load_gptq_dir(tmp_path)
    np.testing.assert_array_equal(pq.dequantize(mods["m"]), ref_awq(qw, qz, sc))


def test_bnb_nf4_matches_onnxruntime_matmulbnb4():
    """ORT's com.microsoft.MatMulBnb4 (quant_type 1 = NF4) implements bitsandbytes' layout: a second,
    external oracle for to_bnb_nf4's bytes and nibble order."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    rng = _rng(20)
    n, k, bs = 24, 128, 64
    qt = pq.quantize(rng.standard_normal((n, k)).astype(F32), "nf4", group=bs)
    weight, state = to_bnb_nf4(qt)
    node = helper.make_node("MatMulBnb4", ["A", "B", "absmax"], ["Y"], domain="com.microsoft", K=k, N=n,
                            block_size=bs, quant_type=1)
    graph = helper.make_graph([node], "bnb4", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(weight.reshape(-1), "B"),
                               numpy_helper.from_array(state["absmax"], "absmax")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((3, k)).astype(F32)
    want = x @ pq.dequantize(qt).T
    np.testing.assert_allclose(sess.run(None, {"A": x})[0], want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_load_onnx_matmulnbits_reads_back_what_was_written(tmp_path):
    """pq.io.load_onnx_matmulnbits: the weights (and bias, and act-order permutation) of an .onnx
    model's MatMulNBits nodes come back as identical QTensors."""
    pytest.importorskip("onnx")
    rng = np.random.default_rng(11)
    n, k = 24, 128
    for params, perm in [(dict(group=32), None), (dict(group=64, sym=True), rng.permutation(k))]:
        qt = pq.quantize(rng.standard_normal((n, k)).astype(np.float32), "int4", **params)
        if perm is not None:
            qt = qt.with_perm(perm)
        bias = rng.standard_normal(n).astype(np.float32)
        path = tmp_path / "m.onnx"
        pq.io.to_onnx_matmulnbits(path, qt, bias=bias)
        weights, biases = pq.io.load_onnx_matmulnbits(path)
        (name, got), = weights.items()
        assert got == qt and np.array_equal(biases[name], bias)
        x = rng.standard_normal((3, k)).astype(np.float32)
        assert np.array_equal(pq.matmul(x, got, compute="float"), pq.matmul(x, qt, compute="float"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ValueError, match="ONNX"):
        pq.io.load_onnx_matmulnbits(bad)
    import onnx

    m = onnx.load(str(path))
    node = next(nd for nd in m.graph.node if nd.op_type == "MatMulNBits")
    attr = next(a for a in node.attribute if a.name == "block_size")
    node.attribute.remove(attr)
    node.attribute.append(onnx.helper.make_attribute("block_size", float("inf")))
    with pytest.raises(ValueError, match="block_size must be an integer"):
        pq.io.load_onnx_matmulnbits(m)


def test_load_onnx_matmulnbits_unreadable_tensors(tmp_path):
    """A hostile initializer (unknown or UNDEFINED data_type, raw_data of the wrong length, external
    data outside the folder) is a ValueError naming the node and tensor, not onnx's or NumPy's own
    exception types; a non-model argument is a TypeError."""
    pytest.importorskip("onnx")
    import copy

    import onnx
    from onnx import TensorProto

    qt = pq.quantize(_rng(30).standard_normal((16, 64)).astype(F32), "int4", group=32)
    base = to_onnx_matmulnbits(None, qt)

    def ext(t):
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        e = t.external_data.add()
        e.key, e.value = "location", "../../etc/passwd"

    for i, edit in enumerate((lambda t: setattr(t, "data_type", 99), lambda t: setattr(t, "data_type", 0),
                              lambda t: setattr(t, "raw_data", t.raw_data[:-1]), ext)):
        m = copy.deepcopy(base)
        edit(next(t for t in m.graph.initializer if t.name == "B"))
        src = m
        if i < 3:
            onnx.save(m, str(tmp_path / "bad.onnx"))
            src = str(tmp_path / "bad.onnx")
        with pytest.raises(ValueError, match="MatMulNBits .* B: tensor 'B' .* cannot be read"):
            pq.io.load_onnx_matmulnbits(src)
    with pytest.raises(TypeError, match="ModelProto"):
        pq.io.load_onnx_matmulnbits(42)


def test_load_onnx_matmulnbits_refuses_duplicate_names_and_bias_sizes(tmp_path):
    """Review: two MatMulNBits nodes with one name kept one weight in silence; a bias of the wrong
    length came back as it was."""
    pytest.importorskip("onnx")
    import copy

    import onnx

    rng = np.random.default_rng(12)
    qt = pq.quantize(rng.standard_normal((8, 64)).astype(np.float32), "int4", group=32)
    path = tmp_path / "m.onnx"
    pq.io.to_onnx_matmulnbits(path, qt, bias=np.ones(8, np.float32))
    m = onnx.load(str(path))
    node = next(nd for nd in m.graph.node if nd.op_type == "MatMulNBits")
    two = copy.deepcopy(m)
    twin = copy.deepcopy(node)
    twin.output[0] = "Y2"
    two.graph.node.append(twin)
    with pytest.raises(ValueError, match="both named"):
        pq.io.load_onnx_matmulnbits(two)
    short = copy.deepcopy(m)
    b = next(t for t in short.graph.initializer if t.name == node.input[5])
    b.CopyFrom(onnx.numpy_helper.from_array(np.ones(3, np.float32), b.name))
    with pytest.raises(ValueError, match="bias has 3 elements for N=8"):
        pq.io.load_onnx_matmulnbits(short)


def test_load_gptq_dir_index_and_config_checks(tmp_path):
    """Review: a shard named in model.safetensors.index.json but missing lost its modules in
    silence; "sym": "false" (a string) read as true; AWQ errors did not name the module."""
    rng = _rng(13)
    a = rand_gptq(rng, 64, 16, 32, v1=True)
    st.save(tmp_path / "model-00001-of-00002.safetensors",
            {"m.qweight": a[0], "m.qzeros": a[1], "m.scales": a[2], "m.g_idx": a[3]})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"m.qweight": "model-00001-of-00002.safetensors",
                        "n.qweight": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32, "sym": False}))
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        load_gptq_dir(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"m.qweight": "model-00001-of-00002.safetensors"}}))
    assert list(load_gptq_dir(tmp_path)) == ["m"]
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32, "sym": "false"}))
    with pytest.raises(ValueError, match="'sym' must be true or false"):
        load_gptq_dir(tmp_path)
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "quant_method": "awq", "version": "gemm"}))
    with pytest.raises(ValueError, match="module 'm'"):
        load_gptq_dir(tmp_path)


def test_load_onnx_matmulnbits_only_a_last_axis_permutation_gather_is_the_weights():
    """A Gather in front of MatMulNBits is the weight's act-order permutation only as
    to_onnx_matmulnbits writes it (axis -1, indices permuting 0..K-1, initializer or Constant);
    a row gather or a token selection is the model's own op (one was once read as a permutation,
    the other made the model fail to load). round_scales reaches from_ort_nbits."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(12)
    k, n = 32, 8
    qt = pq.quantize(rng.standard_normal((n, k)).astype(np.float32), "int4", group=16, sym=True)
    d = to_ort_nbits(qt)

    def model(idx, axis, constant=False, scales=d["scales"]):
        inits = [numpy_helper.from_array(d["B"], "B"), numpy_helper.from_array(scales, "scales")]
        nodes = []
        if constant:
            nodes.append(helper.make_node("Constant", [], ["idx"], value=numpy_helper.from_array(idx)))
        else:
            inits.append(numpy_helper.from_array(idx, "idx"))
        nodes += [helper.make_node("Gather", ["A", "idx"], ["A2"], axis=axis),
                  helper.make_node("MatMulNBits", ["A2", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n,
                                   bits=4, block_size=d["block_size"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])

    perm = rng.permutation(k).astype(np.int64)
    for idx, axis, constant, want_perm in [(perm, -1, False, True), (perm, -1, True, True), (perm, 0, False, False),
                                           (np.array(-1, np.int64), 1, False, False),
                                           (perm[:k // 2], -1, False, False)]:
        (got,) = pq.io.load_onnx_matmulnbits(model(idx, axis, constant))[0].values()
        if want_perm:
            assert np.array_equal(got.perm, perm)
        else:
            assert got.perm is None and got == qt
    odd = (d["scales"] * np.float32(1 + 2 ** -20)).astype(np.float32)  # fp32 scales fp16 cannot hold
    with pytest.raises(ValueError):
        pq.io.load_onnx_matmulnbits(model(perm, -1, scales=odd))
    (got,) = pq.io.load_onnx_matmulnbits(model(perm, -1, scales=odd), round_scales=True)[0].values()
    assert got.shape == (n, k)


def test_exporters_refuse_zero_points_beyond_the_field():
    """pyqkern's int2/3/4 zero points are bytes (a hostile file can hold 200); GPTQ / AWQ / ORT /
    compressed-tensors pack them in b-bit fields, where the extra bits once spilled into the next
    channel's field: now a ValueError. Converters also refuse an empty K."""
    rng = np.random.default_rng(13)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    for fmt in ("int4", "int2", "int3"):
        qt = pq.quantize(w, fmt, group=32)
        q, s, z = qt.sections()
        z2 = z.copy()
        z2[0, 0] = 200
        bad = pq.QTensor.from_bytes(fmt, qt.shape, np.concatenate([q.ravel(), s.ravel(), z2.ravel()]), group=32,
                                    sym=False)
        assert bad.sections()[2][0, 0] == 200
        exporters = [to_gptq] + ([to_awq, to_ort_nbits, to_compressed_tensors] if fmt == "int4" else [])
        for f in exporters:
            with pytest.raises(ValueError, match="does not fit"):
                f(bad)
            f(qt)  # in range: fine
    with pytest.raises(ValueError):
        from_gptq(np.zeros((0, 8), np.int32), np.zeros((1, 1), np.int32), np.ones((1, 8), np.float16))
    with pytest.raises(ValueError):
        from_awq(np.zeros((0, 1), np.int32), np.zeros((1, 1), np.int32), np.ones((1, 8), np.float16))
    with pytest.raises(ValueError):
        from_compressed_tensors(np.zeros((8, 0), np.int32), np.ones((8, 1), np.float16), weight_shape=np.array([8, -5]))


def test_ort_inputs_checked_by_shape_not_only_size():
    """A transposed B or packed zero_points has the right size and gave wrong weights; K / N were
    truncated (64.9 -> 64); round_scales turned fp32 scales beyond fp16 into inf"""
    rng = _rng(30)
    n, k, bs = 8, 128, 32
    b = rng.integers(0, 256, (n, k // bs, bs // 2)).astype(np.uint8)
    sc = np.ones((n, k // bs), F32)
    zp = rng.integers(0, 256, (n, 2)).astype(np.uint8)
    want = from_ort_nbits(b, sc, zp, K=k, N=n, block_size=bs)
    # the layouts ONNX Runtime uses: flat, [N, blocks * bytes] and [N, blocks, bytes]; numpy ints
    for bb, zz, ss in ((b.reshape(-1), zp.reshape(-1), sc.reshape(-1)), (b.reshape(n, -1), zp, sc)):
        assert from_ort_nbits(bb, ss, zz, K=np.int64(k), N=np.int32(n), block_size=bs) == want
    with pytest.raises(ValueError, match="B has shape"):
        from_ort_nbits(b.reshape(n, -1).T.copy(), sc, zp, K=k, N=n, block_size=bs)
    with pytest.raises(ValueError, match="packed zero_points has shape"):
        from_ort_nbits(b, sc, zp.T.copy(), K=k, N=n, block_size=bs)
    with pytest.raises(ValueError, match="unpacked zero_points has shape"):
        from_ort_nbits(b, sc, np.full((k // bs, n), 8, F32), K=k, N=n, block_size=bs)
    for kw in (dict(K=128.9, N=n), dict(K="128", N=n), dict(K=k, N=8.5), dict(K=True, N=n)):
        with pytest.raises(ValueError, match="must be an integer"):
            from_ort_nbits(b, sc, zp, block_size=bs, **kw)
    with pytest.raises(ValueError, match="beyond float16's range"):
        from_ort_nbits(b, np.full_like(sc, 1e5), zp, K=k, N=n, block_size=bs, round_scales=True)


def test_load_gptq_dir_refuses_a_tensor_in_two_shards(tmp_path):
    """The copy in the last file (by name) used to win silently"""
    q = rand_gptq(_rng(31), 64, 16, 32, v1=True)
    t = {"a.qweight": q[0], "a.qzeros": q[1], "a.scales": q[2]}
    st.save(tmp_path / "model-00001.safetensors", t)
    st.save(tmp_path / "model-00002.safetensors", {"a.scales": q[2] * 2})
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32, "sym": False}))
    with pytest.raises(ValueError, match="'a.scales' is in both model-00001.safetensors and model-00002"):
        load_gptq_dir(tmp_path)


def test_empty_foreign_weights_say_so():
    """N = 0 was refused only by a numpy reshape message"""
    cases = [lambda: from_gptq(np.zeros((8, 0), np.int32), np.zeros((1, 0), np.int32), np.ones((1, 0), np.float16)),
             lambda: from_awq(np.zeros((64, 0), np.int32), np.zeros((1, 0), np.int32), np.ones((1, 0), np.float16)),
             lambda: from_compressed_tensors(np.zeros((0, 8), np.int32), np.ones((0, 1), np.float16))]
    for f in cases:
        with pytest.raises(ValueError, match="is empty"):
            f()
