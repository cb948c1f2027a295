"""pyqkern.io GGUF reader/writer (load_gguf / save_gguf) and pyqkern's QTensor safetensors layout
(pyqkern.io.save / load): round trips against the gguf package, error cases, hostile files."""
from __future__ import annotations

import os
import struct
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st_

import pyqkern as pq
from pyqkern.io import qsave

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

GGML = ["q4_0", "q4_1", "q8_0", "q4_k", "q6_k", "iq4_nl"]
GT = {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q8_0": T.Q8_0, "q4_k": T.Q4_K, "q6_k": T.Q6_K, "iq4_nl": T.IQ4_NL}


def _w(n, k, seed=0):
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


def _base(qt):
    """True if qt.data does not own its memory (a view, e.g. of the file's memory map)."""
    return not qt.data.flags.owndata


# ------------------------------------------------------------------------------------- GGUF

@pytest.mark.parametrize("fmt", GGML)
def test_save_gguf_bytes_shape_type(tmp_path, fmt):
    qt = pq.quantize(_w(3, 512, 1), fmt)
    p = tmp_path / "a.gguf"
    pq.io.save_gguf(p, {"w": qt})
    r = gguf.GGUFReader(p)
    (t,) = r.tensors
    assert t.tensor_type == GT[fmt]
    assert t.shape.tolist() == [512, 3]  # ggml order: ne0 = K (row length) first
    assert t.data.shape[0] == 3
    assert t.data.tobytes() == qt.data.tobytes()
    assert r.fields["general.architecture"].contents() == "pyqkern"
    assert r.fields["general.quantization_version"].contents() == 2
    # gguf's own dequantize of the file's bytes == ours
    np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type), pq.dequantize(qt))


@pytest.mark.parametrize("fmt", GGML)
def test_load_gguf_roundtrip(tmp_path, fmt):
    qt = pq.quantize(_w(4, 256, 2), fmt)
    p = tmp_path / "a.gguf"
    pq.io.save_gguf(p, {"blk.0.w": qt, "b": np.arange(4, dtype=np.float32)})
    out, meta = pq.io.load_gguf(p)
    q2 = out["blk.0.w"]
    assert isinstance(q2, pq.QTensor) and q2 == qt
    assert q2.data.tobytes() == qt.data.tobytes()
    assert _base(q2) and not q2.data.flags.writeable  # zero-copy view of the read-only map
    np.testing.assert_array_equal(pq.dequantize(q2), pq.dequantize(qt))
    np.testing.assert_array_equal(out["b"], np.arange(4, dtype=np.float32))
    assert meta["general.architecture"] == "pyqkern"


def test_gguf_file_written_by_gguf_package(tmp_path):
    """A file made by gguf.GGUFWriter from gguf.quants bytes loads as the equal QTensor."""
    w = _w(5, 256, 3)
    p = tmp_path / "ext.gguf"
    wr = gguf.GGUFWriter(p, "llama")
    wr.add_uint32("llama.context_length", 4096)
    wr.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    wr.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    for fmt in GGML:  # gguf.quants quantizes only the legacy types; the rest come from pyqkern (bit-exact)
        b = (gguf.quants.quantize(w, GT[fmt]) if fmt in ("q4_0", "q4_1", "q8_0")
             else pq.quantize(w, fmt).data.reshape(5, -1).copy())
        wr.add_tensor(f"t.{fmt}", b, raw_dtype=GT[fmt])
    wr.add_tensor("f16", w.astype(np.float16))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    out, meta = pq.io.load_gguf(p)
    for fmt in GGML:
        assert out[f"t.{fmt}"] == pq.quantize(w, fmt)
    np.testing.assert_array_equal(out["f16"], w.astype(np.float16))
    assert meta["general.architecture"] == "llama"
    assert meta["llama.context_length"] == 4096
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert meta["tokenizer.ggml.tokens"] == ["a", "b", "c"]


def test_gguf_metadata_and_arrays(tmp_path):
    p = tmp_path / "m.gguf"
    meta = {"x.s": "héllo", "x.u": 7, "x.neg": -3, "x.big": 1 << 40, "x.f": 0.5, "x.b": True,
            "x.li": [1, -2, 3], "x.ls": ["a", "b"], "x.lf": [0.25, 1.5], "general.name": "t"}
    f16 = _w(2, 6).astype(np.float16)
    pq.io.save_gguf(p, {"a": _w(3, 4), "h": f16, "i": np.arange(3, dtype=np.int32)}, meta, arch="myarch")
    out, m2 = pq.io.load_gguf(p)
    for k, v in meta.items():
        assert m2[k] == v, k
    assert m2["general.architecture"] == "myarch"
    assert "general.quantization_version" not in m2  # nothing quantized
    np.testing.assert_array_equal(out["a"], _w(3, 4))
    assert out["h"].dtype == np.float16 and np.array_equal(out["h"], f16)
    assert out["i"].dtype == np.int32
    r = gguf.GGUFReader(p)
    assert {t.name: t.tensor_type for t in r.tensors} == {"a": T.F32, "h": T.F16, "i": T.I32}


def test_gguf_metadata_beyond_f32_and_int64(tmp_path):
    """Numbers f32 / int64 cannot hold are stored in a type that can (f64, u64) or refused with a
    ValueError (they once leaked struct.error / OverflowError from the writer)."""
    gguf = pytest.importorskip("gguf")
    w = pq.quantize(np.random.default_rng(2).standard_normal((32, 64)).astype(np.float32), "q4_0")
    path = tmp_path / "m.gguf"
    for value, vtype, want in [(1e300, "FLOAT64", [1e300]), ([2 ** 63], "UINT64", [2 ** 63]),
                               ([1, 2.5e300], "FLOAT64", [1.0, 2.5e300]), (0.5, "FLOAT32", [0.5])]:
        pq.io.save_gguf(path, {"w": w}, metadata={"a": value})
        f = gguf.GGUFReader(str(path)).fields["a"]
        assert gguf.GGUFValueType(f.types[-1]).name == vtype
        assert [f.parts[i].tolist()[0] for i in f.data] == want
        assert pq.io.load_gguf(path)[1]["a"] == value
    with pytest.raises(ValueError, match="64-bit"):
        pq.io.save_gguf(path, {"w": w}, metadata={"a": [-1, 2 ** 64 - 1]})


def test_gguf_metadata_types_survive_load_and_save(tmp_path):
    """load_gguf returns a GGUFMetadata that remembers each key's GGUF type; save_gguf writes it
    back with that type while the value fits (u8, i16, i32 >= 0, u32 arrays and f64 once came back
    as UINT32 / INT32 arrays / FLOAT32), and honours general.alignment (it once refused it)."""
    gguf = pytest.importorskip("gguf")
    src, dst = tmp_path / "src.gguf", tmp_path / "dst.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_custom_alignment(64)
    w.add_uint8("x.u8", 7)
    w.add_int16("x.i16", -3)
    w.add_int32("x.i32", 7)
    w.add_float64("x.f64", 0.1)
    w.add_key_value("x.arr", [1, 2], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
    w.add_key_value("x.arrf", [0.1, 0.2], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT64)
    w.add_tensor("t", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tensors, meta = pq.io.load_gguf(src)
    assert isinstance(meta, dict) and meta.types["x.u8"][0] == gguf.GGUFValueType.UINT8
    meta["x.i16"] = -4  # changed but still fits: keeps INT16
    meta["x.u8"] = 300  # no longer fits UINT8: the plain rules (UINT32)
    pq.io.save_gguf(dst, tensors, meta)

    def fields(path):
        r = gguf.GGUFReader(str(path))
        return {k: ([gguf.GGUFValueType(t).name for t in f.types], [f.parts[i].tolist() for i in f.data])
                for k, f in r.fields.items() if k.startswith("x.") or k == "general.alignment"}

    a, b = fields(src), fields(dst)
    for k in ("x.i32", "x.f64", "x.arr", "x.arrf", "general.alignment"):
        assert a[k] == b[k], k
    assert b["x.i16"] == (["INT16"], [[-4]]) and b["x.u8"] == (["UINT32"], [[300]])
    assert np.array_equal(pq.io.load_gguf(dst)[0]["t"], tensors["t"])
    with pytest.raises(ValueError, match="alignment"):
        pq.io.save_gguf(dst, tensors, {"general.alignment": 48})


def test_gguf_metadata_matches_gguf_reader(tmp_path):
    """pyqkern parses GGUF headers itself (the gguf package's reader builds objects per array
    item: a llama-3-sized tokenizer took 7 s and 670 MB): every value type comes out as the
    gguf package's reader gives it (ReaderField.contents()), and the tensors' types, shapes and
    bytes as its ReaderTensor ones."""
    p = tmp_path / "types.gguf"
    wr = gguf.GGUFWriter(p, "llama")
    V = gguf.GGUFValueType
    scalars = [(V.UINT8, 200), (V.INT8, -100), (V.UINT16, 60000), (V.INT16, -30000), (V.UINT32, 4_000_000_000),
               (V.INT32, -2_000_000_000), (V.FLOAT32, 0.1), (V.BOOL, True), (V.UINT64, 1 << 63),
               (V.INT64, -(1 << 62)), (V.FLOAT64, 1e-300), (V.STRING, "héllo ✓")]
    for vt, v in scalars:
        wr.add_key_value(f"s.{vt.name}", v, vt)
        if vt != V.STRING:
            wr.add_key_value(f"a.{vt.name}", [v, v, v], V.ARRAY, sub_type=vt)
    wr.add_array("a.STRING", ["x", "", "yz" * 50])
    wr.add_array("a.empty", [])
    w = _w(3, 64)
    wr.add_tensor("f32", w)
    wr.add_tensor("q8", gguf.quants.quantize(w, T.Q8_0), raw_dtype=T.Q8_0)
    wr.add_tensor("i16", np.arange(6, dtype=np.int16).reshape(2, 3))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    r = gguf.GGUFReader(p)
    want = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    infos, meta = pq.io.gguf.read_gguf_info(p)
    assert meta == want and [type(v) for v in meta.values()] == [type(v) for v in want.values()]
    assert infos == [(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist())), int(t.n_bytes))
                     for t in r.tensors]
    out, meta2 = pq.io.load_gguf(p)
    assert meta2 == want
    np.testing.assert_array_equal(out["f32"], w)
    assert out["q8"] == pq.quantize(w, "q8_0") and not out["q8"].data.flags.writeable
    assert out["i16"].dtype == np.int16 and out["i16"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_gguf_bf16_and_unsupported_types(tmp_path):
    w = _w(2, 256, 4)
    p = tmp_path / "u.gguf"
    wr = gguf.GGUFWriter(p, "llama")
    q5k = np.random.default_rng(0).integers(0, 256, (2, 176), dtype=np.uint8)  # any Q5_K block bytes
    wr.add_tensor("q5k", q5k, raw_dtype=T.Q5_K)
    wr.add_tensor("q4_1d", pq.quantize(w[:1], "q4_0").data.copy(), raw_dtype=T.Q4_0)
    wr.add_tensor("bf", gguf.quants.quantize(w, T.BF16), raw_dtype=T.BF16)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    with pytest.warns(UserWarning, match="q5k .Q5_K"):
        out, _ = pq.io.load_gguf(p)
    assert out["q5k"].dtype == np.uint8 and np.array_equal(out["q5k"], q5k)
    assert out["q4_1d"].dtype == np.uint8  # quantized but 1-D: raw bytes
    bf = out["bf"]
    assert bf.dtype == np.float32 and bf.shape == (2, 256)
    want = (gguf.quants.quantize(w, T.BF16).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(bf, want.reshape(2, 256))
    with pytest.raises(ValueError, match="Q5_K"):
        pq.io.load_gguf(p, unsupported="raise")
    with pytest.warns(UserWarning, match="skipped"):
        out, _ = pq.io.load_gguf(p, unsupported="skip")
    assert set(out) == {"bf"}
    with pytest.raises(ValueError, match="unsupported"):
        pq.io.load_gguf(p, unsupported="nope")


@pytest.mark.parametrize("fmt,kw", [("nf4", {}), ("int4", {"group": 32}), ("int8", {})])
def test_save_gguf_rejects_non_ggml(tmp_path, fmt, kw):
    qt = pq.quantize(_w(2, 64), fmt, **kw)
    p = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match=rf"{fmt}.*pyqkern\.io\.save"):
        pq.io.save_gguf(p, {"w": qt, "ok": pq.quantize(_w(2, 64), "q4_0")})
    assert not p.exists() and not os.listdir(tmp_path)


def test_save_gguf_errors(tmp_path):
    p = tmp_path / "x.gguf"
    qt = pq.quantize(_w(2, 64), "q4_0")
    with pytest.raises(ValueError, match="perm"):
        pq.io.save_gguf(p, {"w": qt.with_perm(np.arange(64)[::-1])})
    with pytest.raises(TypeError, match="dtype"):
        pq.io.save_gguf(p, {"w": np.zeros(3, np.uint8)})
    with pytest.raises(TypeError):
        pq.io.save_gguf(p, {"w": [1, 2]})
    with pytest.raises(TypeError):
        pq.io.save_gguf(p, {"w": qt}, {"k": object()})
    with pytest.raises(ValueError, match="dimensions"):
        pq.io.save_gguf(p, {"w": np.zeros((1, 1, 1, 1, 2), np.float32)})
    # values the gguf writer would fail on deep inside (review): named ValueErrors, nothing left behind
    for meta, msg in (({"k": [1.5, 10 ** 400]}, "metadata 'k': cannot be written: OverflowError"),
                      ({"k": "a\udcff"}, "metadata 'k': string .* UTF-8"),
                      ({"k": ["x", "\udcff"]}, "metadata 'k': string .* UTF-8"),
                      ({"k\udcff": 1}, "metadata key .* UTF-8")):
        with pytest.raises(ValueError, match=msg):
            pq.io.save_gguf(p, {"w": qt}, meta)
    with pytest.raises(ValueError, match="tensor name .* UTF-8"):
        pq.io.save_gguf(p, {"w\udcff": qt})
    pq.io.save_gguf(p, {"w": qt}, {"f": 1e300})
    _, meta = pq.io.load_gguf(p)
    meta["f"] = 10 ** 400  # the recorded FLOAT64 type no longer fits: a clear error, not OverflowError
    with pytest.raises(ValueError, match="metadata 'f'"):
        pq.io.save_gguf(tmp_path / "y.gguf", {"w": qt}, meta)
    os.remove(p)
    assert not os.listdir(tmp_path)


def _good_gguf(tmp_path):
    p = tmp_path / "good.gguf"
    pq.io.save_gguf(p, {"a": pq.quantize(_w(2, 64), "q4_0"), "b": pq.quantize(_w(1, 256), "q6_k"),
                        "c": np.ones(3, np.float32)},
                    {"s": "text", "l": ["x", "yy"], "n": [1, 2, 3], "f": 1.5})
    return p.read_bytes()


def test_gguf_truncated_and_garbage(tmp_path):
    raw = _good_gguf(tmp_path)
    p = tmp_path / "bad.gguf"
    end = len(raw.rstrip(b"\0"))  # the last tensor (ones) ends here; alignment padding follows
    for cut in (0, 3, 23, 40, len(raw) // 2, end - 1):
        p.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match=r"bad\.gguf.*(too short|truncated)"):
            pq.io.load_gguf(p)
    p.write_bytes(b"NOPE" + raw[4:])
    with pytest.raises(ValueError, match="bad magic"):
        pq.io.load_gguf(p)
    p.write_bytes(raw[:4] + struct.pack("<I", 1) + raw[8:])
    with pytest.raises(ValueError, match="version 1"):
        pq.io.load_gguf(p)
    # a forged huge array length must fail fast, not loop
    bad = bytearray(raw)
    key = struct.pack("<Q", 1) + b"n" + struct.pack("<I", 9) + struct.pack("<I", 5) + struct.pack("<Q", 3)
    j = bytes(bad).find(key)
    assert j > 0
    bad[j + len(key) - 8: j + len(key)] = struct.pack("<Q", 1 << 62)
    p.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="truncated"):
        pq.io.load_gguf(p)


def test_gguf_tensor_count_bounded(tmp_path):
    """More than 2^17 tensors is refused from the header (each loaded tensor costs ~1 KB of Python
    objects: a 38 MB file of a million one-byte tensors took ~1 GB)."""
    n = (1 << 17) + 1
    p = tmp_path / "many.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n, 0) + b"\0" * (24 * n))
    with pytest.raises(ValueError, match="131073 tensors"):
        pq.io.load_gguf(p)


def test_gguf_nested_array_errors_name_the_item(tmp_path):
    """Error text names the item ("value of 'k'[1][0]"), built only when raised (review: building it
    for every item copied the key each time, quadratic in key length x items)."""
    hdr = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9)
    inner_ok = struct.pack("<IQ", 4, 1) + struct.pack("<I", 7)          # [uint32 7]
    inner_bad = struct.pack("<IQ", 7, 1) + b"\x02"                      # [bool 2]
    p = tmp_path / "nested.gguf"
    p.write_bytes(hdr + struct.pack("<IQ", 9, 2) + inner_ok + inner_bad)
    with pytest.raises(ValueError, match=r"value of 'k'\[1\]: bool array holds values other than 0 and 1"):
        pq.io.load_gguf(p)
    p.write_bytes(hdr + struct.pack("<IQ", 9, 2) + inner_ok + struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 99, 0))
    with pytest.raises(ValueError, match=r"value of 'k'\[1\]\[0\]: unknown array item type 99"):
        pq.io.load_gguf(p)


def test_gguf_item_count_bounded(tmp_path):
    """A header of a few MB whose arrays hold millions of items (the gguf package's reader builds
    objects per item: ~700 bytes of memory each) is refused before that reader runs; a real
    tokenizer's count passes."""
    from pyqkern.io import gguf as g

    def one_array(n):
        hdr = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
        return hdr + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9) + struct.pack("<IQ", 0, n) + b"\0" * n

    p = tmp_path / "many.gguf"
    p.write_bytes(one_array(g._MAX_ITEMS + 1))
    for read in (pq.io.load_gguf, g.read_gguf_info):
        with pytest.raises(ValueError, match=r"many\.gguf.*more than 2000000 keys, tensors and array items"):
            read(p)
    p.write_bytes(one_array(150_000))   # a tokenizer array's size (llama-3: 128256 tokens, 280147 merges)
    _, meta = g.read_gguf_info(p)
    assert len(meta["k"]) == 150_000


def _check_load(path, loader):
    try:
        out, _ = loader(path)
    except ValueError:
        return
    for v in out.values():
        if isinstance(v, pq.QTensor):
            pq.dequantize(v)


@settings(max_examples=60)
@given(data=st_.data())
def test_gguf_fuzz(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("fz")
    raw = bytearray(_good_gguf(d))
    n = data.draw(st_.integers(1, 8))
    for _ in range(n):
        pos = data.draw(st_.one_of(st_.integers(0, min(400, len(raw) - 1)), st_.integers(0, len(raw) - 1)))
        raw[pos] = data.draw(st_.integers(0, 255))
    if data.draw(st_.booleans()):
        raw = raw[: data.draw(st_.integers(0, len(raw)))]
    p = d / "f.gguf"
    p.write_bytes(bytes(raw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check_load(p, pq.io.load_gguf)


# ------------------------------------------------------------------------ pyqkern layout

CASES = [("q4_0", {}), ("q4_1", {}), ("q8_0", {}), ("q4_k", {}), ("q6_k", {}), ("iq4_nl", {}),
         ("nf4", {}), ("nf4", {"group": 128}), ("nf4", {"double_quant": True}),
         ("nf4", {"group": 32, "double_quant": True}),
         ("int4", {}), ("int4", {"sym": True}), ("int4", {"group": 32}), ("int4", {"group": 32, "sym": True}),
         ("int4", {"group": -1}), ("int4", {"group": -1, "sym": True}), ("int8", {})]


@pytest.mark.parametrize("fmt,kw", CASES, ids=[f"{f}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for f, kw in CASES])
def test_qsave_roundtrip(tmp_path, fmt, kw):
    w = _w(6, 512, 5)
    qt = pq.quantize(w, fmt, **kw)
    perm = np.random.default_rng(1).permutation(512)
    qp = qt.with_perm(perm)
    p = tmp_path / "q.safetensors"
    plain = np.arange(6, dtype=np.float16)
    pq.io.save(p, {"w": qt, "wp": qp, "bias": plain}, {"note": "x"})
    out, meta = pq.io.load(p)
    assert meta == {"note": "x"}
    assert set(out) == {"w", "wp", "bias"}
    for name, ref in (("w", qt), ("wp", qp)):
        got = out[name]
        assert isinstance(got, pq.QTensor) and got == ref
        assert got.data.tobytes() == ref.data.tobytes() and got.params == ref.params
        np.testing.assert_array_equal(pq.dequantize(got), pq.dequantize(ref))
    assert out["w"].perm is None and np.array_equal(out["wp"].perm, perm)
    assert out["bias"].dtype == np.float16 and np.array_equal(out["bias"], plain)


def test_qsave_plain_file_and_errors(tmp_path):
    p = tmp_path / "p.safetensors"
    pq.io.safetensors.save(p, {"a": np.ones(3, np.float32)})
    out, meta = pq.io.load(p)
    assert list(out) == ["a"] and meta == {}
    qt = pq.quantize(_w(2, 64), "q4_0")
    with pytest.raises(ValueError, match="reserved"):
        pq.io.save(p, {"w": qt}, {qsave.META_KEY: "x"})
    with pytest.raises(ValueError, match="reserved"):
        pq.io.save(p, {"w" + qsave.PERM_SUFFIX: np.ones(2)})
    # hand-made metadata that lies
    import json

    def write(desc, tensors):
        pq.io.safetensors.save(p, tensors, {qsave.META_KEY: json.dumps(desc)})

    good = {"format": "q4_0", "shape": [2, 64], "params": {"group": 0, "sym": 0}}
    data = np.asarray(qt.data)
    write({"version": 1, "tensors": {"w": good}}, {"w": data})
    assert pq.io.load(p)[0]["w"] == qt
    bad = [({"version": 2, "tensors": {}}, "version"),
           ({"version": 1, "tensors": {"w": dict(good, format="q9")}}, "unknown format"),
           ({"version": 1, "tensors": {"w": dict(good, shape=[2, 32])}}, "expected"),
           ({"version": 1, "tensors": {"w": dict(good, shape=[2])}}, "shape"),
           ({"version": 1, "tensors": {"w": dict(good, params={"group": 32, "sym": 0})}}, "group"),
           ({"version": 1, "tensors": {"w": dict(good, params={"x": 1})}}, "params"),
           ({"version": 1, "tensors": {"v": good}}, "U8"),
           ({"version": 1, "tensors": {"w": dict(good, perm="w" + qsave.PERM_SUFFIX)}}, "perm")]
    for desc, msg in bad:
        write(desc, {"w": data})
        with pytest.raises(ValueError, match=msg):
            pq.io.load(p)
    pq.io.safetensors.save(p, {"w": data}, {qsave.META_KEY: "{not json"})
    with pytest.raises(ValueError, match="JSON"):
        pq.io.load(p)


def _good_qsave(d):
    p = d / "g.safetensors"
    pq.io.save(p, {"a": pq.quantize(_w(2, 64), "nf4", double_quant=True),
                   "b": pq.quantize(_w(2, 64), "int4", group=32).with_perm(np.arange(64)[::-1]),
                   "c": np.ones(3, np.float32)})
    return p.read_bytes()


@settings(max_examples=60)
@given(data=st_.data())
def test_qsave_fuzz(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("fq")
    raw = bytearray(_good_qsave(d))
    hlen = struct.unpack("<Q", raw[:8])[0]
    for _ in range(data.draw(st_.integers(1, 6))):
        pos = data.draw(st_.one_of(st_.integers(0, 8 + hlen - 1), st_.integers(0, len(raw) - 1)))
        raw[pos] = data.draw(st_.one_of(st_.integers(0, 255), st_.sampled_from(list(b'0123456789",:{}[]'))))
    if data.draw(st_.booleans()):
        raw = raw[: data.draw(st_.integers(0, len(raw)))]
    p = d / "f.safetensors"
    p.write_bytes(bytes(raw))
    _check_load(p, pq.io.load)


def test_gguf_metadata_empty_string_int_as_f32_and_empty_array(tmp_path):
    """An empty string value was dropped (gguf's add_string skips it); an int given to a key
    loaded as FLOAT32 was written as UINT32 (llama.cpp refuses the type); an empty array cannot
    be written by the gguf package: a clear error."""
    gguf = pytest.importorskip("gguf")
    qt = pq.quantize(np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32), "q4_0")
    src, dst = tmp_path / "s.gguf", tmp_path / "d.gguf"
    pq.io.save_gguf(src, {"w": qt}, {"tokenizer.chat_template": "", "llama.rope.freq_base": 500000.0})
    t, m = pq.io.load_gguf(src)
    assert m["tokenizer.chat_template"] == ""
    m["llama.rope.freq_base"] = 10000
    pq.io.save_gguf(dst, t, m)
    r = gguf.GGUFReader(str(dst))
    assert gguf.GGUFValueType(r.fields["llama.rope.freq_base"].types[0]) == gguf.GGUFValueType.FLOAT32
    assert pq.io.load_gguf(dst)[1]["llama.rope.freq_base"] == 10000.0
    m["llama.rope.freq_base"] = 16777217  # f32 cannot hold it: an integer type
    pq.io.save_gguf(dst, t, m)
    assert pq.io.load_gguf(dst)[1]["llama.rope.freq_base"] == 16777217
    with pytest.raises(ValueError, match="empty array"):
        pq.io.save_gguf(dst, t, {"x.empty": []})



def test_quantized_file_load_save_adds_no_second_quantization_version(tmp_path, caplog):
    qt = pq.quantize(np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32), "q4_0")
    pq.io.save_gguf(tmp_path / "a.gguf", {"w": qt})
    t, m = pq.io.load_gguf(tmp_path / "a.gguf")
    with caplog.at_level("WARNING"):
        pq.io.save_gguf(tmp_path / "b.gguf", t, m)
    assert "Duplicated" not in caplog.text
    assert pq.io.load_gguf(tmp_path / "b.gguf")[1]["general.quantization_version"] == m["general.quantization_version"]


def test_overlapping_tensors_refused_and_gguf_prefixed_keys_kept(tmp_path):
    """Two tensors sharing bytes loaded as aliasing views; a real key named GGUF.* was dropped (the
    filter meant for gguf-py's pseudo-fields, which this parser never makes)"""
    from pyqkern.io.gguf import load_gguf

    def s(x):
        x = x.encode()
        return struct.pack("<Q", len(x)) + x

    def ti(name, n, off):
        return s(name) + struct.pack("<IQIQ", 1, n, 0, off)   # 1-D F32

    for offs in ((0, 32), (0, 0), (64, 0)):                    # overlapping, equal, out of order
        b = struct.pack("<IIQQ", 0x46554747, 3, 2, 0) + ti("t", 64, offs[0]) + ti("u", 32, offs[1])
        b += b"\0" * (-len(b) % 32) + np.arange(96, dtype=np.float32).tobytes()
        (tmp_path / "o.gguf").write_bytes(b)
        with pytest.raises(ValueError, match="overlap"):
            load_gguf(tmp_path / "o.gguf")
    b = struct.pack("<IIQQ", 0x46554747, 3, 2, 0) + ti("t", 8, 0) + ti("u", 8, 64)   # a gap: fine
    b += b"\0" * (-len(b) % 32) + np.arange(24, dtype=np.float32).tobytes()
    (tmp_path / "g.gguf").write_bytes(b)
    out, _ = load_gguf(tmp_path / "g.gguf")
    assert np.array_equal(out["u"], np.arange(16, 24, dtype=np.float32))
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_uint32("GGUF.custom", 7)
    w.add_tensor("x", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _, meta = load_gguf(tmp_path / "k.gguf")
    assert meta["GGUF.custom"] == 7


def test_gguf_tensor_names_llama_cpp_reads(tmp_path):
    """Names of at most 63 UTF-8 bytes (ggml's GGML_MAX_NAME with its NUL): llama.cpp refuses a
    file holding a longer one, so save_gguf does not write it (review)."""
    a = np.ones(4, np.float32)
    pq.io.save_gguf(tmp_path / "ok.gguf", {"é" * 31 + "x": a})  # 63 bytes
    with pytest.raises(ValueError, match="at most 63"):
        pq.io.save_gguf(tmp_path / "long.gguf", {"é" * 32: a})  # 64 bytes
    assert not (tmp_path / "long.gguf").exists()
