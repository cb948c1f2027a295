"""Tensor-at-a-time I/O behind `pyqkern quantize`: safetensors StreamWriter, the QTensor-layout
stream writer, the per-tensor shard reader, and the peak memory of the command."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import pyqkern as pq
from pyqkern.io import _stream, qsave, safetensors as st


def _arrays(rng):
    bf = rng.standard_normal((3, 5)).astype(np.float32)
    return {
        "w": rng.standard_normal((4, 6)).astype(np.float32),
        "h": rng.standard_normal((2, 3)).astype(np.float16),
        "d": rng.standard_normal(3),
        "i": np.arange(5, dtype=np.int64),
        "u": np.arange(7, dtype=np.uint8),
        "b": np.array([True, False]),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "bf": (bf.view(np.uint32) >> 16).astype(np.uint16),
        "big_endian": np.arange(4, dtype=">i4"),
    }


def _spec(name, a):
    dtn = "BF16" if name == "bf" else st._dtype_name(a, name, set())
    return name, dtn, a.shape


@pytest.mark.parametrize("order", ["declared", "reversed"])
def test_stream_writer_matches_save(tmp_path, order):
    t = _arrays(np.random.default_rng(0))
    meta = {"a": "1", "z": "ü"}
    st.save(tmp_path / "ref.safetensors", t, meta, bf16=["bf"])
    names = list(t) if order == "declared" else list(t)[::-1]
    with st.StreamWriter(tmp_path / "s.safetensors", [_spec(n, t[n]) for n in t], meta) as w:
        for n in names:
            w.write(n, t[n])
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    got, m = st.load(tmp_path / "s.safetensors", bf16="bits")
    assert m == meta and all(np.array_equal(got[n], t[n]) for n in t)


def test_stream_writer_drop_and_new_metadata(tmp_path):
    t = _arrays(np.random.default_rng(1))
    w = st.StreamWriter(tmp_path / "s.safetensors", [_spec(n, t[n]) for n in t], {"x": "1"})
    for n in t:
        if n not in ("d", "i"):
            w.write(n, t[n])
    w.drop("d")
    w.drop("i")
    w.finish(metadata={"y": "2"})
    keep = {n: a for n, a in t.items() if n not in ("d", "i")}
    st.save(tmp_path / "ref.safetensors", keep, {"y": "2"}, bf16=["bf"])
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_stream_writer_errors(tmp_path):
    p = tmp_path / "s.safetensors"
    specs = [("a", "F32", (2, 3)), ("b", "BF16", (4,))]
    w = st.StreamWriter(p, specs)
    with pytest.raises(TypeError, match="declared F32"):
        w.write("a", np.zeros((2, 3), np.float64))
    with pytest.raises(ValueError, match="declared shape"):
        w.write("a", np.zeros((3, 2), np.float32))
    with pytest.raises(TypeError, match="declared BF16"):
        w.write("b", np.zeros(4, np.int16))
    with pytest.raises(ValueError, match="not declared"):
        w.write("c", np.zeros(1, np.float32))
    w.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="already written"):
        w.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="already written"):
        w.drop("a")
    with pytest.raises(ValueError, match="1 declared tensor"):
        w.finish()
    assert not p.exists() and not os.listdir(tmp_path)  # the temporary file is gone too
    with pytest.raises(ValueError, match="declared twice"):
        st.StreamWriter(p, [("a", "F32", (1,)), ("a", "F32", (1,))])
    with pytest.raises(ValueError, match="unknown dtype"):
        st.StreamWriter(p, [("a", "F8", (1,))])
    with pytest.raises(ValueError, match="non-negative"):
        st.StreamWriter(p, [("a", "F32", (-1,))])
    with pytest.raises(ValueError, match="reserved"):
        st.StreamWriter(p, [("__metadata__", "F32", (1,))])
    with pytest.raises(TypeError, match="metadata"):
        st.StreamWriter(p, [("a", "F32", (1,))], {"a": 1})
    with pytest.raises(RuntimeError):  # an exception inside the with block removes the file
        with st.StreamWriter(p, [("a", "F32", (1,))]) as w:
            w.write("a", np.ones(1, np.float32))
            raise RuntimeError("boom")
    assert not os.listdir(tmp_path)


def test_qsave_stream_writer_perm_planned(tmp_path):
    rng = np.random.default_rng(2)
    w1, w2 = rng.standard_normal((2, 4, 64)).astype(np.float32)
    perm = rng.permutation(64)
    q1 = pq.quantize(w1[:, perm], "int4", group=32).with_perm(perm)  # carries its permutation
    q2 = pq.quantize(w2, "int4", group=32)  # planned with a permutation, turns out without
    bias = np.ones(4, np.float32)
    params = q1.params
    plan = [("q", "l1", "int4", (4, 64), params, True), ("a", "bias", "F32", (4,)),
            ("q", "l2", "int4", (4, 64), params, True)]
    w = _stream.QSaveStreamWriter(tmp_path / "s.safetensors", plan, {"m": "1"})
    w.write_qtensor("l2", q2)
    w.write_array("bias", bias)
    w.write_qtensor("l1", q1)
    w.finish()
    pq.io.save(tmp_path / "ref.safetensors", {"l1": q1, "bias": bias, "l2": q2}, {"m": "1"})
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    got, meta = pq.io.load(tmp_path / "s.safetensors")
    assert got["l1"] == q1 and got["l2"] == q2 and meta == {"m": "1"}
    # misuse
    w = _stream.QSaveStreamWriter(tmp_path / "t.safetensors", [("q", "l", "int4", (4, 64), params, False)])
    with pytest.raises(ValueError, match="not planned"):
        w.write_qtensor("l", q1)
    with pytest.raises(ValueError, match="planned int4"):
        w.write_qtensor("l", pq.quantize(w1, "q4_0"))
    with pytest.raises(ValueError, match="planned as a QTensor"):
        w.write_array("l", bias)
    w.abort()
    with pytest.raises(ValueError, match="reserved"):
        _stream.QSaveStreamWriter(tmp_path / "t.safetensors", [("a", "x" + qsave.PERM_SUFFIX, "F32", (1,))])
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_shard_reader(tmp_path):
    t = _arrays(np.random.default_rng(3))
    p = tmp_path / "a.safetensors"
    st.save(p, t, bf16=["bf"])
    ref = st.load(p, bf16="bits")[0]
    with _stream.ShardReader(p) as r:
        for name in reversed(list(r.entries)):
            a = r.read(name)
            assert a.flags.writeable and a.dtype == ref[name].dtype and np.array_equal(a, ref[name]), name
    # a file cut after its header was validated: a clean error at the read
    r = _stream.ShardReader(p)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 30)
    last = max(r.entries, key=lambda n: r.entries[n]["data_offsets"][1])
    with pytest.raises(ValueError, match="file ends"):
        r.read(last)
    r.close()
    with pytest.raises(ValueError):
        _stream.ShardReader(p)  # now the header check refuses it


_PEAK = r'''
import io, json, os, sys
import numpy as np
from pyqkern.__main__ import quantize_files
from pyqkern.io import safetensors as st

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

def reset_peak():  # VmHWM := VmRSS (Linux >= 4.0); without it VmHWM is still an upper bound of the peak
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

src, dst, fmt = sys.argv[1:4]
if fmt == "whole":  # what holding the model costs, measured the same way
    reset_peak()
    base = status("VmRSS")
    whole = {k: np.array(v) for k, v in st.load(src)[0].items()}
else:
    group = 128 if fmt == "int4" else None
    tiny = dst + ".tiny.safetensors"
    st.save(tiny, {"w": np.ones((4, 256), np.float32)})
    quantize_files(tiny, dst, fmt, group=group, quiet=True, out=io.StringIO())  # warm-up: libraries loaded
    os.remove(tiny)
    reset_peak()
    base = status("VmRSS")
    quantize_files(src, dst, fmt, group=group, quiet=True, out=io.StringIO())
print(json.dumps(status("VmHWM") - base))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_quantize_peak_memory_is_one_tensor(tmp_path):
    """8 tensors of 16 MB: the command's peak resident memory grows by well under 3 tensors' worth
    (the model is 8), measured in a fresh process per run; the same measurement sees a whole-model load."""
    rng = np.random.default_rng(0)
    specs = [(f"layers.{i}.weight", "F32", (1024, 4096)) for i in range(8)]
    src = tmp_path / "big.safetensors"
    with st.StreamWriter(src, specs) as w:
        for name, _, shape in specs:
            w.write(name, rng.standard_normal(shape, dtype=np.float32))
    tensor = 1024 * 4096 * 4
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(pq.__file__)))
    res = {}
    for fmt, dst in (("q4_0", "o.gguf"), ("int4", "o.safetensors"), ("whole", "-")):
        r = subprocess.run([sys.executable, "-c", _PEAK, str(src), str(tmp_path / dst), fmt], capture_output=True,
                           text=True, env=env, check=False, timeout=300, cwd=str(tmp_path))  # not the source tree
        assert r.returncode == 0, r.stderr
        res[fmt] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"peak extra resident memory (MB): {({k: round(v / 2**20, 1) for k, v in res.items()})}, one tensor "
          f"{tensor / 2**20:.0f} MB")
    assert res["whole"] > 6 * tensor, res  # the measurement can see a model-sized allocation
    assert res["q4_0"] < 3 * tensor, res
    assert res["int4"] < 3 * tensor, res
    got, _ = pq.io.load(tmp_path / "o.safetensors")
    assert len(got) == 8 and got["layers.7.weight"].format == "int4"
    assert len(pq.io.load_gguf(tmp_path / "o.gguf")[0]) == 8
