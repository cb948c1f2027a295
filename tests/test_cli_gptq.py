"""`pyqkern quantize --gptq --calib FILE` (.npz / .npy / .txt through a Hugging Face model)."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest

import pyqkern as pq
from pyqkern import _calib
from pyqkern.__main__ import _errors, inspect_file, main, quantize_files
from pyqkern.io import safetensors as st


def _acts(rng, tokens, k):
    """Correlated activations (low rank + noise, uneven channel scales): where GPTQ beats RTN."""
    basis = rng.standard_normal((8, k))
    x = rng.standard_normal((tokens, 8)) @ basis + 0.1 * rng.standard_normal((tokens, k))
    return (x * np.linspace(0.2, 3.0, k)).astype(np.float32)


def _out_err(x, w, qt):
    x = x.astype(np.float64).reshape(-1, w.shape[1])
    ref = x @ w.astype(np.float64).T
    return np.linalg.norm(ref - x @ pq.dequantize(qt).astype(np.float64).T) / np.linalg.norm(ref)


@pytest.fixture
def model(tmp_path):
    rng = np.random.default_rng(0)
    t = {
        "l0.q.weight": rng.standard_normal((16, 128)).astype(np.float32),
        "l0.o.weight": rng.standard_normal((24, 128)).astype(np.float16),
        "l0.up.weight": rng.standard_normal((8, 256)).astype(np.float32),
        "l0.norm.weight": np.ones(128, np.float32),
    }
    p = tmp_path / "m.safetensors"
    st.save(p, t, {"format": "pt"})
    return p, t


def test_npz_gptq_matches_library_and_falls_back(tmp_path, model):
    src, t = model
    rng = np.random.default_rng(1)
    xq = _acts(rng, 96, 128)
    xo = _acts(rng, 60, 128).reshape(3, 20, 128)  # leading dims are flattened
    calib = tmp_path / "c.npz"
    np.savez(calib, **{"l0.q.weight": xq, "l0.o": xo, "unused.layer": xq})
    out, err = io.StringIO(), io.StringIO()
    dst = tmp_path / "o.safetensors"
    s = quantize_files(str(src), str(dst), "int4", group=32, gptq=True, calib=str(calib), act_order=True, out=out,
                       err=err)
    assert (s["gptq"], s["rtn"], s["kept"]) == (2, 1, 1)
    e = err.getvalue()
    assert "warning: no calibration data for l0.up.weight: round-to-nearest int4" in e
    assert "unused.layer" in e  # npz keys that match nothing are reported
    got, meta = pq.io.load(dst)
    assert meta == {"format": "pt"}
    w_o = t["l0.o.weight"].astype(np.float32)
    ref_q = pq.gptq.quantize(t["l0.q.weight"], X=xq, format="int4", group_size=32, act_order=True)
    ref_o = pq.gptq.quantize(w_o, X=xo, format="int4", group_size=32, act_order=True)
    assert got["l0.q.weight"] == ref_q and got["l0.o.weight"] == ref_o
    assert got["l0.q.weight"].perm is not None  # act-order stored its permutation
    assert got["l0.up.weight"] == pq.quantize(t["l0.up.weight"], "int4", group=32)
    # the summary's layer-output errors are ||X(W - deq)^T|| / ||XW^T|| on the calibration data
    rows = {r["name"]: r for r in s["tensors"]}
    for name, x, w, qt in (("l0.q.weight", xq, t["l0.q.weight"], ref_q), ("l0.o.weight", xo, w_o, ref_o)):
        r = rows[name]
        assert r["method"] == "gptq"
        assert r["out_err_gptq"] == pytest.approx(_out_err(x, w, qt), rel=1e-6)
        assert r["out_err_rtn"] == pytest.approx(_out_err(x, w, pq.quantize(w, "int4", group=32)), rel=1e-6)
        assert r["out_err_gptq"] < 0.8 * r["out_err_rtn"]
    assert rows["l0.up.weight"]["method"] == "rtn" and rows["l0.up.weight"]["out_err_gptq"] is None
    # byte-identical to pyqkern.io.save of the same tensors (header planned with the permutations)
    expect = {"l0.q.weight": ref_q, "l0.o.weight": ref_o, "l0.up.weight": got["l0.up.weight"],
              "l0.norm.weight": t["l0.norm.weight"]}
    pq.io.save(tmp_path / "ref.safetensors", {k: expect[k] for k in t}, {"format": "pt"})
    assert dst.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    text = out.getvalue()
    assert "out.err RTN" in text and "out.err GPTQ" in text and "int4 GPTQ +perm" in text
    assert "  GPTQ " in text and "  RTN " in text and f"GPTQ {s['mean_out_err_gptq']:.4e}" in text
    ins = io.StringIO()
    rows = {r[0]: r for r in inspect_file(str(dst), out=ins)}
    assert rows["l0.q.weight"][1] == "int4(group=32)+perm" and "__pyqkern_perm__" not in ins.getvalue()


def test_act_order_identity_permutation_is_dropped(tmp_path, model):
    """Channels already in descending Hessian order: act-order finds the identity, the QTensor has
    no perm, and the planned permutation tensor is taken out of the file again."""
    src, t = model
    rng = np.random.default_rng(5)
    x = rng.choice(np.array([-1.0, 1.0], np.float32), (80, 128))  # every diag(H) entry equal: stable sort = identity
    xo = _acts(rng, 70, 128)
    np.savez(tmp_path / "c.npz", **{"l0.q": x, "l0.o": xo})
    dst = tmp_path / "o.safetensors"
    quantize_files(str(src), str(dst), "int4", group=64, gptq=True, calib=str(tmp_path / "c.npz"), act_order=True,
                   out=io.StringIO(), err=io.StringIO())
    got, _ = pq.io.load(dst)
    ref_q = pq.gptq.quantize(t["l0.q.weight"], X=x, format="int4", group_size=64, act_order=True)
    ref_o = pq.gptq.quantize(t["l0.o.weight"].astype(np.float32), X=xo, format="int4", group_size=64, act_order=True)
    assert ref_q.perm is None and ref_o.perm is not None
    assert got["l0.q.weight"] == ref_q and got["l0.o.weight"] == ref_o
    expect = {"l0.q.weight": ref_q, "l0.o.weight": ref_o, "l0.up.weight": pq.quantize(t["l0.up.weight"], "int4", group=64),
              "l0.norm.weight": t["l0.norm.weight"]}
    pq.io.save(tmp_path / "ref.safetensors", {k: expect[k] for k in t}, {"format": "pt"})
    assert dst.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_npy_shared_by_k_and_gguf(tmp_path, model):
    src, t = model
    x = _acts(np.random.default_rng(2), 200, 128)
    calib = tmp_path / "x.npy"
    np.save(calib, x)
    err = io.StringIO()
    dst = tmp_path / "o.gguf"
    s = quantize_files(str(src), str(dst), "q4_0", gptq=True, calib=str(calib), damp=0.05, out=io.StringIO(),
                       err=err)
    assert (s["gptq"], s["rtn"]) == (2, 1) and "no calibration data for l0.up.weight" in err.getvalue()
    got, _ = pq.io.load_gguf(dst)
    for name in ("l0.q.weight", "l0.o.weight"):
        w = t[name].astype(np.float32)
        assert got[name] == pq.gptq.quantize(w, X=x, format="q4_0", damp=0.05), name
    assert got["l0.up.weight"] == pq.quantize(t["l0.up.weight"], "q4_0")
    assert s["mean_out_err_gptq"] < s["mean_out_err_rtn"]
    # the command line gives the same file
    assert main(["quantize", str(src), str(tmp_path / "m.gguf"), "--format", "q4_0", "--gptq", "--calib", str(calib),
                 "--damp", "0.05", "-q"]) == 0
    assert (tmp_path / "m.gguf").read_bytes() == dst.read_bytes()
    # Fortran-ordered .npy: same activations, same result
    np.save(calib, np.asfortranarray(x))
    quantize_files(str(src), str(tmp_path / "f.gguf"), "q4_0", gptq=True, calib=str(calib), damp=0.05,
                   out=io.StringIO(), err=io.StringIO())
    assert (tmp_path / "f.gguf").read_bytes() == dst.read_bytes()


@pytest.mark.parametrize("fmt", [f for f in ("int8", "nf4", "q8_0", "int3") if f in pq.gptq.FORMATS])
def test_other_gptq_formats(tmp_path, model, fmt):
    src, t = model
    x = _acts(np.random.default_rng(3), 150, 128)
    np.save(tmp_path / "x.npy", x)
    s = quantize_files(str(src), str(tmp_path / "o.safetensors"), fmt, gptq=True, calib=str(tmp_path / "x.npy"),
                       out=io.StringIO(), err=io.StringIO())
    got, _ = pq.io.load(tmp_path / "o.safetensors")
    params = pq._formats.resolve_params(fmt, 128)
    kw = {"group_size": params["group"]} if params["group"] else {}
    assert got["l0.q.weight"] == pq.gptq.quantize(t["l0.q.weight"], X=x, format=fmt, **kw)
    assert s["gptq"] == 2 and s["mean_out_err_gptq"] <= s["mean_out_err_rtn"] * 1.05


def test_chunked_feed_builds_the_same_hessian(tmp_path, monkeypatch):
    x = _acts(np.random.default_rng(4), 103, 64).astype(np.float16)
    np.savez_compressed(tmp_path / "c.npz", w=x)
    np.save(tmp_path / "c.npy", x)
    monkeypatch.setattr(_calib, "CHUNK_ROWS", 10)
    ref = pq.gptq.GPTQ(np.ones((2, 64), np.float32))
    ref.add_batch(x)
    for name in ("c.npz", "c.npy"):
        src = _calib.open_source(tmp_path / name, None, str(tmp_path))
        assert src.prepare({"w.weight": (2, 64)}, print) == {"w.weight"}
        g = pq.gptq.GPTQ(np.ones((2, 64), np.float32))
        src.feed("w.weight", g)
        src.close()
        assert g.nsamples == 103
        np.testing.assert_allclose(g.H, ref.H, rtol=1e-12, atol=1e-12)


def test_gptq_errors(tmp_path, model, capsys, monkeypatch):
    src, _ = model
    good = tmp_path / "x.npy"
    np.save(good, np.ones((4, 128), np.float32))
    out = str(tmp_path / "o.safetensors")

    def fails(argv, msg):
        assert main(["quantize", str(src), *argv]) == 1, argv
        e = capsys.readouterr().err
        assert msg in e, (argv, e)

    fails([out, "--format", "int4", "--gptq"], "--gptq needs calibration")
    fails([out, "--format", "int4", "--calib", str(good)], "add --gptq")
    fails([out, "--format", "int4", "--act-order"], "apply to --gptq only")
    fails([out, "--format", "int4", "--gptq", "--calib", str(tmp_path / "none.npz")], "no such file")
    fails([out, "--format", "int4", "--gptq", "--calib", str(src)], "must be .npz")
    fails([str(tmp_path / "o.gguf"), "--format", "q4_0", "--gptq", "--calib", str(good), "--act-order"],
          "GGUF cannot store")
    fails([out, "--format", "int4", "--gptq", "--calib", str(good), "--damp", "-1"], "--damp")
    monkeypatch.setattr(pq.gptq, "FORMATS", ("int4",))  # FORMATS is read at run time
    fails([out, "--format", "q4_0", "--gptq", "--calib", str(good)], "GPTQ does not support q4_0")
    monkeypatch.undo()
    # wrong K
    np.savez(tmp_path / "k.npz", **{"l0.q.weight": np.ones((4, 64), np.float32)})
    fails([out, "--format", "int4", "--gptq", "--calib", str(tmp_path / "k.npz")], "K=64")
    np.save(tmp_path / "k.npy", np.ones((4, 100), np.float32))
    fails([out, "--format", "int4", "--gptq", "--calib", str(tmp_path / "k.npy")], "no tensor being quantized has K=100")
    # not activations
    np.save(tmp_path / "i.npy", np.ones((4, 128), np.int32))
    fails([out, "--format", "int4", "--gptq", "--calib", str(tmp_path / "i.npy")], "float16/32/64")
    np.save(tmp_path / "v.npy", np.ones(128, np.float32))
    fails([out, "--format", "int4", "--gptq", "--calib", str(tmp_path / "v.npy")], "[tokens, K]")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    fails([out, "--format", "int4", "--gptq", "--calib", str(tmp_path / "bad.npz")], "not a readable .npz")
    # non-finite activations: the tensor using them fails cleanly, nothing is left behind
    bad = np.ones((4, 128), np.float32)
    bad[2, 5] = np.nan
    np.savez(tmp_path / "n.npz", **{"l0.o": bad})
    fails([out, "--format", "int4", "--gptq", "--calib", str(tmp_path / "n.npz")], "NaN or Inf")
    np.save(tmp_path / "n.npy", bad)
    fails([out, "--format", "int4", "--gptq", "--calib", str(tmp_path / "n.npy")], "NaN or Inf")
    # text calibration needs a model directory as the input
    (tmp_path / "t.txt").write_text("hello\n")
    fails([out, "--format", "int4", "--gptq", "--calib", str(tmp_path / "t.txt")], "Hugging Face model directory")
    assert not os.path.exists(out) and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_match_modules():
    weights = {"bert.enc.0.q.weight": (4, 8), "bert.enc.10.q.weight": (4, 8), "head.weight": (2, 8),
               "layers.0.up.weight": (6, 8), "x.a.w.weight": (3, 3), "y.a.w.weight": (3, 3)}
    mods = {"enc.0.q": (4, 8), "enc.10.q": (4, 8), "head": (2, 8), "model.layers.0.up": (6, 8),
            "a.w": (3, 3), "enc.1.q": (4, 8), "model.head": (9, 9)}
    got, missed = _calib.match_modules(mods, weights)
    assert got == {"enc.0.q": "bert.enc.0.q.weight", "enc.10.q": "bert.enc.10.q.weight", "head": "head.weight",
                   "model.layers.0.up": "layers.0.up.weight"}
    assert sorted(missed) == ["a.w", "enc.1.q", "model.head"]  # ambiguous, absent, shape mismatch


def test_text_calibration_through_a_tiny_bert(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
        "the a cat dog sat on mat ran fast slow red blue big small and of to is was").split()
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    d = tmp_path / "model"
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertForMaskedLM(cfg).save_pretrained(d)  # weights named bert.encoder...: AutoModel drops "bert."
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(d)
    lines = ["the cat sat on the mat", "", "a big red dog ran fast", "the small blue cat was slow and big",
             "a dog is on the mat"]
    (tmp_path / "calib.txt").write_text("\n".join(lines) + "\n")
    dst = tmp_path / "q.safetensors"
    err = io.StringIO()
    s = quantize_files(str(d), str(dst), "int4", group=32, gptq=True, calib=str(tmp_path / "calib.txt"),
                       out=io.StringIO(), err=err)
    e = err.getvalue()
    assert s["gptq"] == 12  # the 12 encoder Linear layers
    assert "pooler.dense" in e  # a module of the model with no weight in the checkpoint
    assert "no calibration data for cls.predictions.transform.dense.weight" in e
    assert "no calibration data for bert.embeddings.word_embeddings.weight" in e
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".pyqkern-calib")]  # spill files removed
    # independent capture: the inputs of each Linear over the same lines, one GPTQ per weight
    model = transformers.AutoModel.from_pretrained(d, local_files_only=True).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, local_files_only=True)
    caps = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("encoder."):
            mod.register_forward_hook(lambda m, a, o, name=name: caps.setdefault(name, []).append(
                a[0].detach().reshape(-1, a[0].shape[-1]).numpy().copy()))
    with torch.no_grad():
        for line in (ln for ln in lines if ln):
            model(**tok(line, return_tensors="pt"))
    got, _ = pq.io.load(dst)
    raw = st.load(d / "model.safetensors")[0]
    assert len(caps) == 12
    for name, xs in caps.items():
        wname = "bert." + name + ".weight"
        x = np.concatenate(xs)
        assert x.shape[0] == sum(len(tok(ln)["input_ids"]) for ln in lines if ln)
        assert got[wname] == pq.gptq.quantize(raw[wname], X=x, format="int4", group_size=32), wname
    rows = {r["name"]: r for r in s["tensors"]}
    assert np.mean([rows["bert." + n + ".weight"]["out_err_gptq"] for n in caps]) < np.mean(
        [rows["bert." + n + ".weight"]["out_err_rtn"] for n in caps])


@pytest.mark.parametrize("fmt", sorted(pq._formats.FORMATS))
def test_errors_match_direct_computation(fmt):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((37, 512)).astype(np.float32)
    x = _acts(rng, 50, 512)
    qt = pq.quantize(w, fmt)
    perm = rng.permutation(512)
    qp = pq.quantize(w[:, perm], fmt).with_perm(perm)
    g = pq.gptq.GPTQ(w)
    g.add_batch(x)
    res = _errors(w, [qt, qp], g.H)
    for (we, oe), q in zip(res, (qt, qp)):
        d = pq.dequantize(q)
        w64 = w.astype(np.float64)
        assert we == pytest.approx(np.linalg.norm(w64 - d) / np.linalg.norm(w64), rel=1e-9)
        assert oe == pytest.approx(_out_err(x, w, q), rel=1e-6)
    assert _errors(w, [qt])[0][1] is None
