"""pyqkern.io: the strict safetensors reader/writer and PEFT adapter directories."""
from __future__ import annotations

import json
import os
import re
import struct
import tempfile
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pyqkern as pq
from pyqkern import LoRA
from pyqkern.io import peft as pio
from pyqkern.io import safetensors as sio

try:
    import ml_dtypes
except ImportError:  # optional
    ml_dtypes = None


# ----------------------------------------------------------------------------------------- safetensors
def _sample():
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal(7).astype(np.float16),
        "f64": rng.standard_normal((2, 2, 2)),
        "i8": np.arange(-5, 5, dtype=np.int8), "u8": np.arange(11, dtype=np.uint8).reshape(1, 11),
        "i16": np.arange(3, dtype=np.int16), "u16": np.arange(4, dtype=np.uint16),
        "i32": np.arange(-3, 3, dtype=np.int32), "u32": np.arange(2, dtype=np.uint32),
        "i64": np.array([-2**62, 5], np.int64), "u64": np.array([2**63 + 1], np.uint64),
        "b": np.array([True, False, True]), "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32), "strided": rng.standard_normal((6, 4)).astype(np.float32)[::2, ::-1],
        "big_endian": np.arange(5, dtype=">i4"),
    }


def test_roundtrip_all_dtypes(tmp_path):
    t = _sample()
    p = tmp_path / "a.safetensors"
    sio.save(p, t, {"format": "pt", "note": "é"})
    got, meta = sio.load(p)
    assert meta == {"format": "pt", "note": "é"}
    assert set(got) == set(t)
    for k, v in t.items():
        assert got[k].shape == v.shape and got[k].dtype.kind == v.dtype.kind, k
        np.testing.assert_array_equal(got[k], v)
    # zero-copy read-only views of the memory map
    assert not got["f32"].flags.writeable and not got["f32"].flags.owndata
    # tensors are aligned to their item size (header padded to 8, sorted by alignment)
    n = struct.unpack("<Q", p.read_bytes()[:8])[0]
    assert n % 8 == 0
    hdr, _ = sio.read_header(p)
    for k, info in hdr.items():
        assert info["data_offsets"][0] % sio.DTYPES[info["dtype"]].itemsize == 0, k


def test_bf16_modes(tmp_path):
    f = np.array([1.0, -2.5, 3.140625, 0.0], np.float32)
    bits = (f.view(np.uint32) >> 16).astype(np.uint16)
    p = tmp_path / "b.safetensors"
    sio.save(p, {"w": bits}, bf16=["w"])
    assert sio.read_header(p)[0]["w"]["dtype"] == "BF16"
    np.testing.assert_array_equal(sio.load(p)[0]["w"], f)
    got = sio.load(p, bf16="bits")[0]["w"]
    assert got.dtype == np.uint16 and np.array_equal(got, bits)
    if ml_dtypes is not None:
        got = sio.load(p, bf16="ml_dtypes")[0]["w"]
        assert got.dtype == np.dtype(ml_dtypes.bfloat16) and np.array_equal(got.astype(np.float32), f)
        sio.save(p, {"w": f.astype(ml_dtypes.bfloat16)})
        np.testing.assert_array_equal(sio.load(p)[0]["w"], f)
    with pytest.raises(ValueError, match="bf16"):
        sio.load(p, bf16="float16")
    with pytest.raises(TypeError, match="bf16"):
        sio.save(p, {"w": f}, bf16=["w"])


def test_save_bad_inputs(tmp_path):
    p = tmp_path / "c.safetensors"
    with pytest.raises(TypeError):
        sio.save(p, [np.zeros(2)])
    with pytest.raises(TypeError, match="numpy array"):
        sio.save(p, {"a": [1, 2]})
    with pytest.raises(TypeError, match="complex"):
        sio.save(p, {"a": np.zeros(2, np.complex64)})
    with pytest.raises(ValueError, match="reserved"):
        sio.save(p, {"__metadata__": np.zeros(2)})
    with pytest.raises(TypeError, match="metadata"):
        sio.save(p, {"a": np.zeros(2)}, {"k": 1})
    assert not p.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_cross_check_with_safetensors_package(tmp_path):
    stn = pytest.importorskip("safetensors.numpy", reason="safetensors not installed (pip install safetensors)")
    t = {k: v for k, v in _sample().items() if k != "big_endian"}
    ours = tmp_path / "ours.safetensors"
    sio.save(ours, t, {"format": "np"})
    theirs = stn.load_file(str(ours))
    for k, v in t.items():
        np.testing.assert_array_equal(theirs[k], v)
    p2 = tmp_path / "theirs.safetensors"
    stn.save_file({k: np.ascontiguousarray(v) for k, v in t.items()}, str(p2), metadata={"a": "b"})
    got, meta = sio.load(p2)
    assert meta == {"a": "b"}
    for k, v in t.items():
        np.testing.assert_array_equal(got[k], v)
    torch = pytest.importorskip("torch")
    import safetensors.torch as stt

    w = torch.randn(3, 8, dtype=torch.float32).to(torch.bfloat16)
    p3 = tmp_path / "bf16.safetensors"
    stt.save_file({"w": w, "h": w.to(torch.float16)}, str(p3))
    got, _ = sio.load(p3)
    np.testing.assert_array_equal(got["w"], w.float().numpy())
    np.testing.assert_array_equal(got["h"], w.to(torch.float16).numpy())


def _file(header, data=b"", *, raw_header=None, pad=True):
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


BAD_FILES = [
    (b"\x01\x00", "too short"),
    (struct.pack("<Q", 10**9), "exceeds the format's limit"),
    (struct.pack("<Q", 100) + b"{}", "larger than the rest of the file"),
    (_file(None, raw_header=b"\xff\xfe{}"), "UTF-8"),
    (_file(None, raw_header=b"[1, 2]"), "starting with"),
    (_file(None, raw_header=b"{\"a\": "), "not valid JSON"),
    (_file(None, raw_header=b"{" + b"\"a\":[" * 100000 + b"]"), "JSON"),
    (_file(None, raw_header=b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                            b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', data=b"\0" * 4),
     "duplicate"),
    (_file({"__metadata__": {"a": 1}}), "__metadata__"),
    (_file({"t": [1]}), "must be an object"),
    (_file({"t": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "missing data_offsets"),
    (_file({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, b"\0" * 4), "unknown x"),
    (_file({"t": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "is unknown"),
    (_file({"t": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4), "not supported"),
    (_file({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "non-negative"),
    (_file({"t": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 4), "non-negative"),
    (_file({"t": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4), "non-negative"),
    (_file({"t": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}, b"\0" * 4), "non-negative"),
    (_file({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4), "data_offsets must be"),
    (_file({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 4), "outside the data area"),
    (_file({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4), "outside the data area"),
    (_file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "needs 8 bytes"),
    (_file({"t": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 4]}}, b"\0" * 4), "needs 4398"),
    (_file({"t": {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}}), "too large"),
    (_file({"t": {"dtype": "U8", "shape": [1] * 40, "data_offsets": [0, 1]}}, b"\0"), "dimensions"),
    (_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "overlap"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "hole"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "unindexed"),
    (_file({"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x07"), "BOOL"),
    (_file(None, raw_header=b'{"\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', data=b"\x01"),
     "lone surrogate"),
    # more than 2^17 objects (tensors): refused before json builds ~165 MB of Python objects from them
    (_file(None, raw_header=b"{" + b'"t":{},' * ((1 << 17) + 2) + b'"z":1}'), "more than 131072 objects"),
    # arrays and items beyond what the entries can hold, refused before parsing (a review: 10
    # million empty lists in a 30 MB header took 880 MB and gave a 40 MB message; 2.5 million
    # metadata entries 600 MB)
    (_file(None, raw_header=b'{"a":{"dtype":"U8","shape":[' + b",".join([b"[]"] * 100_000)
           + b'],"data_offsets":[0,0]}}'), "100002 JSON arrays"),
    (_file(None, raw_header=b'{"__metadata__":{' + b",".join(b'"k%d":""' % i for i in range(100_000))
           + b"}}"), "99999 items"),
]


@pytest.mark.parametrize("blob,msg", BAD_FILES, ids=[m for _, m in BAD_FILES])
def test_reader_rejects(tmp_path, blob, msg):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(blob)
    with pytest.raises(ValueError, match=msg):
        sio.load(p)


def test_reader_accepts_edge_cases(tmp_path):
    p = tmp_path / "ok.safetensors"
    p.write_bytes(_file({}))
    assert sio.load(p) == ({}, {})
    # brackets, braces, commas and escaped quotes inside names are not counted as JSON structure
    odd = 'l[0],{1}\\"[[[,,,'
    p.write_bytes(_file({odd * 20: {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\1"))
    assert list(sio.load(p)[0]) == [odd * 20]
    p.write_bytes(_file({"__metadata__": {"k": "v"}, "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}}))
    got, meta = sio.load(p)
    assert meta == {"k": "v"} and got["e"].shape == (0, 3)
    # unpadded header, unaligned F32 data: still readable
    p.write_bytes(_file({"u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                         "f": {"dtype": "F32", "shape": [1], "data_offsets": [1, 5]}},
                        b"\x07" + struct.pack("<f", 1.5), pad=False))
    got, _ = sio.load(p)
    assert got["u"][0] == 7 and got["f"][0] == 1.5


def _real_file_bytes():
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "r.safetensors")
        sio.save(p, {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([True, False]),
                     "i": np.arange(3, dtype=np.int64)}, {"format": "pt"})
        with open(p, "rb") as f:
            return f.read()


REAL = _real_file_bytes()


def _load_bytes(blob):
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f.safetensors")
        with open(p, "wb") as f:
            f.write(blob)
        try:
            tensors, _ = sio.load(p)
            for a in tensors.values():
                np.asarray(a).sum()  # touch the data
        except ValueError:
            pass  # the only acceptable failure


@settings(max_examples=150)
@given(st.integers(0, len(REAL)))
def test_fuzz_truncate(cut):
    _load_bytes(REAL[:cut])


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, len(REAL) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_mutate(edits):
    blob = bytearray(REAL)
    for pos, val in edits:
        blob[pos] = val
    _load_bytes(bytes(blob))


@settings(max_examples=150)
@given(st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_fuzz_header_length_and_tail(n, tail):
    _load_bytes(struct.pack("<Q", n) + REAL[8:] + tail)


# ----------------------------------------------------------------------------------------- PEFT layout
P = "base_model.model."


def _write_peft(d, tensors, config):
    os.makedirs(d, exist_ok=True)
    sio.save(os.path.join(d, "adapter_model.safetensors"), tensors, {"format": "pt"})
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(config, f)


def _ab(rng, r, k, n):
    return rng.standard_normal((r, k)).astype(np.float32), rng.standard_normal((n, r)).astype(np.float32)


def test_load_handwritten_adapter_with_patterns(tmp_path):
    rng = np.random.default_rng(0)
    mods = {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.v_proj": 8,
            "model.layers.1.self_attn.q_proj": 4, "model.layers.1.mlp.down_proj": 2}
    t, ab = {}, {}
    for m, r in mods.items():
        a, b = _ab(rng, r, 32, 16)
        ab[m] = (a, b)
        t[f"{P}{m}.lora_A.weight"] = a
        t[f"{P}{m}.lora_B.weight"] = b
    t[f"{P}model.embed_tokens.lora_embedding_A"] = np.zeros((4, 10), np.float32)  # skipped, with a warning
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "use_rslora": False, "use_dora": False,
           # "v_proj" matches as a dotted suffix; the regex "layers\.1\.mlp.*" matches down_proj of layer 1
           "rank_pattern": {"v_proj": 8, r"layers\.1\.mlp.*": 2},
           "alpha_pattern": {"layers.1.self_attn.q_proj": 3, "q_proj": 5}}
    _write_peft(tmp_path, t, cfg)
    with pytest.warns(UserWarning, match="skipped 1"):
        ads = pio.load_peft_adapter(tmp_path)
    assert set(ads) == set(mods)
    want_alpha = {"model.layers.0.self_attn.q_proj": 5, "model.layers.0.self_attn.v_proj": 16,
                  "model.layers.1.self_attn.q_proj": 3, "model.layers.1.mlp.down_proj": 16}
    for m, ad in ads.items():
        a, b = ab[m]
        assert isinstance(ad, pq.LoRA) and ad.rank == mods[m] and not ad.is_dora
        root = ad.A  # a copy (in the adapters' shared buffer), not a view of the file
        while isinstance(root.base, np.ndarray):
            root = root.base
        # its own memory (not the file's mapping), read-only like every LoRA's operands
        assert not ad.A.flags.writeable and root.flags.owndata and not isinstance(root, np.memmap)
        np.testing.assert_array_equal(ad.A, a)
        np.testing.assert_array_equal(ad.B, b)
        assert ad.alpha == want_alpha[m] and ad.scale == want_alpha[m] / mods[m], m


def test_pattern_key_matches_peft():
    keys = ["q_proj", r"layers\.1\..*", "layers.2.mlp", "(up|down)_proj", "proj"]
    modules = ["model.layers.0.q_proj", "q_proj", "model.layers.1.k_proj", "model.layers.2.mlp",
               "model.layers.2.mlp.up_proj", "xq_proj", "model.layers.3.mlp.gate_proj", "proj"]
    want = {"model.layers.0.q_proj": "q_proj", "q_proj": "q_proj", "model.layers.1.k_proj": r"layers\.1\..*",
            "model.layers.2.mlp": "layers.2.mlp", "model.layers.2.mlp.up_proj": "(up|down)_proj",
            "xq_proj": "xq_proj", "model.layers.3.mlp.gate_proj": "model.layers.3.mlp.gate_proj", "proj": "proj"}
    for m in modules:
        assert pio.get_pattern_key(keys, m) == want[m], m
    try:
        from peft.utils.other import get_pattern_key as peft_key
    except ImportError:
        return
    for m in modules:
        assert pio.get_pattern_key(keys, m) == peft_key(keys, m), m
    with pytest.raises(ValueError, match="regular expression"):
        pio.get_pattern_key(["(unclosed"], "x")
    # what PEFT configs use passes the backtracking guard (at most two unbounded repetitions, no
    # repetition or alternatives inside one)
    for key in (r"^(?!.*vision).*q_proj", r"layers\.\d+\.mlp", "(q|k|v)_proj", r"[a-z_]+\.\d+"):
        pio.get_pattern_key([key], "model.layers.0.q_proj")
    with pytest.raises(ValueError, match="more than 1000"):
        pio.get_pattern_key(["q"], "a" * 1001)


def test_load_rslora_dora_bf16(tmp_path):
    rng = np.random.default_rng(1)
    a, b = _ab(rng, 4, 32, 16)
    mag = rng.random(16).astype(np.float32) + 0.5
    bits = lambda x: (x.view(np.uint32) >> 16).astype(np.uint16)  # noqa: E731
    t = {f"{P}l.lora_A.weight": bits(a), f"{P}l.lora_B.weight": b.astype(np.float16),
         f"{P}l.lora_magnitude_vector": mag}
    os.makedirs(tmp_path, exist_ok=True)
    sio.save(tmp_path / "adapter_model.safetensors", t, bf16=[f"{P}l.lora_A.weight"])
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 6, "use_rslora": True,
                                                               "use_dora": True}))
    ad = pio.load_peft_adapter(tmp_path)["l"]
    assert ad.is_dora and ad.rslora and ad.scale == 6 / 2
    np.testing.assert_array_equal(ad.A, (bits(a).astype(np.uint32) << 16).view(np.float32))
    np.testing.assert_array_equal(ad.B, b.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(ad.magnitude, mag)


def test_load_keeps_the_files_16_bit_dtype(tmp_path):
    """A and B both BF16 (or both F16) in the file stay so in the adapter (exact, half the bytes
    the fused kernels read per token), with the same results as the fp32 copy; mixed or F32
    files give fp32 storage."""
    rng = np.random.default_rng(8)
    a, b = _ab(rng, 4, 64, 24)
    bits = lambda x: (x.view(np.uint32) >> 16).astype(np.uint16)  # noqa: E731
    qt = pq.quantize(rng.standard_normal((24, 64)).astype(np.float32), "q4_0")
    x = rng.standard_normal((3, 64)).astype(np.float32)
    for name, ta, tb, bf16, want in (("bf", bits(a), bits(b), ["A", "B"], "bfloat16"),
                                     ("h", a.astype(np.float16), b.astype(np.float16), [], "float16"),
                                     ("mix", bits(a), b.astype(np.float16), ["A"], "float32"),
                                     ("f", a, b, [], "float32")):
        d = tmp_path / name
        os.makedirs(d)
        keys = {"A": f"{P}l.lora_A.weight", "B": f"{P}l.lora_B.weight"}
        sio.save(d / "adapter_model.safetensors", {keys["A"]: ta, keys["B"]: tb}, bf16=[keys[k] for k in bf16])
        (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
        ad = pio.load_peft_adapter(d)["l"]
        assert ad.storage == want, name
        same = LoRA(ad.A, ad.B, alpha=8, storage="float32")
        for compute in ("int8", "float"):
            assert np.array_equal(pq.matmul(x, qt, lora=ad, compute=compute),
                                  pq.matmul(x, qt, lora=same, compute=compute)), (name, compute)


def test_pattern_keys_plain_and_regex_keep_file_order(tmp_path):
    """plain keys are looked up by the module's last component, regex keys tried in turn: the first
    key in file order still wins, as in PEFT; a config asking for millions of regex matches is refused."""
    for keys, module, want in (([r"layers\.0\..*", "q_proj"], "m.layers.0.q_proj", r"layers\.0\..*"),
                               (["q_proj", r"layers\.0\..*"], "m.layers.0.q_proj", "q_proj"),
                               (["k_proj", r"layers\.0\..*", "q_proj"], "m.layers.0.q_proj", r"layers\.0\..*"),
                               (["proj", "q_proj"], "q_proj", "q_proj"), (["proj"], "m.q_proj", "m.q_proj"),
                               (["q_proj"], "x.q_proj\n", "q_proj"), (["q_proj"], "a\nb.q_proj", "a\nb.q_proj")):
        assert pio.get_pattern_key(keys, module) == want, (keys, module)
        assert pio.get_pattern_key(keys, module) == (next((k for k in keys if re.match(rf"(.*\.)?({k})$", module)),
                                                         module))
    rng = np.random.default_rng(11)
    t = {}
    for i in range(1000):
        t[f"{P}m{i}.lora_A.weight"] = rng.standard_normal((1, 32)).astype(np.float32)
        t[f"{P}m{i}.lora_B.weight"] = rng.standard_normal((16, 1)).astype(np.float32)
    d = _bad_dir(tmp_path, t, {"r": 1, "rank_pattern": {rf"x{i}\d": 1 for i in range(4001)}}, "many")
    with pytest.raises(ValueError, match="regular-expression rank_pattern/alpha_pattern keys"):
        pio.load_peft_adapter(d)
    d = _bad_dir(tmp_path, t, {"r": 1, "rank_pattern": {f"x{i}": 1 for i in range(4001)}}, "plain")
    assert len(pio.load_peft_adapter(d)) == 1000  # plain keys: one lookup per module
    # the work grows with the names' lengths (a review: .*\..*\.x takes 0.85 s per 999-dot name)
    t = {}
    for i in range(3):
        for part, shape in (("lora_A", (1, 32)), ("lora_B", (16, 1))):
            t[f"{P}{'.' * 990}m{i}.{part}.weight"] = rng.standard_normal(shape).astype(np.float32)
    d = _bad_dir(tmp_path, t, {"r": 1, "rank_pattern": {r".*\..*\.x": 1}}, "slow")
    with pytest.raises(ValueError, match="could take about"):
        pio.load_peft_adapter(d)
    assert pio.get_pattern_key([r".*\..*\.x"], "." * 999) == "." * 999  # one such name: within the bound
    # names with a newline match every key as a regex (PEFT's semantics), plain keys counted too
    # (a review: 50000 plain keys over 60 such names ran for minutes)
    keys = [f"k{i}" for i in range(2000)]
    assert pio.get_pattern_key(keys + ["q"], "x.q\n") == "q" and pio.get_pattern_key(keys + ["q"], "a\nb.q") == "a\nb.q"
    work = pio._Patterns(keys).work
    assert work("x.q\n") > 2000 * 500 and work("x.q") == 0


def test_trained_biases_get_their_own_warning(tmp_path):
    """bias='all' / 'lora_only' files carry the fine-tuned layers' biases: not part of a LoRA, so
    named in a warning of their own; a .bias of a modules_to_save copy (bias='none') is just skipped."""
    rng = np.random.default_rng(3)
    a, b = _ab(rng, 4, 32, 16)
    for bias, key, match in (("all", f"{P}m.base_layer.bias", "trained bias tensor"),
                             ("lora_only", f"{P}m.base_layer.bias", "trained bias tensor"),
                             ("none", f"{P}head.bias", "skipped 1")):
        d = tmp_path / bias
        os.makedirs(d)
        sio.save(d / "adapter_model.safetensors", {f"{P}m.lora_A.weight": a, f"{P}m.lora_B.weight": b,
                                                   key: np.zeros(16, np.float32)})
        (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "bias": bias}))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert pio.load_peft_adapter(d)["m"].rank == 4
        msgs = [str(x.message) for x in w]
        assert len(msgs) == 1 and match in msgs[0] and key in msgs[0], (bias, msgs)


def test_load_storage_override(tmp_path):
    """storage= sets every module's kernel dtype whatever the file holds (rounded to nearest once,
    as LoRA(..., storage=...) does); "auto" keeps the file's; anything else is a ValueError."""
    rng = np.random.default_rng(7)
    a, b = _ab(rng, 4, 64, 24)
    mag = rng.random(24).astype(np.float32) + 0.5
    bits = lambda x: (x.view(np.uint32) >> 16).astype(np.uint16)  # noqa: E731
    for name, ta, tb, bf16 in (("f", a, b, []), ("bf", bits(a), bits(b), ["A", "B"])):
        d = tmp_path / name
        os.makedirs(d)
        keys = {"A": f"{P}l.lora_A.weight", "B": f"{P}l.lora_B.weight"}
        sio.save(d / "adapter_model.safetensors", {keys["A"]: ta, keys["B"]: tb, f"{P}l.lora_magnitude_vector": mag},
                 bf16=[keys[k] for k in bf16])
        (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_dora": True}))
        auto = pio.load_peft_adapter(d)["l"]
        assert auto.storage == ("float32" if name == "f" else "bfloat16")
        for storage in ("float32", "float16", "bfloat16"):
            ad = pio.load_peft_adapter(d, storage=storage)["l"]
            want = LoRA(auto.A, auto.B, alpha=8, magnitude=mag, storage=storage)
            assert ad.storage == storage and ad.is_dora
            np.testing.assert_array_equal(ad.A, want.A)
            np.testing.assert_array_equal(ad.B, want.B)
            qt = pq.quantize(rng.standard_normal((24, 64)).astype(np.float32), "q4_0")
            x = rng.standard_normal((2, 64)).astype(np.float32)
            assert np.array_equal(pq.matmul(x, qt, lora=ad), pq.matmul(x, qt, lora=want)), (name, storage)
    with pytest.raises(ValueError, match="storage must be"):
        pio.load_peft_adapter(tmp_path / "f", storage="fp8")


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    ads = {"enc.layers.0.q": pq.LoRA(*_ab(rng, 4, 32, 16), 8), "enc.layers.0.k": pq.LoRA(*_ab(rng, 4, 32, 8), 8),
           "enc.layers.1.q": pq.LoRA(*_ab(rng, 2, 32, 16), 8), "dec.q": pq.LoRA(*_ab(rng, 4, 16, 16), 2.5)}
    pio.save_peft_adapter(tmp_path, ads, base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["base_model_name_or_path"] == "tiny"
    assert cfg["rank_pattern"] == {"enc.layers.1.q": 2} and cfg["alpha_pattern"] == {"dec.q": 2.5}
    back = pio.load_peft_adapter(tmp_path)
    assert set(back) == set(ads)
    for m, ad in ads.items():
        np.testing.assert_array_equal(back[m].A, ad.A)
        np.testing.assert_array_equal(back[m].B, ad.B)
        assert (back[m].rank, back[m].alpha, back[m].scale) == (ad.rank, ad.alpha, ad.scale)
    # a module name that is a dotted suffix of another: the plain-name pattern would also match it
    amb = {"a.q": pq.LoRA(*_ab(rng, 2, 8, 8), 2), "q": pq.LoRA(*_ab(rng, 4, 8, 8), 4),
           "b.q": pq.LoRA(*_ab(rng, 4, 8, 8), 4)}
    pio.save_peft_adapter(tmp_path / "amb", amb)
    back = pio.load_peft_adapter(tmp_path / "amb")
    for m, ad in amb.items():
        assert (back[m].rank, back[m].alpha) == (ad.rank, ad.alpha), m
    # DoRA
    d = {"x": pq.LoRA(*_ab(rng, 2, 8, 4), magnitude=np.arange(1, 5, dtype=np.float32))}
    pio.save_peft_adapter(tmp_path / "dora", d)
    back = pio.load_peft_adapter(tmp_path / "dora")["x"]
    assert json.loads((tmp_path / "dora" / "adapter_config.json").read_text())["use_dora"] is True
    np.testing.assert_array_equal(back.magnitude, d["x"].magnitude)


def test_save_rejects(tmp_path):
    rng = np.random.default_rng(3)
    plain = pq.LoRA(*_ab(rng, 2, 8, 4))
    with pytest.raises(ValueError, match="non-empty"):
        pio.save_peft_adapter(tmp_path, {})
    with pytest.raises(TypeError, match="LoRA"):
        pio.save_peft_adapter(tmp_path, {"a": (plain.A, plain.B)})
    with pytest.raises(ValueError, match="rslora"):
        pio.save_peft_adapter(tmp_path, {"a": plain, "b": pq.LoRA(plain.A, plain.B, rslora=True)})
    with pytest.raises(ValueError, match="DoRA"):
        pio.save_peft_adapter(tmp_path, {"a": plain, "b": pq.LoRA(plain.A, plain.B, magnitude=np.ones(4, np.float32))})
    with pytest.raises(ValueError, match="module name"):
        pio.save_peft_adapter(tmp_path, {"a.": plain})


def _bad_dir(tmp_path, tensors, config, name):
    d = tmp_path / name
    _write_peft(d, tensors, config)
    return d


def test_conv_adapters_skipped_and_saved_module_biases_not_lora_biases(tmp_path):
    """A conv adapter (4-D A and B, DoRA magnitude [1, out, 1, 1]) is skipped with a warning, as an
    Embedding's is, so the Linears of a model mixing both load (review: the whole load failed);
    with bias='all' a modules_to_save layer's bias is not named as a LoRA layer's trained bias."""
    rng = np.random.default_rng(8)
    a, b = _ab(rng, 4, 32, 16)
    ca, cb = _ab(rng, 4, 12, 4)
    for dora in (False, True):
        t = {f"{P}fc.lora_A.weight": a, f"{P}fc.lora_B.weight": b, f"{P}conv.lora_A.weight": ca.reshape(4, 4, 3),
             f"{P}conv.lora_B.weight": cb.reshape(4, 4, 1), f"{P}fc.base_layer.bias": np.zeros(16, np.float32),
             f"{P}head.bias": np.zeros(5, np.float32), f"{P}head.weight": np.zeros((5, 16), np.float32)}
        if dora:
            t[f"{P}fc.lora_magnitude_vector"] = np.ones(16, np.float32)
            t[f"{P}conv.lora_magnitude_vector"] = np.ones((1, 4, 1), np.float32)
        d = tmp_path / f"d{dora}"
        _write_peft(d, t, {"r": 4, "lora_alpha": 8, "bias": "all", "use_dora": dora, "modules_to_save": ["head"]})
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ads = pio.load_peft_adapter(d)
        assert list(ads) == ["fc"] and ads["fc"].rank == 4 and (ads["fc"].magnitude is not None) == dora
        bias_msg, skip_msg = [str(x.message) for x in w]
        assert "1 trained bias" in bias_msg and "fc.base_layer.bias" in bias_msg and "head" not in bias_msg
        assert f"skipped {5 if dora else 4} tensor" in skip_msg, skip_msg


def test_load_rejects(tmp_path):
    rng = np.random.default_rng(4)
    a, b = _ab(rng, 4, 8, 6)
    ok = {f"{P}m.lora_A.weight": a, f"{P}m.lora_B.weight": b}
    cases = [
        ({f"{P}m.lora_A.weight": a}, {"r": 4}, "missing lora_B"),
        (ok, {"r": 8}, "rank 4 but the config gives r=8"),
        (ok, {"r": 8, "rank_pattern": {"m": 4}, "use_dora": True}, "magnitude_vector is missing"),
        ({**ok, f"{P}m.lora_magnitude_vector": np.ones(6, np.float32)}, {"r": 4}, "present"),
        ({**ok, f"{P}m.lora_B.bias": np.ones(6, np.float32)}, {"r": 4}, "lora_bias"),
        (ok, {"r": 4, "lora_bias": True}, "lora_bias"),
        (ok, {"r": 4, "peft_type": "IA3"}, "peft_type"),
        (ok, {"r": 4, "use_qalora": True}, "QA-LoRA"),
        (ok, {"r": "4"}, "positive integer"),
        (ok, {"r": 4, "rank_pattern": {"m": "x"}}, "rank_pattern"),
        (ok, {"r": 4, "use_dora": "yes"}, "use_dora"),
        ({f"{P}m.lora_A.weight": a.reshape(4, 8, 1, 1), f"{P}m.lora_B.weight": b.reshape(6, 4, 1, 1)}, {"r": 4},
         "no LoRA weights found"),  # a conv adapter alone: skipped, nothing left
        ({f"{P}m.lora_A.weight": a, f"{P}m.lora_B.weight": b.reshape(6, 4, 1, 1)}, {"r": 4}, "2-D"),
        ({f"{P}m.lora_A.weight": a.astype(np.int32), f"{P}m.lora_B.weight": b}, {"r": 4}, "float"),
        ({f"{P}m.lora_A.weight": a, f"{P}m.lora_B.weight": b[:, :3]}, {"r": 4}, "rank mismatch"),
        ({"other.weight": a}, {"r": 4}, "no LoRA weights"),
        ({f"{P}m.lora_A.weight": np.full_like(a, np.nan), f"{P}m.lora_B.weight": b}, {"r": 4}, "NaN"),
        (ok, {"r": float("inf")}, "positive integer"),
        (ok, {"r": 10 ** 400}, "config gives r="),  # a JSON integer beyond float's range (was OverflowError)
        (ok, {"r": 4, "lora_alpha": float("nan")}, "finite number"),
        (ok, {"r": 4, "rank_pattern": {"m": 2.5}}, "positive integers"),
        (ok, {"r": 4, "alpha_pattern": {"m": float("inf")}}, "finite numbers"),
        # review: an alpha beyond float's range was an OverflowError naming nothing; a U16 tensor
        # (BF16's NumPy type) was read as bf16; features PEFT computes differently loaded as LoRA
        (ok, {"r": 4, "lora_alpha": 10 ** 400}, "lora_alpha must be a finite number"),
        (ok, {"r": 4, "alpha_pattern": {"m": 10 ** 400}}, "finite numbers"),
        ({f"{P}m.lora_A.weight": a.view(np.uint32).astype(np.uint16), f"{P}m.lora_B.weight": b}, {"r": 4},
         "dtype U16 is not a float"),
        (ok, {"r": 4, "alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens is not supported"),
        (ok, {"r": 4, "layer_replication": [[0, 2]]}, "layer_replication is not supported"),
        (ok, {"r": 4, "megatron_config": {"tp": 2}}, "megatron_config is not supported"),
        (ok, {"r": 4, "target_parameters": ["experts.w1"]}, "target_parameters is not supported"),
        # review against peft 0.21: these loaded as plain LoRA and differed from PEFT's outputs
        (ok, {"r": 4, "kasa_config": {"beta": 1e-4, "gamma": 1e-3}}, "kasa_config is not supported"),
        (ok, {"r": 4, "use_bdlora": {"nblocks": 2}}, "use_bdlora is not supported"),
        (ok, {"r": 4, "init_lora_weights": "pissa"}, "residual"),
        (ok, {"r": 4, "init_lora_weights": "pissa_niter_4"}, "residual"),
        (ok, {"r": 4, "init_lora_weights": "olora"}, "residual"),
        (ok, {"r": 4, "init_lora_weights": "corda"}, "residual"),
        # pattern keys whose matching could take exponential time (a hostile config must not hang
        # the loader: "(a+)+" against a 40-character name runs for hours in re)
        (ok, {"r": 4, "rank_pattern": {"(m+)+": 4}}, "repetition inside a repetition"),
        (ok, {"r": 4, "alpha_pattern": {"(a|aa)+b": 2}}, "alternatives inside a repetition"),
        (ok, {"r": 4, "rank_pattern": {r"(\w+)\1": 4}}, "back-reference"),
        (ok, {"r": 4, "rank_pattern": {".*.*.*m": 4}}, "3 variable-length repetitions"),
        (ok, {"r": 4, "rank_pattern": {r"\..{0,999}\..{0,999}\..{0,999}\.x": 4}}, "3 variable-length repetitions"),
        (ok, {"r": 4, "rank_pattern": {"m{99999999999}": 4}}, "usable regular expression"),
        (ok, {"r": 4, "rank_pattern": {"(" * 3000 + ")" * 3000: 4}}, "usable regular expression"),
        # a review: choices in a row, outside any repetition, took minutes (2^K paths); a flag that
        # is legal alone but not inside PEFT's (.*\.)?(KEY)$ escaped as re.error
        (ok, {"r": 4, "rank_pattern": {"(?:.|.)" * 32 + "x": 4}}, "ways to match"),
        (ok, {"r": 4, "alpha_pattern": {r"\.?" * 24 + r"\." * 24 + "x": 2}}, "ways to match"),
        (ok, {"r": 4, "rank_pattern": {"(?i)Q_PROJ": 4}}, "usable regular expression"),
    ]
    for i, (t, cfg, msg) in enumerate(cases):
        d = _bad_dir(tmp_path, t, cfg, f"c{i}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            with pytest.raises(ValueError, match=msg):
                pio.load_peft_adapter(d)
    # initialisations that leave the base weight alone load (PiSSA converted by PEFT saves True)
    for i, init in enumerate((True, False, "gaussian", "eva", "loftq", "mica")):
        d = _bad_dir(tmp_path, ok, {"r": 4, "init_lora_weights": init}, f"init{i}")
        assert pio.load_peft_adapter(d)["m"].rank == 4
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="legacy"):
        pio.load_peft_adapter(d)
    with pytest.raises(FileNotFoundError, match="adapter_config"):
        pio.load_peft_adapter(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):  # a file (was a bare NotADirectoryError)
        pio.load_peft_adapter(d / "adapter_model.bin")
    (d / "adapter_config.json").write_text("{nope")
    with pytest.raises(ValueError, match="JSON"):
        pio.load_peft_adapter(d)


# ----------------------------------------------------------------------------------------- real PEFT
def _peft():
    torch = pytest.importorskip("torch")
    try:
        import peft
    except ImportError as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"peft is not installed ({e}); pip install peft to run the cross-check")
    return torch, peft


def _tiny_model(torch):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(32, 16, bias=False)
            self.v_proj = torch.nn.Linear(32, 24, bias=False)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])
            self.out = torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.out(self.layers[1].q_proj(x))

    torch.manual_seed(0)
    return Tiny()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_cross_check(tmp_path, dora):
    torch, peft = _peft()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                          rank_pattern={"layers.1.q_proj": 2}, alpha_pattern={"v_proj": 3}, use_dora=dora)
    model = peft.get_peft_model(_tiny_model(torch), cfg)
    model.save_pretrained(tmp_path)
    ads = pio.load_peft_adapter(tmp_path)
    names = {f"layers.{i}.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    assert set(ads) == names
    mods = dict(model.base_model.model.named_modules())
    for name, ad in ads.items():
        layer = mods[name]
        want = layer.get_delta_weight("default").detach().double().numpy()
        assert ad.rank == layer.r["default"] and ad.scale == layer.scaling["default"], name
        np.testing.assert_allclose(ad.delta(), want, rtol=1e-5, atol=1e-6)
        if dora:
            mag = layer.lora_magnitude_vector["default"].weight.detach().numpy()
            np.testing.assert_array_equal(ad.magnitude, mag)
    # and back: our writer -> PEFT's loader
    out = tmp_path / "ours"
    pio.save_peft_adapter(out, ads, base_model_name_or_path="tiny")
    loaded = peft.PeftModel.from_pretrained(_tiny_model(torch), str(out))
    lm = dict(loaded.base_model.model.named_modules())
    for name, ad in ads.items():
        layer = lm[name]
        assert layer.r["default"] == ad.rank and layer.scaling["default"] == ad.scale, name
        np.testing.assert_allclose(layer.get_delta_weight("default").detach().numpy(), ad.delta(), rtol=1e-6,
                                   atol=1e-7)


def test_save_anchors_patterns_when_a_name_is_a_suffix_of_another(tmp_path):
    """A top-level q_proj of rank 8 beside layers.N.q_proj of rank 4: PEFT matches a key as
    (.*\\.)?(key)$, so plain or escaped 'q_proj' would also set the blocks' rank; the saved
    pattern is anchored ('^q_proj') instead of refusing the set, and loads back (also in PEFT's
    own matcher when peft is installed)."""
    rng = np.random.default_rng(21)

    def ad(r):
        return pq.LoRA(rng.standard_normal((r, 64)).astype(np.float32), rng.standard_normal((16, r)).astype(np.float32),
                       alpha=16)

    ads = {"q_proj": ad(8), "layers.0.q_proj": ad(4), "layers.1.q_proj": ad(4)}
    pio.save_peft_adapter(tmp_path, ads)
    back = pio.load_peft_adapter(tmp_path)
    assert {k: v.rank for k, v in back.items()} == {k: v.rank for k, v in ads.items()}
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"^q_proj": 8}
    try:
        from peft.tuners.tuners_utils import get_pattern_key
    except ImportError:
        return
    assert {m: cfg["rank_pattern"].get(get_pattern_key(cfg["rank_pattern"].keys(), m), cfg["r"]) for m in ads} == \
        {k: v.rank for k, v in ads.items()}


def test_save_takes_a_path_base_and_never_half_writes(tmp_path):
    """base_model_name_or_path as a pathlib.Path failed inside json.dump, after the weights were
    replaced and with the config half written: the adapter directory no longer loaded."""
    import pathlib

    rng = np.random.default_rng(0)
    ads = {"q": pq.LoRA(rng.standard_normal((4, 64)).astype(np.float32),
                        rng.standard_normal((32, 4)).astype(np.float32), alpha=8)}
    pio.save_peft_adapter(tmp_path, ads, base_model_name_or_path=pathlib.Path("/models/base"))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "/models/base"
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = {"q": pq.LoRA(np.ones((4, 64), np.float32), np.ones((32, 4), np.float32), alpha=8)}
    with pytest.raises(TypeError, match="base_model_name_or_path"):
        pio.save_peft_adapter(tmp_path, other, base_model_name_or_path=object())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    pio.load_peft_adapter(tmp_path)


def test_dora_adapter_with_an_embedding_loads_its_linears(tmp_path):
    """PEFT DoRA on an Embedding writes lora_embedding_A / B (skipped, not Linear weights) and a
    lora_magnitude_vector, which was taken for a Linear missing lora_A: the whole load failed."""
    rng = np.random.default_rng(0)

    def f(*s):
        return rng.standard_normal(s).astype(np.float32)

    pq.io.safetensors.save(tmp_path / "adapter_model.safetensors",
                           {"base_model.model.emb.lora_embedding_A": f(4, 100), "base_model.model.emb.lora_embedding_B": f(64, 4),
             "base_model.model.emb.lora_magnitude_vector": np.abs(f(64)),
             "base_model.model.proj.lora_A.weight": f(4, 64), "base_model.model.proj.lora_B.weight": f(32, 4),
             "base_model.model.proj.lora_magnitude_vector": np.abs(f(32))})
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                              "use_dora": True, "target_modules": ["emb", "proj"]}))
    with pytest.warns(UserWarning, match="skipped 3"):
        ads = pio.load_peft_adapter(tmp_path)
    assert list(ads) == ["proj"] and ads["proj"].is_dora

