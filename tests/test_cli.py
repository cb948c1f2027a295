"""`pyqkern quantize` and `pyqkern inspect` (pyqkern/__main__.py)."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import pyqkern as pq
from pyqkern.__main__ import inspect_file, main, quantize_files
from pyqkern.io import safetensors as st

gguf = pytest.importorskip("gguf")


def _model(rng):
    bf = rng.standard_normal((4, 64)).astype(np.float32)
    return {
        "layers.0.q.weight": rng.standard_normal((8, 256)).astype(np.float32),
        "layers.0.k.weight": rng.standard_normal((4, 256)).astype(np.float16),
        "layers.0.norm.weight": np.ones(256, np.float32),
        "embed.weight": rng.standard_normal((6, 256)).astype(np.float32),
        "odd.weight": rng.standard_normal((3, 40)).astype(np.float32),
        "bf.weight": (bf.view(np.uint32) >> 16).astype(np.uint16),
        "ids": np.arange(5, dtype=np.int64),
    }


@pytest.fixture
def model(tmp_path):
    t = _model(np.random.default_rng(0))
    p = tmp_path / "model.safetensors"
    st.save(p, t, {"format": "pt"}, bf16=["bf.weight"])
    return p, st.load(p)[0]


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_quantize_to_gguf(tmp_path, model, fmt):
    src, ref = model
    dst = tmp_path / "out.gguf"
    out, err = io.StringIO(), io.StringIO()
    s = quantize_files(str(src), str(dst), fmt, exclude=r"^embed\.", out=out, err=err)
    text, prog = out.getvalue(), err.getvalue()
    assert s["quantized"] == 3 and s["kept"] == 4  # q, k, bf; kept: norm (1-D), embed (excluded), odd, ids
    assert "embed.weight [6, 256] F32 kept (excluded)" in prog and "mean relative error" in text
    assert prog.count("\n[") + prog.startswith("[") == 7  # one progress line per tensor (stderr is no tty)
    # the summary table: one row per tensor, then the totals
    row = next(ln for ln in text.splitlines() if ln.startswith("layers.0.q.weight"))
    assert row.split()[-3:-1] == ["8192", str(pq.quantize(ref["layers.0.q.weight"], fmt).nbytes)]
    assert "kept (excluded)" in next(ln for ln in text.splitlines() if ln.startswith("embed.weight"))
    tot = next(ln for ln in text.splitlines() if ln.startswith("total")).split()
    assert tot[1:4] == ["7", str(s["bytes_before"]), str(s["bytes_after"])]
    assert s["bytes_before"] == sum(a.nbytes for a in ref.values()) - ref["bf.weight"].nbytes // 2  # bf16 on disk
    # byte-identical to the in-memory writer given the same tensors
    expect = {k: (pq.quantize(v, fmt) if k in ("layers.0.q.weight", "layers.0.k.weight", "bf.weight") else v)
              for k, v in ref.items()}
    order = list(st.read_header(src)[0])
    pq.io.save_gguf(tmp_path / "ref.gguf", {k: expect[k] for k in order}, {"format": "pt"})
    assert dst.read_bytes() == (tmp_path / "ref.gguf").read_bytes()
    got, meta = pq.io.load_gguf(dst)
    assert meta["format"] == "pt"
    for name in ("layers.0.q.weight", "layers.0.k.weight", "bf.weight"):
        assert got[name] == pq.quantize(ref[name], fmt), name
    np.testing.assert_array_equal(got["embed.weight"], ref["embed.weight"])
    np.testing.assert_array_equal(got["odd.weight"], ref["odd.weight"])
    np.testing.assert_array_equal(got["ids"], ref["ids"])
    assert 0 < s["mean_rel_err"] < 0.2 and s["bytes_after"] < s["bytes_before"]
    r = gguf.GGUFReader(dst)
    assert {t.name for t in r.tensors} == set(ref)


def test_quantize_to_safetensors_and_inspect(tmp_path, model):
    src, ref = model
    dst = tmp_path / "out.safetensors"
    s = quantize_files(str(src), str(dst), "int4", group=32, sym=True, min_size=1100, out=io.StringIO())
    assert (s["quantized"], s["kept"]) == (2, 5)  # q (2048), embed (1536); k (1024) and bf (256) below 1100
    got, meta = pq.io.load(dst)
    assert meta == {"format": "pt"}
    for name in ("layers.0.q.weight", "embed.weight"):
        assert got[name] == pq.quantize(ref[name], "int4", group=32, sym=True)
    # byte-identical to pyqkern.io.save of the same tensors (the kept BF16 one as bf16 bits)
    raw = st.load(src, bf16="bits")[0]
    expect = {k: (pq.quantize(v, "int4", group=32, sym=True) if k in ("layers.0.q.weight", "embed.weight") else v)
              for k, v in raw.items()}
    pq.io.save(tmp_path / "ref.safetensors", expect, {"format": "pt"}, bf16=["bf.weight"])
    assert dst.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert isinstance(got["layers.0.k.weight"], np.ndarray) and got["layers.0.k.weight"].dtype == np.float16
    # the BF16 tensor is kept as BF16 (both loads return bf16 as an exact float32 copy)
    assert st.read_header(dst)[0]["bf.weight"]["dtype"] == "BF16"
    np.testing.assert_array_equal(got["bf.weight"], ref["bf.weight"])
    out = io.StringIO()
    rows = inspect_file(str(dst), out=out)
    by = {r[0]: r for r in rows}
    assert by["layers.0.q.weight"][1] == "int4(group=32,sym=1)" and by["layers.0.q.weight"][2] == [8, 256]
    assert by["layers.0.q.weight"][3] == pytest.approx(4.5)
    assert by["ids"][1] == "I64" and by["ids"][3] == 64
    assert "pyqkern QTensors" in out.getvalue()


def _all_fit(fmt):
    """A shard set whose 2-D weights every format can take (K = 512), plus pass-through tensors."""
    rng = np.random.default_rng(7)
    bf = rng.standard_normal((3, 512)).astype(np.float32)
    a = {"a.weight": rng.standard_normal((5, 512)).astype(np.float32), "a.bias": np.zeros(5, np.float32),
         "h.weight": rng.standard_normal((2, 512)).astype(np.float16)}
    b = {"b.weight": (bf.view(np.uint32) >> 16).astype(np.uint16), "pos": np.arange(7, dtype=np.int32)}
    return a, b


@pytest.mark.parametrize("fmt", sorted(pq._formats.FORMATS))
def test_streamed_output_is_byte_identical(tmp_path, fmt):
    a, b = _all_fit(fmt)
    d = tmp_path / "in"
    d.mkdir()
    st.save(d / "m-1.safetensors", a, {"k": "v"})
    st.save(d / "m-2.safetensors", b, {"k2": "v2"}, bf16=["b.weight"])
    names = ("a.weight", "h.weight", "b.weight")
    raw = {**a, **b}
    order = list(st.read_header(d / "m-1.safetensors")[0]) + list(st.read_header(d / "m-2.safetensors")[0])
    expect = {k: (pq.quantize(raw[k], fmt) if k in names else raw[k]) for k in order}
    s = quantize_files(str(d), str(tmp_path / "o.safetensors"), fmt, out=io.StringIO(), quiet=True)
    assert (s["quantized"], s["kept"]) == (3, 2)
    pq.io.save(tmp_path / "ref.safetensors", expect, {"k": "v", "k2": "v2"})
    assert (tmp_path / "o.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    if fmt in pq.io.gguf.GGML_TYPES:
        quantize_files(str(d), str(tmp_path / "o.gguf"), fmt, out=io.StringIO(), quiet=True)
        expect["b.weight"] = (b["b.weight"].astype(np.uint32) << 16).view(np.float32)
        expect["b.weight"] = pq.quantize(expect["b.weight"], fmt)
        pq.io.save_gguf(tmp_path / "ref.gguf", expect, {"k": "v", "k2": "v2"})
        assert (tmp_path / "o.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_lines_and_quiet(tmp_path, model, monkeypatch):
    src, _ = model
    pytest.importorskip("tqdm")
    out, err = io.StringIO(), _TTY()
    quantize_files(str(src), str(tmp_path / "o.gguf"), "q4_0", out=out, err=err)
    assert "quantize" in err.getvalue() and "7/7" in err.getvalue() and "tensor" in err.getvalue()
    assert "\n[1/7]" not in "\n" + err.getvalue()  # a bar, not lines
    # without tqdm: one line per tensor on the terminal too
    monkeypatch.setitem(sys.modules, "tqdm", None)
    err = _TTY()
    quantize_files(str(src), str(tmp_path / "o.gguf"), "q4_0", out=io.StringIO(), err=err)
    lines = err.getvalue().splitlines()
    assert len(lines) == 7 and lines[0].startswith("[1/7] ") and lines[-1].startswith("[7/7] ")
    # --quiet: nothing on stderr, only the totals on stdout
    out, err = io.StringIO(), _TTY()
    s = quantize_files(str(src), str(tmp_path / "o.gguf"), "q4_0", out=out, err=err, quiet=True)
    assert err.getvalue() == ""
    assert "layers.0.q.weight" not in out.getvalue() and "total" in out.getvalue() and s["quantized"] == 4
    assert len(s["tensors"]) == 7 and {r["name"] for r in s["tensors"]} == set(st.read_header(src)[0])


def test_quantize_min_size_counts(tmp_path, model):
    src, _ = model
    s = quantize_files(str(src), str(tmp_path / "o.safetensors"), "nf4", min_size=1100, out=io.StringIO())
    # nf4 group 64: q (8x256=2048), embed (1536) quantized; k (1024) and bf (256) below min-size
    assert (s["quantized"], s["kept"]) == (2, 5)


def test_quantize_shards_dir_and_inspect_gguf(tmp_path, capsys):
    rng = np.random.default_rng(1)
    d = tmp_path / "shards"
    d.mkdir()
    a = {"a.weight": rng.standard_normal((4, 256)).astype(np.float32), "a.bias": np.zeros(4, np.float32)}
    b = {"b.weight": rng.standard_normal((2, 512)).astype(np.float32)}
    st.save(d / "model-00001-of-00002.safetensors", a)
    st.save(d / "model-00002-of-00002.safetensors", b)
    (d / "config.json").write_text("{}")
    dst = tmp_path / "m.gguf"
    assert main(["quantize", str(d), str(dst), "--format", "q4_k"]) == 0
    got, _ = pq.io.load_gguf(dst)
    assert got["a.weight"] == pq.quantize(a["a.weight"], "q4_k")
    assert got["b.weight"] == pq.quantize(b["b.weight"], "q4_k")
    assert main(["inspect", str(dst)]) == 0
    text = capsys.readouterr().out
    assert "q4_k" in text and "[2, 512]" in text and "4.500" in text and "GGUF, 3 tensors" in text
    # the same through the real command line
    r = subprocess.run([sys.executable, "-m", "pyqkern", "inspect", str(dst)], capture_output=True, text=True, check=False,
                       env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(pq.__file__))),
                       cwd=str(tmp_path))  # -m puts the cwd first on sys.path: not the source tree
    assert r.returncode == 0 and "a.weight" in r.stdout


def test_quantize_errors(tmp_path, model, capsys):
    src, _ = model
    (tmp_path / "fifo").mkdir()  # apart: tmp_path itself is quantized as a directory of shards below
    fifo = tmp_path / "fifo" / "pipe.safetensors"
    os.mkfifo(fifo)
    cases = [
        (["quantize", str(src), str(tmp_path / "o.gguf"), "--format", "nf4"], "not a ggml format"),
        (["quantize", str(src), str(tmp_path / "o.bin"), "--format", "q4_0"], ".gguf or .safetensors"),
        (["quantize", str(tmp_path / "none.safetensors"), str(tmp_path / "o.gguf"), "--format", "q4_0"], "no such"),
        # a FIFO or a directory is there but no file to read (a review: "no such file")
        (["quantize", str(fifo), str(tmp_path / "o.gguf"), "--format", "q4_0"], "not a regular file"),
        (["quantize", str(src), str(tmp_path / "o.safetensors"), "--format", "int4", "--gptq", "--calib",
          str(tmp_path / "fifo")], "not a regular file"),
        (["quantize", str(tmp_path), str(tmp_path / "o.gguf"), "--format", "q4_0"], None),  # dir has model only: ok
        (["quantize", str(src), str(tmp_path / "o.gguf"), "--format", "q9"], "unknown format"),
        (["quantize", str(src), str(tmp_path / "o.safetensors"), "--format", "int4", "--group", "3"], "group"),
        (["quantize", str(src), str(tmp_path / "o.gguf"), "--format", "q4_0", "--exclude", "("],
         "--exclude '(' is not a regular expression"),
        (["inspect", str(tmp_path / "x.txt")], ".gguf and .safetensors"),
    ]
    for argv, msg in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        if msg is None:
            assert rc == 0
        else:
            assert rc == 1 and msg in err, (argv, err)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["quantize", str(empty), str(tmp_path / "o.gguf"), "--format", "q4_0"]) == 1
    assert "no *.safetensors" in capsys.readouterr().err
    # a u8 tensor cannot go to GGUF: refused before anything is written
    st.save(tmp_path / "u8.safetensors", {"x": np.zeros(3, np.uint8)})
    assert main(["quantize", str(tmp_path / "u8.safetensors"), str(tmp_path / "u8.gguf"), "--format", "q4_0"]) == 1
    assert "U8" in capsys.readouterr().err and not (tmp_path / "u8.gguf").exists()
    # corrupt input: clean error
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    assert main(["quantize", str(bad), str(tmp_path / "b.gguf"), "--format", "q4_0"]) == 1
    assert main(["inspect", str(bad)]) == 1
    trunc = tmp_path / "t.gguf"
    pq.io.save_gguf(trunc, {"w": pq.quantize(np.ones((2, 64), np.float32), "q4_0")})
    trunc.write_bytes(trunc.read_bytes()[:100])
    assert main(["inspect", str(trunc)]) == 1
    assert "truncated" in capsys.readouterr().err
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_quantize_refuses_names_and_paths_up_front(tmp_path, model, capsys):
    """Review: a safetensors tensor with an empty name, or one longer than ggml's 63 bytes, went
    into the GGUF (llama.cpp refuses such a file); the input as the output replaced the float
    model; a directory as the output failed only at the final rename; a damaged shard's error
    did not name the file."""
    src, _ = model
    w = np.ones((64, 64), np.float32)
    for name, msg in (("", "non-empty"), ("m." + "x" * 62, "at most 63")):
        f = tmp_path / "n.safetensors"  # written by hand: st.save refuses an empty name itself
        hdr = json.dumps({name: {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, w.nbytes]}}).encode()
        f.write_bytes(struct.pack("<Q", len(hdr)) + hdr + w.tobytes())
        assert main(["quantize", str(f), str(tmp_path / "n.gguf"), "--format", "q4_0", "-q"]) == 1
        assert msg in capsys.readouterr().err and not (tmp_path / "n.gguf").exists()
    st.save(tmp_path / "u.safetensors", {"blk.ü." + "x" * 55: w})  # 63 bytes in UTF-8: fine
    assert main(["quantize", str(tmp_path / "u.safetensors"), str(tmp_path / "u.gguf"), "--format", "q4_0", "-q"]) == 0
    before = src.read_bytes()
    assert main(["quantize", str(src), str(src), "--format", "q4_0", "-q"]) == 1
    assert "is the input" in capsys.readouterr().err and src.read_bytes() == before
    (tmp_path / "d.gguf").mkdir()
    assert main(["quantize", str(src), str(tmp_path / "d.gguf"), "--format", "q4_0", "-q"]) == 1
    assert "is a directory" in capsys.readouterr().err
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(src.read_bytes()[:-10])
    assert main(["quantize", str(cut), str(tmp_path / "c.gguf"), "--format", "q4_0", "-q"]) == 1
    assert str(cut) in capsys.readouterr().err


def test_quantize_safetensors_metadata_strings_to_gguf(tmp_path):
    """safetensors metadata values are strings: general.alignment given as a decimal string is
    written as GGUF's uint32; an empty architecture is refused (gguf-py dropped it, leaving a file
    without general.architecture). The input's quantization_version describes its own tensors: the
    output gets ggml's (a review: "9" in the input's metadata overrode it)."""
    gguf = pytest.importorskip("gguf")
    w = np.ones((64, 64), np.float32)
    f = tmp_path / "m.safetensors"
    st.save(f, {"w": w}, metadata={"general.alignment": "64", "general.quantization_version": "9"})
    quantize_files(str(f), str(tmp_path / "m.gguf"), "q4_0", out=io.StringIO(), quiet=True)
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    for key in ("general.alignment", "general.quantization_version"):
        fld = r.fields[key]
        assert fld.types == [gguf.GGUFValueType.UINT32]
    assert int(r.fields["general.alignment"].parts[-1][0]) == 64
    assert int(r.fields["general.quantization_version"].parts[-1][0]) == gguf.GGML_QUANT_VERSION
    for meta, msg in (({"general.architecture": ""}, "non-empty"), ({"general.alignment": "six"}, "power of two")):
        st.save(f, {"w": w}, metadata=meta)
        with pytest.raises(ValueError, match=msg):
            quantize_files(str(f), str(tmp_path / "e.gguf"), "q4_0", out=io.StringIO(), quiet=True)
        assert not (tmp_path / "e.gguf").exists()


def test_bench_rows_and_roofline_plot(tmp_path):
    import io as _io

    from pyqkern.__main__ import bench, plot_roofline

    out = _io.StringIO()
    rows = bench(True, [1], ["q4_0", "int4"], shapes=[(1, 256, 128), (16, 256, 128)], out=out)
    assert len(rows) == 2 * 2 * 2  # shapes x formats x computes
    for r in rows:
        assert r["time_s"] > 0 and r["gflops"] > 0 and r["max_rel_err"] < 0.05
    assert "q4_0" in out.getvalue() and "GFLOP/s" in out.getvalue()
    # 0 threads = one per CPU, as set_num_threads (the bandwidth probe used to split its buffer in 0)
    rows0 = bench(True, [0], ["q4_0"], shapes=[(1, 256, 128)], out=_io.StringIO())
    assert {r["threads"] for r in rows0} == {os.cpu_count() or 1}
    # GB/s count the bytes the kernel reads: int8 reads the packed copy (q6_k: 8-bit codes, 1.31x
    # its QTensor, which the rows used to count); numpy's baseline runs at the row's thread count
    from pyqkern._matmul import streamed_weight_bytes

    rows6 = bench(True, [1, 2], ["q6_k"], shapes=[(32, 256, 128)], out=_io.StringIO())
    qt = pq.quantize(np.ones((128, 256), np.float32), "q6_k")
    packed = pq.QLinear(qt).packed_nbytes
    assert packed > 1.25 * qt.nbytes
    assert [r["weight_bytes"] for r in rows6 if r["compute"] == "int8"] == [packed, packed]
    assert [r["weight_bytes"] for r in rows6 if r["compute"] == "float"] == [qt.nbytes, qt.nbytes]
    assert streamed_weight_bytes(qt, "float", 32) == qt.nbytes and streamed_weight_bytes(qt, "int8", 1) == packed
    if importlib.util.find_spec("threadpoolctl"):  # numpy's best at 1 up to the row's count (a review)
        assert all(1 <= r["numpy_threads"] <= r["threads"] for r in rows6)
        assert [r["numpy_threads"] for r in rows6 if r["threads"] == 1] == [1, 1]
    # a roofline capped by the measured peak: the int8 dot product's for int8 rows, the fp32 FMA's
    # for float rows (none where the variant has no probe)
    for r in rows6:
        peak = r["int8_hw_peak_gops"] if r["compute"] == "int8" else r["fma_hw_peak_gflops"]
        if peak:
            assert 0 < r["roof_gflops"] <= peak
            assert r["pct_roof"] == pytest.approx(100 * r["gflops"] / r["roof_gflops"])
            key = "pct_int8_hw_peak" if r["compute"] == "int8" else "pct_fma_hw_peak"
            assert r[key] == pytest.approx(100 * r["gflops"] / peak)
        else:
            assert r["roof_gflops"] is None and r["pct_roof"] is None
    if pq.info()["active_variant"] != "ref":
        assert all(r["fma_hw_peak_gflops"] for r in rows6)
        assert r["speedup_vs_numpy"] == pytest.approx(r["numpy_time_s"] / r["time_s"])
    before = pq.get_num_threads()  # the rows' set_num_threads is undone (it was left at the last row's)
    bench(True, [1 if before != 1 else 2], ["q4_0"], shapes=[(1, 256, 128)], out=_io.StringIO())
    assert pq.get_num_threads() == before
    pytest.importorskip("matplotlib")
    png = tmp_path / "roof.png"
    plot_roofline(rows, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bench_arguments_fail_before_the_run(tmp_path, capsys):
    """an unknown format or an unwritable --json ended in a traceback (the latter after the run)"""
    assert main(["bench", "--quick", "--threads", "1", "--formats", "bogus"]) == 1
    assert "unknown format" in capsys.readouterr().err
    assert main(["bench", "--quick", "--threads", "1", "--formats", "q4_0",
                 "--json", str(tmp_path / "no" / "rows.json")]) == 1
    assert "--json" in capsys.readouterr().err
    assert main(["bench", "--quick", "--threads", "1", "--formats", "bogus", "--json", str(tmp_path / "r.json")]) == 1
    assert not (tmp_path / "r.json").exists()
    # a review: --json was opened (emptied) before the run and deleted on any error, an existing
    # file with it; --json and --plot naming one file gave a corrupt file and status 0; a --plot
    # type matplotlib cannot write, or a directory, failed only after the run
    keep = tmp_path / "keep.json"
    keep.write_text("precious")
    for extra in (["--formats", "bogus"], ["--threads", "5000"]):
        assert main(["bench", "--quick", "--json", str(keep), *extra]) == 1
        assert keep.read_text() == "precious" and not list(tmp_path.glob("keep.json.tmp*"))
    capsys.readouterr()
    same = tmp_path / "same.png"
    assert main(["bench", "--quick", "--json", str(same), "--plot", str(same)]) == 1
    assert "same file" in capsys.readouterr().err and not same.exists()
    pytest.importorskip("matplotlib")
    for bad in (tmp_path / "r.txt", tmp_path):
        assert main(["bench", "--quick", "--plot", str(bad)]) == 1
        assert "--plot" in capsys.readouterr().err
    assert not (tmp_path / "r.txt").exists()


def test_calib_max_length_only_with_text_calibration(tmp_path):
    src = tmp_path / "m.safetensors"
    st.save(src, {"l.weight": np.ones((4, 64), np.float32)})
    np.save(tmp_path / "a.npy", np.ones((8, 64), np.float32))
    with pytest.raises(ValueError, match="--gptq only"):
        quantize_files(str(src), str(tmp_path / "o.gguf"), "q4_0", calib_max_length=-5, quiet=True)
    with pytest.raises(ValueError, match=".txt"):
        quantize_files(str(src), str(tmp_path / "o.gguf"), "q4_0", gptq=True, calib=str(tmp_path / "a.npy"),
                       calib_max_length=64, quiet=True)


def test_fortran_npy_calibration_declaring_more_than_it_holds(tmp_path):
    """a small Fortran-order .npy declaring (2**34, 64) made the reader allocate 4 TiB up front"""
    src = tmp_path / "m.safetensors"
    st.save(src, {"l.weight": np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)})
    hdr = {"descr": "<f4", "fortran_order": True, "shape": (2 ** 34, 64)}
    with open(tmp_path / "acts.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, hdr)
        f.write(np.ones(1024, np.float32).tobytes())
    with pytest.raises(ValueError, match="data ends"):
        quantize_files(str(src), str(tmp_path / "o.gguf"), "q4_0", gptq=True, calib=str(tmp_path / "acts.npy"),
                       quiet=True)



def test_quantize_error_path_closes_its_input(tmp_path):
    """Review: a failing quantize left the input file open for as long as the exception's
    traceback lived (the shard reader was closed only on success)."""
    w = np.ones((64, 64), np.float32)
    w[3, 5] = np.nan
    f = tmp_path / "nan.safetensors"
    st.save(f, {"w": w})
    with pytest.raises(ValueError, match="NaN") as ei:
        quantize_files(str(f), str(tmp_path / "o.gguf"), "q4_0", out=io.StringIO(), quiet=True)
    assert ei.value is not None  # the traceback is alive here
    fds = "/proc/self/fd"
    if os.path.isdir(fds):
        open_paths = {os.path.realpath(os.path.join(fds, d)) for d in os.listdir(fds)}
        assert os.path.realpath(f) not in open_paths


def test_inspect_checks_what_load_checks(tmp_path, capsys):
    """Review: inspect listed QTensor entries that load refuses (a shape of 10^30 rows over a few
    bytes at 0 bits a weight, an entry without its tensor skipped in the count); the pyqkern
    metadata JSON took the last of two equal keys."""
    import json as _json

    from pyqkern.io import qsave

    qt = pq.quantize(np.ones((4, 64), np.float32), "q8_0")
    pq.io.save(tmp_path / "ok.safetensors", {"w": qt})
    assert main(["inspect", str(tmp_path / "ok.safetensors")]) == 0
    tensors, meta = st.load(tmp_path / "ok.safetensors")
    doc = _json.loads(meta[qsave.META_KEY])
    doc["tensors"]["w"]["shape"] = [10 ** 30, 64]
    st.save(tmp_path / "lie.safetensors", dict(tensors), metadata={qsave.META_KEY: _json.dumps(doc)})
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "lie.safetensors")]) == 1
    assert "buffer has" in capsys.readouterr().err
    raw = meta[qsave.META_KEY]
    dup = raw[:-1] + ',"tensors":{}}'
    st.save(tmp_path / "dup.safetensors", dict(tensors), metadata={qsave.META_KEY: dup})
    with pytest.raises(ValueError, match="duplicate key 'tensors'"):
        pq.io.load(tmp_path / "dup.safetensors")


def test_review_cli_errors_name_the_tensor_and_leave_nothing(tmp_path, capsys):
    """From a CLI review: weights beyond q4_0's fp16 scales were written as Inf scales with exit
    code 0 and an anonymous warning; NaN weights were refused without the tensor's name."""
    rng = np.random.default_rng(1)
    src = tmp_path / "m.safetensors"
    st.save(src, {"ok.weight": rng.standard_normal((8, 64)).astype(np.float32),
                  "big.weight": (rng.standard_normal((8, 64)) * 1e6).astype(np.float32)}, {})
    out = tmp_path / "m.gguf"
    assert main(["quantize", "-q", str(src), str(out), "--format", "q4_0"]) == 1
    err = capsys.readouterr().err
    assert "big.weight: q4_0" in err and "too large" in err and "nothing was written" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    nan = rng.standard_normal((8, 64)).astype(np.float32)
    nan[2, 3] = np.nan
    st.save(src, {"n.weight": nan}, {})
    assert main(["quantize", "-q", str(src), str(out), "--format", "q4_0"]) == 1
    assert "n.weight: q4_0: weights contain NaN or Inf (row 2)" in capsys.readouterr().err


def test_kept_bf16_tensors_stay_bf16_in_gguf(tmp_path):
    """A kept BF16 tensor was widened to F32 in GGUF output (twice the bytes); GGUF holds BF16."""
    bf = np.random.default_rng(2).standard_normal((4, 100)).astype(np.float32)
    bits = (bf.view(np.uint32) >> 16).astype(np.uint16)
    src = tmp_path / "m.safetensors"
    st.save(src, {"bf.weight": bits, "w.weight": np.ones((8, 64), np.float32)}, {}, bf16=["bf.weight"])
    out = tmp_path / "m.gguf"
    assert main(["quantize", "-q", str(src), str(out), "--format", "q4_0"]) == 0
    t = {x.name: x for x in gguf.GGUFReader(str(out)).tensors}
    assert t["bf.weight"].tensor_type == gguf.GGMLQuantizationType.BF16 and t["bf.weight"].n_bytes == bits.nbytes
    got = pq.io.load_gguf(str(out))[0]["bf.weight"]
    np.testing.assert_array_equal(got, (bits.astype(np.uint32) << 16).view(np.float32))


def test_review_cli_isa_pipe_and_plot(tmp_path):
    """A bad PYQKERN_ISA gave a traceback; `pyqkern info | head` a BrokenPipeError traceback; a
    bad --plot path was found after the whole benchmark (and removed the --json rows)."""
    from conftest import child_env

    env = dict(child_env()[0], PYQKERN_ISA="bogus")
    r = subprocess.run([sys.executable, "-m", "pyqkern", "info"], capture_output=True, text=True, env=env,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "PYQKERN_ISA=bogus" in r.stderr
    env.pop("PYQKERN_ISA")
    p = subprocess.Popen([sys.executable, "-m", "pyqkern", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env, cwd=tmp_path)
    p.stdout.close()  # the reader leaves before the output is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and "Traceback" not in err, err
    j = tmp_path / "rows.json"
    assert main(["bench", "--quick", "--json", str(j), "--plot", str(tmp_path / "no" / "r.png")]) == 1
    assert not j.exists()


def test_output_directory_and_full_disk_are_named(tmp_path, monkeypatch, capsys):
    """A missing output directory was reported as the temporary file's name after the input was
    read; a full disk under GGUF output as NumPy's "N requested and M written"."""
    src = tmp_path / "m.safetensors"
    st.save(src, {"w.weight": np.ones((8, 64), np.float32)}, {})
    assert main(["quantize", "-q", str(src), str(tmp_path / "no" / "x.gguf"), "--format", "q4_0"]) == 1
    assert "the output directory" in capsys.readouterr().err
    import shutil
    from collections import namedtuple

    from pyqkern.io import gguf as _gg

    def short_write(self, arr):
        raise OSError(f"{arr.nbytes} requested and 0 written")

    monkeypatch.setattr(_gg._gguf().GGUFWriter, "write_tensor_data", short_write)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(1, 1, 0))
    assert main(["quantize", "-q", str(src), str(tmp_path / "x.gguf"), "--format", "q4_0"]) == 1
    assert "No space left on device writing" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
