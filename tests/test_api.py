"""The Python API contract: QTensor fields and bytes, from_bytes, formats(), info(), input
dtypes, and the per-format options (nf4 block sizes and double quantization, int4 groups and
symmetry, int8)."""
from __future__ import annotations

import numpy as np
import pytest

import pyqkern as pq
from pyqkern import reference

F32 = np.float32
ALL_FORMATS = ["q4_0", "q4_1", "q8_0", "q4_k", "q6_k", "iq4_nl", "nf4", "int4", "int8", "int2", "int3", "fp4"]
GGML_FORMATS = ["q4_0", "q4_1", "q8_0", "q4_k", "q6_k", "iq4_nl"]

# (format, options, expected bits per weight for a K=1024 row)
FORMAT_CASES = [
    ("q4_0", {}, 4.5), ("q4_1", {}, 5.0), ("q8_0", {}, 8.5),
    ("q4_k", {}, 4.5), ("q6_k", {}, 6.5625), ("iq4_nl", {}, 4.5),
    ("nf4", {}, 4.5), ("nf4", {"group": 32}, 5.0), ("nf4", {"group": 256}, 4.125),
    ("fp4", {}, 4.5), ("fp4", {"group": 128}, 4.25),
    ("int4", {}, 4 + 24 / 128), ("int4", {"sym": True}, 4 + 16 / 128),
    ("int4", {"group": 32}, 4 + 24 / 32), ("int4", {"group": -1}, 4 + 24 / 1024),
    ("int4", {"group": -1, "sym": True}, 4 + 16 / 1024),
    ("int2", {}, 2 + 24 / 128), ("int3", {"sym": True}, 3 + 16 / 128), ("int3", {"group": -1}, 3 + 24 / 1024),
    ("int8", {}, 8 + 32 / 1024),
]
CASE_IDS = [f + "".join(f"-{k}{v}" for k, v in o.items()) for f, o, _ in FORMAT_CASES]


def weights(shape, seed=0, scale=0.05):
    r = np.random.default_rng(seed)
    w = (r.standard_normal(shape) * scale).astype(F32)
    w.flat[:: max(1, w.size // 7)] *= 8        # a few outliers
    return w


def gguf_mod():
    return pytest.importorskip("gguf.quants")


def gguf_type(fmt):
    from gguf.constants import GGMLQuantizationType as T

    return {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q8_0": T.Q8_0, "q4_k": T.Q4_K, "q6_k": T.Q6_K,
            "iq4_nl": T.IQ4_NL}[fmt]


# ---------------------------------------------------------------- module-level API
def test_formats():
    f = pq.formats()
    assert isinstance(f, list) and all(isinstance(x, str) for x in f)
    assert f == ALL_FORMATS
    f.append("mutated")
    assert "mutated" not in pq.formats()      # a copy, not the registry


def test_info_keys_and_values():
    info = pq.info()
    need = {"version", "cpu", "features", "compiled_variants", "runnable_variants", "active_variant",
            "forced_by_env", "threads", "formats"}
    assert need <= set(info), f"missing keys: {need - set(info)}"
    assert info["version"] == pq.__version__
    assert isinstance(info["cpu"], str)
    assert isinstance(info["features"], list) and all(isinstance(x, str) for x in info["features"])
    assert info["runnable_variants"] == pq.variants()
    assert set(info["runnable_variants"]) <= set(info["compiled_variants"])
    assert "ref" in info["runnable_variants"]
    assert info["active_variant"] in info["runnable_variants"]
    assert info["threads"] == pq.get_num_threads() >= 1
    assert info["formats"] == pq.formats()


def test_variants_ref_first_best_last():
    v = pq.variants()
    assert v[0] == "ref"
    names = pq.info()["compiled_variants"]
    assert [x for x in names if x in v] == v    # dispatch order: best last
    if pq.info()["forced_by_env"] is None:
        assert pq.info()["active_variant"] == v[-1]


def test_set_num_threads_type_checked(restore_threads):
    with pytest.raises(TypeError):
        pq.set_num_threads(2.0)
    with pytest.raises(TypeError):
        pq.set_num_threads(True)
    pq.set_num_threads(1)
    assert pq.get_num_threads() == 1
    pq.set_num_threads(0)                       # <= 0: one per CPU
    cpus = pq.get_num_threads()
    assert cpus >= 1
    pq.set_num_threads(1)
    pq.set_num_threads(-2**70)                  # any n <= 0 (was the binding's TypeError)
    assert pq.get_num_threads() == cpus
    with pytest.raises(ValueError, match="too large"):
        pq.set_num_threads(2**70)


# ---------------------------------------------------------------- QTensor fields and bytes
@pytest.mark.parametrize("fmt,opts,bpw", FORMAT_CASES, ids=CASE_IDS)
def test_qtensor_fields(fmt, opts, bpw):
    n, k = 6, 1024
    qt = pq.quantize(weights((n, k)), fmt, **opts)
    assert isinstance(qt, pq.QTensor)
    assert qt.format == fmt
    assert qt.shape == (n, k) and isinstance(qt.shape, tuple)
    assert qt.bits_per_weight == pytest.approx(bpw)
    assert qt.nbytes == round(bpw * n * k / 8)
    assert isinstance(qt.data, np.ndarray) and qt.data.dtype == np.uint8 and qt.data.ndim == 1
    assert qt.data.flags.c_contiguous and qt.data.nbytes == qt.nbytes
    if fmt in ("int2", "int3", "int4"):
        assert qt.group == opts.get("group", 128) and qt.sym == bool(opts.get("sym"))
    if fmt in ("nf4", "fp4"):
        assert qt.group == opts.get("group", 64)
    r = repr(qt)
    assert fmt in r and str(n) in r and str(k) in r
    y = pq.dequantize(qt)
    assert y.dtype == np.float32 and y.shape == (n, k) and y.flags.c_contiguous


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_data_is_gguf_bytes(fmt):
    gq = gguf_mod()
    w = weights((5, 512), seed=3)
    qt = pq.quantize(w, fmt)
    want = gq.quantize(w, gguf_type(fmt))
    assert np.array_equal(qt.data, want.ravel())


@pytest.mark.parametrize("fmt", GGML_FORMATS)
def test_ggml_data_decodes_with_gguf(fmt):
    """qt.data are ggml blocks: gguf's own dequantize of them equals ours, bit for bit."""
    gq = gguf_mod()
    w = weights((4, 512), seed=4)
    qt = pq.quantize(w, fmt)
    theirs = gq.dequantize(qt.data.reshape(4, -1), gguf_type(fmt))
    ours = pq.dequantize(qt)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("fmt,opts,bpw", FORMAT_CASES, ids=CASE_IDS)
def test_sections_tile_the_data(fmt, opts, bpw):
    qt = pq.quantize(weights((3, 1024)), fmt, **opts)
    q, s, z = qt.sections()
    assert q.shape[0] == s.shape[0] == z.shape[0] == 3
    assert q.nbytes + s.nbytes + z.nbytes == qt.nbytes
    assert np.shares_memory(q, qt.data)


def test_qtensor_equality_and_unhashable():
    w = weights((2, 256))
    a, b = pq.quantize(w, "q4_0"), pq.quantize(w, "q4_0")
    assert a == b and a is not b
    assert a != pq.quantize(w, "q4_1") and a != pq.quantize(w * 2, "q4_0") and a != "q4_0"
    with pytest.raises(TypeError):
        hash(a)


# ---------------------------------------------------------------- from_bytes
ROUNDTRIP_CASES = FORMAT_CASES + [("nf4", {"double_quant": True}, None),
                                  ("nf4", {"group": 128, "double_quant": True}, None),
                                  ("fp4", {"double_quant": True}, None)]
ROUNDTRIP_IDS = CASE_IDS + ["nf4-double_quant", "nf4-group128-double_quant", "fp4-double_quant"]


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "ndarray"])
@pytest.mark.parametrize("fmt,opts,bpw", ROUNDTRIP_CASES, ids=ROUNDTRIP_IDS)
def test_from_bytes_roundtrip(fmt, opts, bpw, kind):
    qt = pq.quantize(weights((4, 1024), seed=5), fmt, **opts)
    raw = qt.data.tobytes()
    buf = {"bytes": raw, "bytearray": bytearray(raw), "memoryview": memoryview(raw),
           "ndarray": qt.data.copy()}[kind]
    qt2 = pq.QTensor.from_bytes(fmt, qt.shape, buf, **opts)
    assert qt2 == qt
    assert qt2.format == fmt and qt2.shape == qt.shape and qt2.nbytes == qt.nbytes
    assert np.array_equal(pq.dequantize(qt2), pq.dequantize(qt))   # read-only buffers work too


def test_from_bytes_bad_arguments():
    with pytest.raises(TypeError, match="buf must be bytes-like"):
        pq.QTensor.from_bytes("int8", (2, 32), [0] * 72)
    with pytest.raises(TypeError, match="buf must hold bytes"):
        pq.QTensor.from_bytes("int8", (2, 32), np.zeros(72, dtype=object))
    with pytest.raises(TypeError, match="fmt must be a format name"):
        pq.QTensor.from_bytes(["int8"], (2, 32), bytes(72))


@pytest.mark.parametrize("fmt,opts,bpw", ROUNDTRIP_CASES, ids=ROUNDTRIP_IDS)
def test_from_bytes_zero_copy(fmt, opts, bpw):
    qt = pq.quantize(weights((2, 1024), seed=6), fmt, **opts)
    arr = qt.data.copy()
    qt2 = pq.QTensor.from_bytes(fmt, qt.shape, arr, **opts)
    assert np.shares_memory(qt2.data, arr)
    ba = bytearray(qt.data.tobytes())
    qt3 = pq.QTensor.from_bytes(fmt, qt.shape, ba, **opts)
    assert np.shares_memory(qt3.data, np.frombuffer(ba, dtype=np.uint8))
    q, _, _ = qt2.sections()
    assert np.shares_memory(q, arr)


def test_from_bytes_zero_copy_of_qtensor_data():
    qt = pq.quantize(weights((3, 256)), "q8_0")
    qt2 = pq.QTensor.from_bytes("q8_0", (3, 256), qt.data)
    assert np.shares_memory(qt2.data, qt.data)


@pytest.mark.parametrize("delta", [-1, 1, -18])
@pytest.mark.parametrize("fmt,opts,bpw", ROUNDTRIP_CASES, ids=ROUNDTRIP_IDS)
def test_from_bytes_wrong_length(fmt, opts, bpw, delta):
    qt = pq.quantize(weights((2, 1024)), fmt, **opts)
    raw = qt.data.tobytes()
    bad = raw[:delta] if delta < 0 else raw + b"\0" * delta
    with pytest.raises(ValueError, match="bytes"):
        pq.QTensor.from_bytes(fmt, qt.shape, bad, **opts)


def test_from_bytes_bad_shape_or_params():
    qt = pq.quantize(weights((2, 256)), "nf4")
    raw = qt.data.tobytes()
    for shape in [(2,), (0, 256), (-2, 256), (2, 256, 1), "ab", None]:
        with pytest.raises((ValueError, TypeError)):
            pq.QTensor.from_bytes("nf4", shape, raw)
    with pytest.raises(ValueError):
        pq.QTensor.from_bytes("nf4", (2, 256), raw, group=128)   # length mismatch for that group
    with pytest.raises(ValueError):
        pq.QTensor.from_bytes("q4_0", (2, 250), raw)             # K not a multiple of 32
    with pytest.raises(ValueError):
        pq.QTensor.from_bytes("q9_9", (2, 256), raw)


# ---------------------------------------------------------------- input dtypes
@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_half_precision_inputs_equal_float32(fmt, backend):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    if backend == "reference" and fmt not in reference.QUANTIZE:
        pytest.fail(f"reference backend has no {fmt} quantize")
    w = weights((3, 512), seed=7, scale=1.0)
    h = w.astype(np.float16)
    b = w.astype(ml_dtypes.bfloat16)
    q = lambda a: pq.quantize(a, fmt, backend=backend)   # noqa: E731
    assert q(h) == q(h.astype(F32)), "float16"
    want = q(b.astype(F32))
    assert q(b) == want, "bfloat16 (ml_dtypes)"
    assert q(b.view(np.uint16)) == want, "bfloat16 as raw uint16"


def test_bfloat16_bits_are_exact():
    """bf16 -> fp32 is exact: the raw-uint16 path places the bits in the high half."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bits = np.array([[0x3F80, 0xBF80, 0x0001, 0x8000, 0x7F7F, 0x4049, 0x0080, 0xC2F7] * 4,
                     [0x3F81, 0xBF80, 0x0001, 0x8000, 0x4780, 0x4049, 0x0080, 0xC2F7] * 4]).astype(np.uint16)
    f32 = (bits.astype(np.uint32) << 16).view(F32)
    assert np.array_equal(bits.view(ml_dtypes.bfloat16).astype(F32).view(np.uint32), f32.view(np.uint32))
    for fmt in ("q8_0", "int8", "nf4"):
        want = pq.quantize(f32, fmt, group=32 if fmt == "nf4" else None)
        assert pq.quantize(bits.view(ml_dtypes.bfloat16), fmt, group=want.params["group"] or None) == want
        assert pq.quantize(bits, fmt, group=want.params["group"] or None) == want


# ---------------------------------------------------------------- nf4
NF4_MAX_HALF_GAP = float(np.max(np.diff(reference.NF4_CODE))) / 2


@pytest.mark.parametrize("group", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_nf4_group_sizes(group):
    n, k = 3, max(1024, group)
    w = weights((n, k), seed=group)
    qt = pq.quantize(w, "nf4", group=group)
    assert qt.group == group
    assert qt.nbytes == n * k // 2 + n * (k // group) * 4
    assert qt.bits_per_weight == pytest.approx(4 + 32 / group)
    y = pq.dequantize(qt)
    amax = np.abs(w.reshape(n, -1, group)).max(axis=2, keepdims=True)
    err = np.abs(y - w).reshape(n, -1, group)
    assert (err <= amax * (NF4_MAX_HALF_GAP * (1 + 1e-6))).all()
    # the absmax of each block is stored exactly and reproduced exactly
    assert np.array_equal(np.abs(y.reshape(n, -1, group)).max(axis=2, keepdims=True), amax)
    assert qt == pq.quantize(w, "nf4", group=group, backend="reference")


@pytest.mark.parametrize("group", [64, 128])
def test_nf4_double_quant(group):
    n, k = 16, 4096
    w = weights((n, k), seed=11)
    plain = pq.quantize(w, "nf4", group=group)
    dq = pq.quantize(w, "nf4", group=group, double_quant=True)
    assert dq.params.get("double_quant") and not plain.params.get("double_quant")
    assert dq.bits_per_weight < plain.bits_per_weight
    nblk = n * k // group
    nested = -(-nblk // 256)
    assert dq.nbytes == n * k // 2 + nblk + 4 * nested + 4 + 4 * 256
    # the 4-bit codes are the same; only the absmax is compressed
    assert np.array_equal(dq.sections()[0], plain.sections()[0])
    a_plain = plain.sections()[1].view(F32)
    a_dq = dq.sections()[1].view(F32)
    assert np.abs(a_dq - a_plain).max() <= 0.01 * np.abs(a_plain - a_plain.mean()).max() + 1e-7
    y_plain, y_dq = pq.dequantize(plain), pq.dequantize(dq)
    assert np.abs(y_dq - y_plain).max() <= 0.01 * np.abs(w).max()
    assert np.abs(y_dq - w).max() <= (NF4_MAX_HALF_GAP + 0.02) * np.abs(w).max()
    # round trip through bytes
    again = pq.QTensor.from_bytes("nf4", (n, k), dq.data.tobytes(), group=group, double_quant=True)
    assert again == dq and np.array_equal(pq.dequantize(again), y_dq)


# ---------------------------------------------------------------- int4
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group", [16, 32, 64, 128, 256, -1])
def test_int4_groups(group, sym):
    n, k = 5, 512
    w = weights((n, k), seed=abs(group) + sym)
    w[1, :] += 0.3                               # one row entirely positive: zero point at 0
    qt = pq.quantize(w, "int4", group=group, sym=sym)
    gs = k if group == -1 else group
    ng = k // gs
    q, s, z = qt.sections()
    assert q.shape == (n, k // 2) and s.shape == (n, 2 * ng)
    assert z.shape == ((n, 0) if sym else (n, ng))
    assert qt.bits_per_weight == pytest.approx(4 + (16 if sym else 24) / gs)
    scale = s.view(np.float16).astype(F32)        # [n, ng]
    assert (scale > 0).all()
    if not sym:
        assert (z <= 15).all()
    y = pq.dequantize(qt)
    err = np.abs(y - w).reshape(n, ng, gs)
    assert (err <= 1.01 * scale[:, :, None] + 1e-7).all()
    assert qt == pq.quantize(w, "int4", group=group, sym=sym, backend="reference")


def test_int4_symmetric_zero_is_8():
    w = weights((2, 256), seed=2)
    qt = pq.quantize(w, "int4", group=64, sym=True)
    codes = np.stack([qt.data[: 2 * 128] & 0xF, qt.data[: 2 * 128] >> 4], axis=-1).reshape(2, 256)
    scale = qt.sections()[1].view(np.float16).astype(F32)
    y = pq.dequantize(qt)
    assert np.array_equal(y, ((codes.astype(np.int32) - 8).reshape(2, 4, 64) * scale[:, :, None]).reshape(2, 256))


# ---------------------------------------------------------------- int8
def test_int8_per_channel():
    n, k = 7, 300
    w = weights((n, k), seed=8)
    w[3] = 0.0                                  # an all-zero row
    qt = pq.quantize(w, "int8")
    q, s, z = qt.sections()
    assert q.shape == (n, k) and s.shape == (n, 4) and z.shape == (n, 0)
    assert qt.bits_per_weight == pytest.approx(8 + 32 / k)
    codes = q.view(np.int8)
    assert codes.min() >= -127
    scale = s.view(F32).ravel()
    assert np.array_equal(scale, (np.abs(w).max(axis=1) / F32(127)).astype(F32))
    assert (codes[3] == 0).all() and scale[3] == 0
    y = pq.dequantize(qt)
    assert (np.abs(y - w) <= scale[:, None] * 0.5 * (1 + 1e-5)).all()
    assert np.abs(codes).max(axis=1)[np.arange(n) != 3].min() == 127
    assert qt == pq.quantize(w, "int8", backend="reference")


def test_pickle_and_deepcopy_after_use():
    """A QTensor a matmul had used (and any QLinear with compute="int8") held the native packed copy,
    which cannot be pickled: pickle.dumps / copy.deepcopy raised TypeError (a merge report too)"""
    import copy
    import pickle

    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 64)).astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    qt = pq.quantize(w, "q4_0")
    want = pq.matmul(x, qt)                     # packs qt
    lin = pq.QLinear(qt)
    lin.add_adapter("a", pq.LoRA(rng.standard_normal((4, 64)).astype(np.float32) * 0.1,
                                 rng.standard_normal((48, 4)).astype(np.float32) * 0.1, alpha=8))
    y = lin(x)
    for q2 in (pickle.loads(pickle.dumps(qt)), copy.deepcopy(qt)):
        assert q2 == qt and np.shares_memory(q2.sections()[0], q2.data)
        assert np.array_equal(pq.matmul(x, q2), want)
    for l2 in (pickle.loads(pickle.dumps(lin)), copy.deepcopy(lin)):
        assert np.array_equal(l2(x), y) and l2.packed_nbytes == lin.packed_nbytes
        l2.remove_adapter("a")
        assert lin.adapter_names == ["a"]
    merged, report = pq.lora.merge(qt, lin._adapters["a"])
    r2 = pickle.loads(pickle.dumps(report))
    assert pq.lora.unmerge(merged, r2) == qt


def test_with_perm_keeps_its_own_copy():
    """Review: with_perm kept the caller's int64 array, so changing it afterwards changed the
    weight's column order unchecked (dequantize then read uninitialised values)."""
    rng = np.random.default_rng(2)
    qt = pq.quantize(rng.standard_normal((8, 64)).astype(np.float32), "q4_0")
    p = rng.permutation(64).astype(np.int64)
    qp = qt.with_perm(p)
    want = pq.dequantize(qp).copy()
    p[:] = 0
    assert np.array_equal(np.sort(qp.perm), np.arange(64)) and not qp.perm.flags.writeable
    assert np.array_equal(pq.dequantize(qp), want)


def test_minor_api_refusals():
    """Review: from_bytes took shape (4.7, 256) as (4, 256) and "42" as (4, 2); isa="neon" on an
    x86 build raised RuntimeError where an unknown name raises ValueError; repr hid an input
    permutation; io.load took "version": true for 1."""
    qt = pq.quantize(np.ones((4, 256), np.float32), "int4", group=32)
    for bad in [(4.7, 256), "42", (4, 256.0), (True, 256), (4,)]:
        with pytest.raises(ValueError, match=r"shape must be \(N, K\) integers"):
            pq.QTensor.from_bytes("int4", bad, qt.data, group=32)
    assert pq.QTensor.from_bytes("int4", (np.int64(4), 256), qt.data, group=32) == qt
    missing = [v for v in ("neon", "dotprod", "avx2") if v not in pq.variants()]
    for v in missing:
        with pytest.raises(ValueError, match="not compiled into this build"):
            pq.quantize(np.ones((2, 32), np.float32), "q4_0", isa=v)
    assert "input-permuted" in repr(qt.with_perm(np.arange(256)[::-1].copy()))
    assert "input-permuted" not in repr(qt)


def test_qsave_version_must_be_an_int(tmp_path):
    import json

    from pyqkern.io import qsave, safetensors as st

    qt = pq.quantize(np.ones((4, 64), np.float32), "q4_0")
    pq.io.save(tmp_path / "a.safetensors", {"w": qt})
    tensors, meta = st.load(tmp_path / "a.safetensors")
    doc = json.loads(meta[qsave.META_KEY])
    doc["version"] = True
    st.save(tmp_path / "b.safetensors", dict(tensors), metadata={qsave.META_KEY: json.dumps(doc)})
    with pytest.raises(ValueError):
        pq.io.load(tmp_path / "b.safetensors")
    # arrays beyond what the entries hold: refused before parsing, as in the safetensors header (a
    # review: the metadata JSON had only the header's object count between a file and json.loads)
    doc["version"] = 1
    doc["tensors"]["w"]["shape"] = [[]] * 100_000
    st.save(tmp_path / "c.safetensors", dict(tensors), metadata={qsave.META_KEY: json.dumps(doc)})
    with pytest.raises(ValueError, match="100001 JSON arrays"):
        pq.io.load(tmp_path / "c.safetensors")


def test_review_core_api_edges():
    """From a review of the core API: the public QTensor constructor checks its data as
    from_bytes does; from_bytes copies a strided double_quant buffer; bias takes bfloat16 like x
    and refuses float64 beyond float32; QLinear keeps its own bias; set_num_threads takes NumPy
    ints and refuses huge counts; search="mse" on tiny blocks does not flood warnings."""
    import warnings

    import ml_dtypes

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    q = pq.quantize(w, "nf4", double_quant=True)
    assert pq.QTensor.from_bytes("nf4", q.shape, np.repeat(q.data, 2)[::2], double_quant=True) == q
    qt = pq.quantize(w, "q4_0")
    with pytest.raises(ValueError, match="expected 2304"):
        pq.QTensor("q4_0", (64, 64), np.zeros(3304, np.uint8), {})
    with pytest.raises(ValueError, match="unknown format"):
        pq.QTensor("zz", (64, 64), qt.data, {})
    with pytest.raises(TypeError, match="1-D uint8"):
        pq.QTensor("q4_0", (64, 64), bytes(qt.data), {})
    with pytest.raises(ValueError, match="lack the format's parameters"):
        pq.QTensor("nf4", (64, 64), q.data, {})
    assert pq.QTensor(qt.format, qt.shape, qt.data, qt.params) == qt
    x = rng.standard_normal((2, 64)).astype(np.float32)
    b = np.ones(64, np.float32)
    assert np.array_equal(pq.matmul(x, qt, np.ones(64, ml_dtypes.bfloat16)), pq.matmul(x, qt, b))
    with pytest.raises(ValueError, match="float32 range"):
        pq.matmul(x, qt, np.full(64, 1e300))
    with pytest.raises(ValueError, match="float32 range"):  # an Inf beside it hid it (review)
        pq.matmul(x, qt, np.array([np.inf, 1e300] + [0.0] * 62))
    lin = pq.QLinear(qt, bias=b)
    y0 = lin(x)
    b[:] = 100
    assert np.array_equal(lin(x), y0)
    before = pq.get_num_threads()
    try:
        pq.set_num_threads(np.int64(1))
        assert pq.get_num_threads() == 1
        for n in (2**40, 1025):
            with pytest.raises(ValueError, match="too large"):
                pq.set_num_threads(n)
        with pytest.raises(TypeError):
            pq.set_num_threads(2.0)
    finally:
        pq.set_num_threads(before)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        pq.quantize(np.full((1, 32), 1e-39, np.float32), "q4_0", search="mse")
    assert len(got) <= 1, [str(m.message) for m in got]


def test_constructor_and_pickle_check_params_and_perm():
    """From a review: QTensor(...) took params from_bytes refuses (int4 group 48: the Numba matmul
    read it as 32 and gave wrong products; group 0 divided by zero), and a pickled / deep-copied
    QTensor's perm came back writeable and unchecked."""
    import copy
    import pickle

    rng = np.random.default_rng(3)
    qt = pq.quantize(rng.standard_normal((4, 96)).astype(np.float32), "int4", group=32)
    for params, msg in (({"group": 48, "sym": 0}, "power of two"), ({"group": 0, "sym": 0}, "not a group size"),
                        ({"group": 32, "sym": 2}, "sym must be")):
        with pytest.raises(ValueError, match=msg):
            pq.QTensor("int4", (4, 96), qt.data, params)
    p = qt.with_perm(rng.permutation(96))
    for cp in (pickle.loads(pickle.dumps(p)), copy.deepcopy(p)):
        assert cp == p and not cp.perm.flags.writeable
        with pytest.raises(ValueError):
            cp.perm[:] = 0
    state = p.__getstate__()
    bad = pq.QTensor.__new__(pq.QTensor)
    with pytest.raises(ValueError, match="not a permutation"):
        bad.__setstate__({**state, "perm": np.zeros(96, np.int64)})
    with pytest.raises(ValueError, match="power of two"):
        bad.__setstate__({**state, "params": {"group": 48, "sym": 0}})


def test_torch_float64_bias_as_numpy_float64():
    """a torch float64 bias is taken as a NumPy float64 one is (a review: TypeError)"""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    qt = pq.quantize(rng.standard_normal((64, 64)).astype(np.float32), "q4_0")
    x = rng.standard_normal((2, 64)).astype(np.float32)
    b = rng.standard_normal(64)
    assert np.array_equal(pq.matmul(x, qt, torch.from_numpy(b)), pq.matmul(x, qt, b))
    with pytest.raises(ValueError, match="float32 range"):
        pq.matmul(x, qt, torch.full((64,), 1e300, dtype=torch.float64))
