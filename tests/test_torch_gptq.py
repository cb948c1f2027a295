"""pyqkern.torch.quantize_model(..., calib=...): GPTQ over a model, sequential or from float activations;
QuantLinear with an act-order input permutation."""
import copy
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import pyqkern as pq  # noqa: E402
import pyqkern.gptq  # noqa: E402,F401
import pyqkern.torch as pqt  # noqa: E402
from torch import nn  # noqa: E402

from test_torch_backend import check_adapter_grads  # noqa: E402

D_IN, D = 32, 64


class Block(nn.Module):
    """A transformer-ish block: q/k/v read the same tensor (one GPTQ stage), then o, up, down.
    Called as block(h, mask, scale=...) and returns a tuple, like older HF layers; a ``cache``
    keyword must arrive as None when pyqkern re-runs the block."""

    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, h, mask, scale=1.0, cache=None):
        if cache is not None:
            cache.append(h)
        x = self.norm(h)
        att = (self.q(x) @ self.k(x).transpose(-1, -2)) * scale + mask
        h = h + self.o(att.softmax(-1) @ self.v(x))
        return (h + self.down(nn.functional.gelu(self.up(h))), None)


class Tiny(nn.Module):
    def __init__(self, nblocks=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Linear(D_IN, D)  # before the blocks
        self.layers = nn.ModuleList(Block(D) for _ in range(nblocks))
        self.head = nn.Linear(D, 8)    # after the blocks
        self.unused = nn.Linear(D, D)  # never called

    def forward(self, x, attention_mask=None, cache=None):
        h = self.emb(x)
        t = x.shape[1]
        mask = torch.zeros(x.shape[0], t, t)
        if attention_mask is not None:
            mask = mask.masked_fill(attention_mask[:, None, :] == 0, -1e4)
        for layer in self.layers:
            h = layer(h, mask, scale=1 / math.sqrt(D), cache=cache)[0]
        return self.head(h)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """torch's OpenMP workers spin between ops; on a loaded 2-core runner that makes these many
    small forwards several times slower. One torch thread (restored afterwards)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _correlated(n, t, seed):
    """Inputs with strongly correlated features (GPTQ's advantage over RTN shows there): one fixed
    rank-8 mixing plus noise; seed picks the sample."""
    mix = torch.randn(8, D_IN, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, t, 8, generator=g)
    return z @ mix + 0.3 * torch.randn(n, t, D_IN, generator=g)


def _calib(nbatches=3, pad=True):
    out = []
    for i in range(nbatches):
        x = _correlated(4, 12, seed=10 + i)
        am = torch.ones(4, 12, dtype=torch.long)
        if pad:
            am[1, 9:] = 0
            am[3, 5:] = 0
        out.append({"x": x, "attention_mask": am})
    return out


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def _rel(y, ref):
    return float((y - ref).norm() / ref.norm())


@pytest.mark.parametrize("fmt,group", [("int4", 32), ("q4_0", None)])
def test_gptq_beats_rtn_on_correlated_inputs(fmt, group):
    base = Tiny()
    calib = _calib()
    test = {"x": _correlated(4, 12, seed=99)}
    with torch.no_grad():
        ref = base(**test)
    rtn = copy.deepcopy(base)
    _quiet(pqt.quantize_model, rtn, fmt, group=group, exclude="unused")
    g = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="unused.*not called"):
        s = pqt.quantize_model(g, fmt, group=group, calib=calib)
    names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(s["quantized"]) == sorted(names)
    assert all(isinstance(g.get_submodule(n), pqt.QuantLinear) for n in names)
    assert s["gptq"]["unused"] is None  # never called: rounded to nearest
    for name in names:
        if name == "unused":
            continue
        e = s["gptq"][name]
        assert e["gptq"] < e["rtn"], (name, e)
    assert np.mean([e["gptq"] / e["rtn"] for e in s["gptq"].values() if e]) < 0.8
    assert s["calibration"]["mode"].startswith("sequential, 2 blocks (layers)")
    with torch.no_grad():
        assert _rel(g(**test), ref) < 0.7 * _rel(rtn(**test), ref)
    # the unused layer's bytes are RTN's
    assert g.unused.qtensor() == pq.quantize(base.unused.weight.detach().numpy(), fmt, group=group)
    assert s["bytes_before"] == sum(base.get_submodule(n).weight.numel() * 4 + base.get_submodule(n).bias.numel() * 4
                                    for n in names)
    assert s["bytes_after"] == sum(g.get_submodule(n).qdata.numel() + g.get_submodule(n).bias.numel() * 4
                                   for n in names)


def _manual_gptq(base, calib, fmt, kw, float_inputs=False):
    """Layer-by-layer GPTQ by hand: each layer's Hessian from its (unmasked) inputs with every layer
    called before it already quantized (float_inputs: from the float model). -> {name: QTensor}"""
    model = copy.deepcopy(base)
    if float_inputs:  # one pass of the float model, every layer's inputs
        xs = {n: [] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: xs[n].append(a[0]))
                 for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for c in calib:
                model(**c)
                mask = c["attention_mask"] != 0
                for v in xs.values():
                    if v and v[-1].dim() == 3:
                        v[-1] = v[-1][mask]
        for h in hooks:
            h.remove()
        out = {}
        for name, v in xs.items():
            if v:
                g = pq.gptq.GPTQ(base.get_submodule(name).weight.detach().numpy())
                for x in v:
                    g.add_batch(x.numpy())
                out[name] = g.quantize(format=fmt, **kw)
        return out
    order = []
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: order.append(n) if n not in order else None)
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(**calib[0])
    for h in hooks:
        h.remove()
    out = {}
    for name in order:
        lin = model.get_submodule(name)
        xs = []

        def grab(mod, a, xs=xs):
            xs.append(a[0])
        h = lin.register_forward_pre_hook(grab)
        with torch.no_grad():
            for c in calib:
                n0 = len(xs)
                model(**c)
                m = c["attention_mask"] != 0
                for i in range(n0, len(xs)):
                    xs[i] = xs[i][m]
        h.remove()
        g = pq.gptq.GPTQ(base.get_submodule(name).weight.detach().numpy())
        for x in xs:
            g.add_batch(x.reshape(-1, x.shape[-1]).numpy())
        out[name] = g.quantize(format=fmt, **kw)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                pqt.QuantLinear.from_qtensor(out[name], base.get_submodule(name).bias.detach().numpy()))
    return out


@pytest.mark.parametrize("sequential", [True, False])
def test_matches_layer_by_layer_gptq(sequential):
    """Bit-exact against GPTQ run by hand, layer by layer (sequential: with the earlier layers
    quantized; else: float activations). Covers the block cache, the stages, the padding mask."""
    base = Tiny(seed=1)
    calib = _calib()
    kw = {"group_size": 32, "sym": False}
    want = _manual_gptq(base, calib, "int4", kw, float_inputs=not sequential)
    m = copy.deepcopy(base)
    s = pqt.quantize_model(m, "int4", group=32, calib=calib, exclude="unused", sequential=sequential)
    assert set(want) == set(s["quantized"])
    for name, qt in want.items():
        assert m.get_submodule(name).qtensor() == qt, name
    tokens = sum(int((c["attention_mask"] != 0).sum()) for c in calib)
    assert s["gptq"]["layers.0.q"]["tokens"] == tokens  # padding tokens dropped
    if sequential:
        # 2 blocks x (4 stages + output pass) block passes; discovery, emb (stopped at the block), capture, head
        assert s["calibration"]["block_passes"] == 10 and s["calibration"]["model_passes"] == 4
    else:
        assert s["calibration"]["model_passes"] == 1


def test_block_cache_equals_whole_model_passes(monkeypatch):
    """The block-at-a-time run gives exactly what whole-model passes give (blocks not detected)."""
    base = Tiny(nblocks=3, seed=2)
    calib = _calib(2)
    a = copy.deepcopy(base)
    sa = _quiet(pqt.quantize_model, a, "q4_0", calib=calib, gptq={"act_order": True})
    monkeypatch.setattr(pqt, "_find_blocks", lambda model, names: None)
    b = copy.deepcopy(base)
    sb = _quiet(pqt.quantize_model, b, "q4_0", calib=calib, gptq={"act_order": True})
    assert sb["calibration"]["mode"] == "sequential, whole-model passes"
    assert sa["calibration"]["mode"] != sb["calibration"]["mode"]
    for n in sa["quantized"]:
        assert a.get_submodule(n).qtensor() == b.get_submodule(n).qtensor(), n
    assert sa["gptq"] == sb["gptq"]


def test_unchained_module_list_falls_back():
    """A ModuleList of parallel heads on one input is not a chain of blocks: whole-model passes."""
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(D_IN, D)
            self.heads = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, 32)) for _ in range(3))

        def forward(self, x):
            h = self.inp(x)
            return torch.cat([hd(h) for hd in self.heads], -1)

    torch.manual_seed(4)
    m = Heads()
    calib = [_correlated(4, 8, seed=s) for s in range(2)]
    s = pqt.quantize_model(m, "q8_0", calib=calib)
    assert s["calibration"]["mode"] == "sequential, whole-model passes"
    # stages: inp | heads.*.0 (same input) | heads.0.2 | heads.1.2 | heads.2.2
    assert s["calibration"]["model_passes"] == 1 + 5
    assert all(e["gptq"] <= e["rtn"] * 1.001 for e in s["gptq"].values())


def test_report_equals_gptq_report():
    """The summary's errors (from the Hessian) are GPTQ.report's on the captured inputs."""
    torch.manual_seed(5)
    mlp = nn.Sequential(nn.Linear(D_IN, 96), nn.ReLU(), nn.Linear(96, 32))
    xs = [_correlated(3, 10, seed=s) for s in range(2)]
    ref = copy.deepcopy(mlp)
    s = pqt.quantize_model(mlp, "int4", group=32, calib=xs, sequential=False)
    X = torch.cat([x.reshape(-1, D_IN) for x in xs]).numpy()
    g = pq.gptq.GPTQ(ref[0].weight.detach().numpy())
    g.add_batch(X)
    g.quantize(format="int4", group_size=32)
    rep = g.report(X)
    assert s["gptq"]["0"]["gptq"] == pytest.approx(rep["gptq"], rel=1e-9)
    assert s["gptq"]["0"]["rtn"] == pytest.approx(rep["rtn"], rel=1e-9)
    assert mlp[0].qtensor() == g.qtensor


def test_formats_come_from_gptq_module(monkeypatch):
    m = Tiny()
    calib = _calib(1)
    from pyqkern import _formats

    other = next(f for f in _formats.FORMATS if f not in pq.gptq.FORMATS and f.startswith("q"))
    with pytest.raises(ValueError, match=f"does not support format '{other}'.*int4"):
        pqt.quantize_model(m, other, calib=calib)
    monkeypatch.setattr(pq.gptq, "FORMATS", ("int4", "q4_0"))
    with pytest.raises(ValueError, match="does not support format 'q8_0'"):
        pqt.quantize_model(m, "q8_0", calib=calib)
    assert not any(isinstance(mod, pqt.QuantLinear) for mod in m.modules())


def test_bad_arguments():
    m = Tiny()
    calib = _calib(1)
    with pytest.raises(ValueError, match="calib"):
        pqt.quantize_model(m, "int4", gptq={"act_order": True})
    with pytest.raises(ValueError, match="empty"):
        pqt.quantize_model(m, "int4", calib=[])
    with pytest.raises(TypeError, match=r"calib\[1\]"):
        pqt.quantize_model(m, "int4", calib=[calib[0]["x"], 3])
    with pytest.raises(TypeError, match="iterable"):
        pqt.quantize_model(m, "int4", calib=5)
    with pytest.raises(ValueError, match="group_size"):
        pqt.quantize_model(m, "int4", calib=calib, gptq={"group_size": 64})
    with pytest.raises(ValueError, match="does not take"):
        pqt.quantize_model(m, "int4", calib=calib, gptq={"frobnicate": 1})
    with pytest.raises(TypeError, match="dict"):
        pqt.quantize_model(m, "int4", calib=calib, gptq="yes")
    assert not any(isinstance(mod, pqt.QuantLinear) for mod in m.modules())


def test_flags_progress_verbose_and_single_batch(capsys):
    m = Tiny()
    m.train()
    calib = _calib(1)[0]  # one dict = one batch
    s = _quiet(pqt.quantize_model, m, "q8_0", calib=calib, progress=True, verbose=True)
    assert s["calibration"]["batches"] == 1
    assert m.training and all(mod.training for mod in m.modules())
    cap = capsys.readouterr()
    assert "GPTQ q8_0" in cap.err  # the tqdm bar
    assert "rel. output error GPTQ" in cap.out and "layers quantized to q8_0" in cap.out


def test_cache_kwarg_dropped_on_block_reruns():
    """A cache passed to the blocks is used by the calibration forward of the model only."""
    m = Tiny(seed=6)
    cache = []
    calib = [{"x": _correlated(2, 6, seed=1), "cache": cache}]
    pqt.quantize_model(m, "q8_0", calib=calib, exclude=["head", "unused"])
    # discovery + capture forwards append once per block each; pyqkern's own block runs get None
    assert len(cache) == 2 * len(m.layers)


# --------------------------------------------------------------------------- act-order QuantLinear
def _act_order_layer(k=128, n=24, fmt="int4", seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    X = _correlated(1, 200, seed)[0] @ torch.randn(D_IN, k) * 0.3
    kw = {"group_size": 32} if fmt == "int4" else {}
    qt = pq.gptq.quantize(lin.weight.detach().numpy(), X=X.numpy(), format=fmt, act_order=True, **kw)
    assert qt.perm is not None
    return lin, pqt.QuantLinear.from_qtensor(qt, lin.bias.detach().numpy(), compute="float"), qt


@pytest.mark.parametrize("fmt", ["int4", "q4_0"])
def test_act_order_quantlinear(fmt, tmp_path):
    lin, q, qt = _act_order_layer(fmt=fmt)
    assert q.perm is not None and "act_order" in repr(q)
    assert q.qtensor() == qt
    w = torch.from_numpy(pq.dequantize(qt))
    assert torch.equal(q.dequantize(), w)
    x = torch.randn(3, 5, 128)
    y = q(x)
    ref = nn.functional.linear(x, w, q.bias)
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-5)
    np.testing.assert_array_equal(y.reshape(-1, 24).numpy(), pq.matmul(x.reshape(-1, 128).numpy(), qt, q.bias.numpy(),
                                                                       compute="float"))
    qi = pqt.QuantLinear.from_qtensor(qt, lin.bias.detach().numpy(), compute="int8")
    np.testing.assert_array_equal(qi(x).reshape(-1, 24).numpy(), pq.matmul(x.reshape(-1, 128).numpy(), qt,
                                                                            q.bias.numpy(), compute="int8"))
    # state dict: the permutation travels; a plain layer loading it takes it over, and back
    torch.save(q.state_dict(), tmp_path / "q.pt")
    q2 = pqt.QuantLinear(128, 24, format="q8_0")
    q2.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
    assert q2.qtensor() == qt and torch.equal(q2(x), y)
    plain = pqt.QuantLinear.from_linear(lin, "q8_0", compute="float")
    q2.load_state_dict(plain.state_dict())
    assert q2.perm is None and torch.equal(q2(x), plain(x))
    with pytest.raises(ValueError, match="permutation"):
        pqt.qtensor_to_tensor(qt)


def test_act_order_adapters_grads_and_compile():
    lin, q, qt = _act_order_layer(seed=3)
    k, n, r = 128, 24, 4
    x, _, A0, B0, _, yr = check_adapter_grads(q, k, n, r, alpha=8, seed=7, tol=1e-4)
    assert torch.allclose(q(x), yr, atol=1e-4)
    # the same as pyqkern.matmul with the permuted QTensor and a LoRA
    np.testing.assert_allclose(q(x).detach().numpy().reshape(-1, n),
                               pq.matmul(x.reshape(-1, k).numpy(), qt, q.bias.numpy(),
                                         lora=[pq.LoRA(A0.numpy(), B0.numpy(), alpha=8)], compute="float"),
                               rtol=1e-5, atol=1e-5)
    cq = torch.compile(q, backend="aot_eager", fullgraph=True)
    assert torch.equal(cq(x), q(x))
    torch._dynamo.reset()


# --------------------------------------------------------------------------- thread policy
def test_threads_context_manager_and_attach():
    saved = torch.get_num_threads(), pq.get_num_threads()
    try:
        torch.set_num_threads(2)
        pq.set_num_threads(1)
        with pqt.threads():
            assert (torch.get_num_threads(), pq.get_num_threads()) == (1, 2)  # pyqkern gets torch's cores
            with pqt.threads(pyqkern_threads=1, torch_threads=2):  # nests
                assert (torch.get_num_threads(), pq.get_num_threads()) == (2, 1)
            assert (torch.get_num_threads(), pq.get_num_threads()) == (1, 2)
        assert (torch.get_num_threads(), pq.get_num_threads()) == (2, 1)

        @pqt.threads(pyqkern_threads=2)
        def inside():
            return torch.get_num_threads(), pq.get_num_threads()
        assert inside() == (1, 2) and (torch.get_num_threads(), pq.get_num_threads()) == (2, 1)
        with pytest.raises(RuntimeError):
            with pqt.threads():
                raise RuntimeError
        assert (torch.get_num_threads(), pq.get_num_threads()) == (2, 1)
        with pytest.raises(ValueError):
            pqt.threads(0)

        m = Tiny()
        pqt.quantize_model(m, "q8_0", exclude="unused")
        seen = []
        m.layers[0].register_forward_pre_hook(lambda mod, a: seen.append((torch.get_num_threads(),
                                                                           pq.get_num_threads())))
        x = _correlated(2, 5, seed=0)
        ref = m(x)
        h = pqt.attach_threads(m)
        y = m(x)
        assert torch.equal(y, ref)  # results do not depend on threads
        assert seen == [(2, 1), (1, 2)] and (torch.get_num_threads(), pq.get_num_threads()) == (2, 1)
        m.layers[0].register_forward_pre_hook(lambda mod, a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            m(x)
        assert (torch.get_num_threads(), pq.get_num_threads()) == (2, 1)  # restored after an error too
        h.remove()
    finally:
        torch.set_num_threads(saved[0])
        pq.set_num_threads(saved[1])


def test_layer_that_sees_only_zeros_is_rounded_to_nearest():
    """GPTQ refuses all-zero calibration inputs (it would zero the weight): a layer that sees only
    zeros is rounded to nearest with a warning, as a layer never called."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            return self.a(x) + self.b(x * 0)

    m = M()
    wb = m.b.weight.detach().clone()
    with pytest.warns(UserWarning, match="b saw only zeros"):
        r = pqt.quantize_model(m, "q4_0", calib=[torch.randn(16, 64)])
    assert r["quantized"] == ["a", "b"] and r["gptq"]["b"] is None and r["gptq"]["a"] is not None
    assert torch.equal(m.b.dequantize(), torch.from_numpy(pq.dequantize(pq.quantize(wb.numpy(), "q4_0"))))
