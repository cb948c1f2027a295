"""pyqkern.torch: custom ops, QuantLinear, quantize_model, torch.compile / export, QLoRA gradients."""
import io
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import pyqkern as pq  # noqa: E402
import pyqkern.torch as pqt  # noqa: E402
from torch import nn  # noqa: E402


def _lin(k, n, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


def _ref(q: "pqt.QuantLinear", x):
    w = torch.from_numpy(pq.dequantize(q.qtensor()))
    return nn.functional.linear(x.float(), w, q.bias)


def test_import_pyqkern_does_not_import_torch():
    code = "import sys, pyqkern; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("fmt,opts", [("q4_0", {}), ("q4_1", {}), ("q8_0", {}), ("iq4_nl", {}),
                                      ("q4_k", {}), ("q6_k", {}), ("nf4", {"group": 64}),
                                      ("nf4", {"double_quant": True}), ("int4", {"group": 32}),
                                      ("int4", {"group": 32, "sym": True}), ("int8", {}), ("int2", {}),
                                      ("int3", {"group": 16, "sym": True}), ("fp4", {"double_quant": True})])
def test_float_matches_dequantized_linear(fmt, opts):
    k = 256
    lin = _lin(k, 24)
    q = pqt.QuantLinear.from_linear(lin, fmt, compute="float", **opts)
    # the weight bytes are exactly pq.quantize's
    assert q.qtensor() == pq.quantize(lin.weight.detach().numpy(), fmt, **opts)
    x = torch.randn(2, 3, k)
    y = q(x)
    assert y.shape == (2, 3, 24) and y.dtype == torch.float32
    ref = _ref(q, x)
    w = q.dequantize()
    bound = k * 2.0 ** -23 * (x.abs() @ w.abs().T + q.bias.abs()) + 1e-6
    assert ((y - ref).abs() <= bound).all()
    assert f"format={fmt}" in repr(q) and "bits/weight" in repr(q)


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "int4"])
def test_int8_compute(fmt):
    k, n = 128, 20
    lin = _lin(k, n)
    q = pqt.QuantLinear.from_linear(lin, fmt, group=64 if fmt == "int4" else None, compute="int8")
    assert q.compute == "int8"
    x = torch.randn(5, k)
    y = q(x)
    # bit-identical to pyqkern.matmul (which the matmul tests tie to the reference spec)
    qt = q.qtensor()
    assert np.array_equal(y.numpy(), pq.matmul(x.numpy(), qt, q.bias.numpy(), compute="int8"))
    # within the activation rounding bound of the float result: |x - dx*xq| <= dx/2, dx = amax/127 per 32
    xb = x.double().reshape(5, k // 32, 32)
    half_dx = (xb.abs().amax(-1, keepdim=True) / 127 / 2).expand_as(xb).reshape(5, k)
    w = q.dequantize().double()
    exact = x.double() @ w.T + q.bias.double()
    bound = half_dx @ w.abs().T + 1e-5 * (x.double().abs() @ w.abs().T + q.bias.double().abs()) + 1e-6
    assert ((y.double() - exact).abs() <= bound).all()


def test_dtypes_and_leading_dims():
    lin = _lin(64, 16)
    q = pqt.QuantLinear.from_linear(lin, "q8_0", compute="float")
    x = torch.randn(2, 3, 4, 64)
    for dt in (torch.bfloat16, torch.float16):
        xd = x.to(dt)
        y = q(xd)
        assert y.dtype == dt and y.shape == (2, 3, 4, 16)
        assert torch.equal(y, _ref(q, xd).to(dt)) or (y.float() - _ref(q, xd)).abs().max() < 0.05
    assert q(torch.randn(0, 64)).shape == (0, 16)
    assert q(torch.randn(64)).shape == (16,)


def test_ops_direct():
    w = torch.randn(16, 64)
    qdata = torch.ops.pyqkern.quantize(w, "q4_0", 0, 0)
    qt = pq.quantize(w.numpy(), "q4_0")
    assert qdata.dtype == torch.uint8 and np.array_equal(qdata.numpy(), qt.data)
    d = torch.ops.pyqkern.dequantize(qdata, "q4_0", 16, 64, 0, 0)
    assert np.array_equal(d.numpy(), pq.dequantize(qt))
    x = torch.randn(3, 64)
    y = torch.ops.pyqkern.matmul(x, qdata, "q4_0", 16, 64, 0, 0, None, "float")
    assert np.array_equal(y.numpy(), pq.matmul(x.numpy(), qt, compute="float"))
    # fake (meta) implementations give the right shapes / dtypes
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fw = torch.empty(16, 64)
        fq = torch.ops.pyqkern.quantize(fw, "q4_0", 0, 0)
        assert fq.shape == (qt.nbytes,) and fq.dtype == torch.uint8
        assert torch.ops.pyqkern.dequantize(fq, "q4_0", 16, 64, 0, 0).shape == (16, 64)
        fy = torch.ops.pyqkern.matmul(torch.empty(2, 5, 64, dtype=torch.bfloat16), fq, "q4_0", 16, 64, 0, 0, None,
                                      "float")
        assert fy.shape == (2, 5, 16) and fy.dtype == torch.float32


def test_opcheck():
    lin = _lin(64, 16)
    q = pqt.QuantLinear.from_linear(lin, "q4_0", compute="float")
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.pyqkern.matmul.default,
                          (x, q.qdata, q.format, 16, 64, 0, 0, q.bias, "float"),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.pyqkern.dequantize.default, (q.qdata, q.format, 16, 64, 0, 0),
                          test_utils=("test_schema", "test_faketensor"))


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(96, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


def test_compile_no_graph_breaks():
    torch.manual_seed(1)
    m = _MLP()
    pqt.quantize_model(m, "q4_0")
    x = torch.randn(4, 7, 64)
    eager = m(x)
    ex = torch._dynamo.explain(m)(x)
    assert ex.graph_break_count == 0 and ex.graph_count == 1
    torch._dynamo.reset()
    for backend in ("eager", "aot_eager"):
        cm = torch.compile(m, backend=backend, fullgraph=True)
        assert torch.equal(cm(x), eager), backend
        torch._dynamo.reset()


def test_export():
    torch.manual_seed(2)
    m = _MLP()
    pqt.quantize_model(m, "q8_0")
    x = torch.randn(3, 64)
    ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("pyqkern.matmul" in t for t in targets), targets
    assert torch.equal(ep.module()(x), m(x))


def test_state_dict_round_trip(tmp_path):
    lin = _lin(128, 24)
    q = pqt.QuantLinear.from_linear(lin, "int4", group=64, sym=True, compute="float")
    q.add_adapter("a", torch.randn(4, 128) * 0.1, torch.randn(24, 4) * 0.1, alpha=8, rslora=True)
    q.add_adapter("b", torch.randn(2, 128) * 0.1, torch.randn(24, 2) * 0.1)
    q.set_adapter("a")
    path = tmp_path / "q.pt"
    torch.save(q.state_dict(), path)
    # a layer made with another format / no adapters takes over everything from the state dict
    q2 = pqt.QuantLinear(128, 24, format="q8_0", bias=False)
    q2.load_state_dict(torch.load(path, weights_only=True))
    assert q2.format == "int4" and q2.group == 64 and q2.sym == 1 and q2.compute == "float"
    assert q2.adapter_names == ["a", "b"] and q2.active_adapters == ["a"]
    assert q2.qtensor() == q.qtensor()
    x = torch.randn(3, 128)
    assert torch.equal(q2(x), q(x))
    assert torch.equal(q2(x, adapter_ids=[1, -1, 0]), q(x, adapter_ids=[1, -1, 0]))


def test_state_dict_load_in_place_updates_weight():
    a = pqt.QuantLinear.from_linear(_lin(64, 8, seed=1), "q4_0", compute="int8")
    b = pqt.QuantLinear.from_linear(_lin(64, 8, seed=2), "q4_0", compute="int8")
    x = torch.randn(2, 64)
    ya = a(x)
    b(x)  # caches b's packed weight
    b.load_state_dict(a.state_dict())
    assert torch.equal(b(x), ya)


def test_adapters_attach_detach():
    k, n = 64, 16
    lin = _lin(k, n)
    q = pqt.QuantLinear.from_linear(lin, "q4_0", compute="float")
    x = torch.randn(4, k)
    base = q(x)
    A1, B1 = torch.randn(4, k) * 0.1, torch.randn(n, 4) * 0.1
    A2, B2 = torch.randn(2, k) * 0.1, torch.randn(n, 2) * 0.1
    q.add_adapter("one", A1, B1, alpha=8)
    q.add_adapter("two", A2, B2)
    assert q.adapter_names == ["one", "two"] and "adapters=" in repr(q)
    t1 = 2.0 * (x @ A1.T) @ B1.T
    t2 = (x @ A2.T) @ B2.T
    assert torch.allclose(q(x), base + t1 + t2, atol=1e-5)
    q.set_adapter("two")
    assert torch.allclose(q(x), base + t2, atol=1e-5)
    y = q(x, adapter_ids=["one", None, "two", 0])
    want = base.clone()
    want[0] += t1[0]
    want[2] += t2[2]
    want[3] += t1[3]
    assert torch.allclose(y, want, atol=1e-5)
    assert torch.allclose(q(x, adapter_ids=torch.tensor([0, -1, 1, 0])), want, atol=1e-5)
    for ids in ([True, False, 1, 0], ["one", None, np.bool_(True), 0]):  # operator.index took them as 1 / 0
        with pytest.raises(TypeError, match="not bools"):
            q(x, adapter_ids=ids)
    # same as pyqkern.matmul with LoRA objects
    ads = [pq.LoRA(A1.numpy(), B1.numpy(), alpha=8), pq.LoRA(A2.numpy(), B2.numpy())]
    np.testing.assert_array_equal(q(x).numpy(), pq.matmul(x.numpy(), q.qtensor(), q.bias.numpy(), lora=[ads[1]],
                                                           compute="float"))
    q.set_adapter([])
    assert torch.equal(q(x), base)
    q.remove_adapter("one")
    assert q.adapter_names == ["two"]
    with pytest.raises(KeyError):
        q.set_adapter("one")
    q.remove_adapter("two")
    assert torch.equal(q(x), base)
    with pytest.raises(ValueError):
        q.add_adapter("bad", torch.randn(4, k + 1), torch.randn(n, 4))
    # integer / bool / complex A or B: refused as by pq.LoRA, not converted to float32 numbers
    # (a NumPy uint16 array of bfloat16 bits read as integers was one)
    bits = (torch.randn(4, k).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    for bad_a, bad_b in ((torch.ones(4, k, dtype=torch.int64), torch.randn(n, 4)),
                         (torch.randn(4, k), torch.ones(n, 4, dtype=torch.bool)),
                         (torch.randn(4, k, dtype=torch.complex64), torch.randn(n, 4)), (bits, torch.randn(n, 4))):
        with pytest.raises(TypeError, match="floating point"):
            q.add_adapter("bad", bad_a, bad_b)
    assert "bad" not in q.adapter_names
    # NaN / Inf refused when attached, naming the adapter (a review: accepted, then every forward of
    # the model failed without naming the layer or adapter)
    for bad_a in (torch.full((4, k), float("inf")), torch.full((4, k), float("nan"))):
        with pytest.raises(ValueError, match="'bad': A or B contains NaN or Inf"):
            q.add_adapter("bad", bad_a, torch.randn(n, 4))
    assert "bad" not in q.adapter_names
    q.add_lora("p", pq.LoRA(A1.numpy(), B1.numpy(), alpha=8))
    assert torch.allclose(q(x), base + t1, atol=1e-5)


def test_quantize_model_mlp(capsys):
    torch.manual_seed(3)
    m = _MLP()
    m.odd = nn.Linear(33, 4)  # in_features 33 fits no 32-block: skipped with a warning
    x = torch.randn(6, 64)
    ref = m(x)
    with pytest.warns(UserWarning, match="odd"):
        s = pqt.quantize_model(m, "q8_0", exclude=["head"], verbose=True)
    assert s["quantized"] == ["fc1", "fc2"] and list(s["skipped"]) == ["odd"]
    assert isinstance(m.fc1, pqt.QuantLinear) and isinstance(m.head, nn.Linear) and isinstance(m.odd, nn.Linear)
    assert s["bytes_before"] == (64 * 96 + 96 + 96 * 32 + 32) * 4
    assert s["bytes_after"] == (96 * 64 + 32 * 96) // 32 * 34 + (96 + 32) * 4
    assert "fc1" in capsys.readouterr().out
    assert (m(x) - ref).abs().max() < 0.05  # q8_0 is close to the float model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s2 = pqt.quantize_model(m, "q4_0", include="head")
    assert s2["quantized"] == ["head"]
    with pytest.raises(ValueError):
        pqt.quantize_model(m, "q9_9")


def check_adapter_grads(q, k, n, r, alpha, seed, tol):
    """Attach a trainable rank-r adapter "t" to q and check q's gradients (x, A, B) against autograd
    on the float reference x @ W.T + bias + alpha/r (x A^T) B^T (W = q.dequantize()). Returns
    x, dy, A0, B0, the x q differentiated (xq) and the reference output yr."""
    torch.manual_seed(seed)
    A0, B0 = torch.randn(r, k) * 0.1, torch.randn(n, r) * 0.1
    q.add_adapter("t", A0, B0, alpha=alpha, trainable=True)
    x = torch.randn(2, 5, k)
    xq = x.clone().requires_grad_()
    dy = torch.randn(2, 5, n)
    (q(xq) * dy).sum().backward()
    w = q.dequantize()
    A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    yr = xr @ w.T + q.bias + (alpha / r) * (xr @ A.T) @ B.T
    (yr * dy).sum().backward()
    for got, want in ((xq.grad, xr.grad), (q.lora_A["t"].grad, A.grad), (q.lora_B["t"].grad, B.grad)):
        assert torch.allclose(got, want, rtol=tol, atol=tol)
    return x, dy, A0, B0, xq, yr


def test_qlora_gradients_match_float_reference():
    k, n, r = 64, 24, 4
    lin = _lin(k, n)
    q = pqt.QuantLinear.from_linear(lin, "nf4", compute="float")
    x, dy, A0, B0, xq, _ = check_adapter_grads(q, k, n, r, alpha=16, seed=5, tol=1e-5)
    assert q.qdata.requires_grad is False and q.lora_A["t"].requires_grad
    # pyqkern.lora.backward's math (computed with torch's matmul here, NumPy's there)
    dx, dA, dB = pq.lora.backward(x.numpy(), dy.numpy(), q.qtensor(), pq.LoRA(A0.numpy(), B0.numpy(), alpha=16))
    np.testing.assert_allclose(xq.grad.numpy(), dx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.lora_A["t"].grad.numpy(), dA, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.lora_B["t"].grad.numpy(), dB, rtol=1e-5, atol=1e-6)


def test_backward_weight_chunks(monkeypatch):
    """dy @ W with W dequantized in row chunks (large layers) equals the one-shot product."""
    q = pqt.QuantLinear.from_linear(_lin(64, 40), "q4_0", compute="float")
    x = torch.randn(6, 64, requires_grad=True)
    dy = torch.randn(6, 40)
    (q(x) * dy).sum().backward()
    whole = x.grad.clone()
    monkeypatch.setattr(pqt, "_BWD_CHUNK", 64 * 7)  # 7 rows per chunk: 6 chunks, the last one short
    x.grad = None
    (q(x) * dy).sum().backward()
    assert torch.allclose(x.grad, whole, rtol=1e-6, atol=1e-6)
    assert torch.allclose(whole, dy @ q.dequantize(), rtol=1e-6, atol=1e-6)


def test_qlora_multi_adapter_grads_and_training_step():
    k, n = 64, 16
    q = pqt.QuantLinear.from_linear(_lin(k, n), "q4_0", compute="float")
    torch.manual_seed(6)
    q.add_adapter("a", torch.randn(2, k) * 0.1, torch.randn(n, 2) * 0.1, trainable=True)
    q.add_adapter("b", torch.randn(3, k) * 0.1, torch.randn(n, 3) * 0.1, alpha=6, trainable=True)
    x = torch.randn(6, k)
    ids = torch.tensor([0, 1, -1, 1, 0, 0])
    (q(x, adapter_ids=ids) ** 2).sum().backward()
    w = q.dequantize()
    ref = {nm: (q.lora_A[nm].detach().clone().requires_grad_(), q.lora_B[nm].detach().clone().requires_grad_())
           for nm in ("a", "b")}
    y = x @ w.T + q.bias
    y = y + torch.where((ids == 0)[:, None], (x @ ref["a"][0].T) @ ref["a"][1].T, torch.zeros(()))
    y = y + torch.where((ids == 1)[:, None], 2.0 * (x @ ref["b"][0].T) @ ref["b"][1].T, torch.zeros(()))
    (y ** 2).sum().backward()
    for nm in ("a", "b"):
        assert torch.allclose(q.lora_A[nm].grad, ref[nm][0].grad, atol=1e-5)
        assert torch.allclose(q.lora_B[nm].grad, ref[nm][1].grad, atol=1e-5)
    # a few optimizer steps reduce a regression loss; the quantized weight stays unchanged
    before = q.qdata.clone()
    q.set_adapter("a")
    opt = torch.optim.SGD([q.lora_A["a"], q.lora_B["a"]], lr=0.05)
    target = torch.randn(6, n)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = ((q(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(q.qdata, before)


def test_qlora_compiled_backward():
    q = pqt.QuantLinear.from_linear(_lin(64, 16), "q8_0", compute="float")
    q.add_adapter("a", torch.randn(2, 64) * 0.1, torch.randn(16, 2) * 0.1, trainable=True)
    x = torch.randn(3, 64)
    (q(x) ** 2).sum().backward()
    g_eager = q.lora_A["a"].grad.clone()
    q.lora_A["a"].grad = None
    cq = torch.compile(q, backend="aot_eager", fullgraph=True)
    (cq(x) ** 2).sum().backward()
    assert torch.equal(q.lora_A["a"].grad, g_eager)
    torch._dynamo.reset()


def _run(q, x, bias_grad, x_grad, **kw):
    """forward + backward of (q(x) * fixed dy).sum(): (y, grad_fn name, x.grad, bias.grad, adapter grads)"""
    for p in [*q.parameters(), q.bias]:
        p.grad = None
    x = x.detach().clone().requires_grad_(x_grad)
    q.bias.requires_grad_(bias_grad)
    y = q(x, **kw)
    dy = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype)
    (y * dy).sum().backward()
    grads = [p.grad for nm, p in sorted(q.named_parameters()) if nm.startswith("lora")]
    fn = y.grad_fn
    if type(fn).__name__ == "ToCopyBackward0":  # the float32 product cast back to x's dtype
        fn = fn.next_functions[0][0]
    return y.detach(), type(fn).__name__, x.grad, q.bias.grad, grads


@pytest.mark.parametrize("case", ["plain", "adapter", "ids", "bf16", "int8", "act_order"])
def test_eager_path_equals_custom_ops(case, monkeypatch):
    """QuantLinear in eager mode calls the ops' bodies through one autograd.Function instead of
    the custom ops (whose dispatch and autograd wrapper cost ~0.5 ms per call): the same outputs
    and gradients bit for bit (x without a gradient too), with the ops' path forced for the reference; under the profiler
    the ops run (their names in the trace)."""
    torch.manual_seed(1)
    k, n = 128, 24
    compute = "int8" if case == "int8" else "float"
    if case == "act_order":
        lin = _lin(k, n)
        X = torch.randn(256, k) * torch.linspace(0.1, 3, k)
        qt = pq.gptq.quantize(lin.weight.detach().numpy(), X=X.numpy(), format="int4", group_size=32,
                              act_order=True)
        assert qt.perm is not None
        q = pqt.QuantLinear.from_qtensor(qt, lin.bias, compute=compute)
    else:
        q = pqt.QuantLinear.from_linear(_lin(k, n), "q4_0", compute=compute)
    kw = {}
    if case != "plain":
        q.add_adapter("a", torch.randn(4, k) * 0.1, torch.randn(n, 4) * 0.1, alpha=8, trainable=True)
    if case == "ids":
        q.add_adapter("b", torch.randn(2, k) * 0.1, torch.randn(n, 2) * 0.1, trainable=True)
        kw["adapter_ids"] = torch.tensor([1, -1, 0, 1, 0])
    x = torch.randn(5, k, dtype=torch.bfloat16 if case == "bf16" else torch.float32)
    for bias_grad, x_grad in ((True, True), (False, True), (True, False)):
        eager = _run(q, x, bias_grad, x_grad, **kw)
        assert eager[1] == "_EagerProductBackward"
        with torch.no_grad():
            assert torch.equal(q(x, **kw), eager[0])
        monkeypatch.setattr(pqt, "_eager", lambda x, tensors: False)
        ops = _run(q, x, bias_grad, x_grad, **kw)
        monkeypatch.undo()
        assert ops[1] != eager[1]
        assert torch.equal(ops[0], eager[0]) and ops[0].dtype == x.dtype
        if x_grad:
            assert torch.equal(ops[2], eager[2]) and ops[2].dtype == x.dtype
        else:  # the eager backward skips dy @ W then
            assert ops[2] is None and eager[2] is None
        assert (ops[3] is None) == (eager[3] is None) == (not bias_grad)
        if bias_grad:
            assert torch.equal(ops[3], eager[3])
        assert len(ops[4]) == len(eager[4]) == {"plain": 0, "ids": 4}.get(case, 2)
        for a, b in zip(ops[4], eager[4]):
            assert torch.equal(a, b)
    with torch.profiler.profile() as prof:
        q(x, **kw)
    names = {e.key for e in prof.key_averages()}
    assert ("pyqkern::matmul" if case == "plain" else "pyqkern::matmul_lora") in names


def test_inference_int8_route_equals_matmul(monkeypatch):
    """The eager inference call takes the int8 kernel without pq.matmul's argument handling
    (_int8_rows, or after a first call the plan it kept) where that is all matmul would do: the same bits as pq.matmul for 1-, 2- and 3-D
    x, with and without a bias, a bf16 x and a bias made a Parameter; matmul itself still runs
    (and raises its errors) for a wrong K, compute="float" and an act-order permutation."""
    torch.manual_seed(3)
    k, n = 96, 40
    lin = _lin(k, n)
    q = pqt.QuantLinear.from_linear(lin, "q4_0")
    qt = pqt.qtensor_from_tensor(q.qdata, q.format, n, k, q.group, q.sym)
    b = q.bias.numpy()
    calls = []
    real = pqt._int8_rows
    monkeypatch.setattr(pqt, "_int8_rows", lambda *a: calls.append(1) or real(*a))
    planned = pqt.QuantLinear._planned  # the same kernel call, from the plan a call before kept

    def counted(self, *a):
        y = planned(self, *a)
        if y is not None:
            calls.append(1)
        return y

    monkeypatch.setattr(pqt.QuantLinear, "_planned", counted)
    with torch.inference_mode():
        for shape in ((k,), (3, k), (2, 5, k), (0, k)):
            x = torch.randn(*shape)
            want = pq.matmul(x.numpy(), qt, b)
            got = q(x)
            assert got.shape == want.shape and np.array_equal(got.numpy(), want)
        xb = torch.randn(4, k, dtype=torch.bfloat16)
        got = q(xb)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, torch.from_numpy(pq.matmul(xb.float().numpy(), qt, b)).to(torch.bfloat16))
        nobias = pqt.QuantLinear.from_linear(_lin(k, n, bias=False), "q4_0")
        x = torch.randn(3, k)
        qt2 = pqt.qtensor_from_tensor(nobias.qdata, nobias.format, n, k, nobias.group, nobias.sym)
        assert np.array_equal(nobias(x).numpy(), pq.matmul(x.numpy(), qt2))
        assert len(calls) == 6
        q.bias = nn.Parameter(q.bias.detach().clone() + 1, requires_grad=False)  # no longer a buffer
        assert "bias" not in q._buffers
        assert np.array_equal(q(x).numpy(), pq.matmul(x.numpy(), qt, b + 1))
        assert len(calls) == 7
        with pytest.raises(ValueError, match="x has K=95 but the weight has K=96"):
            q(torch.randn(2, k - 1))
        qf = pqt.QuantLinear.from_linear(lin, "q4_0", compute="float")
        assert np.array_equal(qf(x).numpy(), pq.matmul(x.numpy(), qt, b, compute="float"))
        X = torch.randn(256, k) * torch.linspace(0.1, 3, k)
        qp = pq.gptq.quantize(lin.weight.detach().numpy(), X=X.numpy(), format="int4", group_size=32, act_order=True)
        assert np.array_equal(pqt.QuantLinear.from_qtensor(qp, lin.bias)(x).numpy(),
                              pq.matmul(x.numpy(), qp, lin.bias.detach().numpy()))
        assert len(calls) == 8  # the act-order layer: x permuted by the module, then the same route
        # misaligned float32 x and bias (torch.frombuffer at an odd offset): matmul's copy, as before
        xm = torch.frombuffer(bytearray(4 * k + 8), dtype=torch.float32, offset=1, count=k).reshape(1, k)
        xm.copy_(torch.randn(1, k))
        assert np.array_equal(q(xm).numpy(), pq.matmul(xm.clone().numpy(), qt, b + 1))
        bm = torch.frombuffer(bytearray(4 * n + 8), dtype=torch.float32, offset=1, count=n)
        bm.copy_(torch.from_numpy(b))
        q.bias = nn.Parameter(bm, requires_grad=False)  # a Parameter since the swap above
        assert np.array_equal(q(x).numpy(), pq.matmul(x.numpy(), qt, b))
        assert len(calls) == 8


def test_frozen_adapter_cached_until_changed():
    """A served (frozen) adapter's kernel operands are built once and kept on its B tensor, keyed
    by storage, shape, dtype and version: the same bits as pq.matmul with a fresh LoRA before and
    after an in-place change of A or B (which makes a new one); a trainable adapter is built per
    call and nothing is kept on it."""
    torch.manual_seed(4)
    k, n, r = 64, 48, 8
    q = pqt.QuantLinear.from_linear(_lin(k, n), "q4_0")
    qt = pqt.qtensor_from_tensor(q.qdata, q.format, n, k, q.group, q.sym)
    b = q.bias.numpy()
    A, B = torch.randn(r, k) * 0.1, torch.randn(n, r) * 0.1
    q.add_adapter("a", A, B, alpha=16)
    x = torch.randn(3, k)

    def want():
        Ap, Bp = q.lora_A["a"].detach().numpy(), q.lora_B["a"].detach().numpy()
        return pq.matmul(x.numpy(), qt, b, lora=pq.LoRA(Ap.copy(), Bp.copy(), alpha=16))

    with torch.inference_mode():
        y1 = q(x)
    assert np.array_equal(y1.numpy(), want())
    cached = pqt._kept_lora(q.lora_B["a"])
    with torch.no_grad():
        q(x)
        assert pqt._kept_lora(q.lora_B["a"]) is cached  # a hit: not rebuilt
        q.lora_A["a"].mul_(2)
        y2 = q(x)
        assert pqt._kept_lora(q.lora_B["a"]) is not cached
        assert np.array_equal(y2.numpy(), want()) and not torch.equal(y1, y2)
        q.lora_B["a"].copy_(torch.randn(n, r))
        assert np.array_equal(q(x).numpy(), want())
        for _ in range(3):  # a new A of the same shape (it may take the freed one's address)
            q.lora_A["a"] = nn.Parameter(torch.randn(r, k) * 0.1, requires_grad=False)
            assert np.array_equal(q(x).numpy(), want())
        for _ in range(5):  # .data replaced twice between calls (the second may reuse the first's memory)
            for nm, shape in (("lora_B", (n, r)), ("lora_A", (r, k))):
                getattr(q, nm)["a"].data = torch.randn(*shape) * 0.1
                getattr(q, nm)["a"].data = torch.randn(*shape) * 0.1
                assert np.array_equal(q(x).numpy(), want())
    with torch.no_grad():  # .data edits bypass the version counters: seen after drop_packed()
        q.lora_B["a"].data.mul_(3)
        q.lora_A["a"].data.mul_(0.5)
        assert np.array_equal(q(x).numpy(), y_before := q(x).numpy())
        q.drop_packed()
        assert np.array_equal(q(x).numpy(), want()) and not np.array_equal(y_before, want())
        q.lora_A["a"].data[0, 0] = float("nan")
        q.drop_packed()
        with pytest.raises(ValueError, match="NaN or Inf"):
            q(x)
    buf = io.BytesIO()  # nothing of the caches travels with the tensors
    torch.save(dict(q.named_parameters()), buf)
    torch.save(q.state_dict(keep_vars=True), buf2 := io.BytesIO())
    for b_ in (buf, buf2):
        b_.seek(0)
        assert torch.load(b_, weights_only=True).keys()
    t = pqt.QuantLinear.from_linear(_lin(k, n), "q4_0")
    t.add_adapter("a", A, B, alpha=16, trainable=True)
    with torch.no_grad():
        t(x)
    assert pqt._kept_lora(t.lora_B["a"]) is None
    with torch.inference_mode():  # adapters made in inference mode have no version counter: no cache
        s = pqt.QuantLinear.from_linear(_lin(k, n), "q4_0")
        s.add_adapter("a", A, B, alpha=16)
        y0 = s(x)
        sd = dict(s.state_dict())
        sd["lora_B.a"] = B * 5
        s.load_state_dict(sd)
        assert not torch.equal(s(x), y0) and pqt._kept_lora(s.lora_B["a"]) is None


def test_inference_plan_follows_every_change():
    """The eager inference call keeps a plan (the QTensor, the bias, the adapters' kernel
    arguments) and reuses it while what it was made from is unchanged: after every change below
    the next two calls (one may keep a new plan, the next uses it) give pq.matmul's bits for the
    layer as it is then; calls that record a graph do not use it; pickling leaves it behind."""
    import copy

    torch.manual_seed(7)
    k, n, r = 64, 48, 4
    q = pqt.QuantLinear.from_linear(_lin(k, n), "q4_0")
    q.add_adapter("a", torch.randn(r, k) * 0.1, torch.randn(n, r) * 0.1, alpha=8)
    q.add_adapter("b", torch.randn(2 * r, k) * 0.1, torch.randn(n, 2 * r) * 0.1, alpha=4, active=False)
    x = torch.randn(2, k)

    def want(mod=q):
        qt = pqt.qtensor_from_tensor(mod.qdata, mod.format, n, k, mod.group, mod.sym)
        ads = [pq.LoRA(mod.lora_A[nm].detach().float().numpy().copy(), mod.lora_B[nm].detach().float().numpy().copy(),
                       alpha=mod._alphas[nm][0]) for nm in mod.active_adapters]
        b = None if mod.bias is None else mod.bias.detach().float().numpy()
        return torch.from_numpy(pq.matmul(x.numpy(), qt, b, lora=ads or None, compute=mod.compute))

    def check(mod=q, planned=True):
        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(mod(x), want(mod))
        assert ("_plan" in mod.__dict__) == planned

    check()
    with torch.no_grad():
        q.qdata.copy_(pqt.QuantLinear.from_linear(_lin(k, n, seed=1), "q4_0").qdata)
        check()
        q.bias.add_(1)
        check()
        q.lora_A["a"].mul_(2)
        check()
        q.lora_B["a"].data = torch.randn(n, r)
        check()
        q.lora_A["a"] = nn.Parameter(torch.randn(r, k), requires_grad=False)
        check()
    for active in (["a", "b"], [], ["b"]):
        q.set_adapter(active)
        check()
    q.remove_adapter("a")
    check()
    q.add_adapter("a", torch.randn(r, k), torch.randn(n, r), alpha=2)
    check()
    q._scales = {**q._scales, "a": 0.0}  # as load_state_dict rebuilds them
    q._alphas["a"] = (0.0, False)
    check()
    pqt.qtensor_from_tensor(q.qdata, q.format, n, k, q.group, q.sym).release_packed()
    check()
    q.compute = "float"
    check(planned=False)
    q.compute = "int8"
    check()
    q.lora_B["a"].requires_grad_(True)  # trainable now: the call records a graph, no plan
    y = q(x)
    assert y.grad_fn is not None and torch.equal(y.detach(), want())
    q.lora_B["a"].requires_grad_(False)
    check()
    assert q(x.requires_grad_()).grad_fn is not None
    x.requires_grad_(False)
    blob = io.BytesIO()
    torch.save(q, blob)
    blob.seek(0)
    q2 = torch.load(blob, weights_only=False)
    assert "_plan" not in q2.__dict__
    check(q2)
    q3 = copy.deepcopy(q)
    with torch.no_grad():
        q3.bias.add_(5)
    check(q3)
    check()
    q.load_state_dict(q3.state_dict())
    check()
    q.to(torch.bfloat16)
    assert "_plan" not in q.__dict__
    check()
    with torch.no_grad():
        q.bias.add_(1)  # bf16: a float32 copy in the plan, remade for the new version
    check()
    with torch.no_grad():
        q.bias.data.add_(1)  # bf16: converted per call, so even a write the version does not see
    check()
    q.drop_packed()
    assert "_plan" not in q.__dict__
    q.float()
    with torch.no_grad():  # .data swaps with the same address and shape, new strides (a review)
        q.lora_A["a"].data = q.lora_A["a"].data.view(k, r).t()
        check()
        q.bias.data = q.bias.data[:1].expand(n)
        check()


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_frozen_16bit_adapter_read_in_16_bits(dt):
    """A frozen bf16 / fp16 adapter (a module cast with .to(dtype)) is kept for the kernels in its
    own 16 bits (half the bytes of the float32 copy): the same bits as float32 storage of the same
    values, with one adapter and with two summed on every row."""
    torch.manual_seed(5)
    k, n = 128, 77  # a partial last tile of B
    q = pqt.QuantLinear.from_linear(_lin(k, n), "q4_0")
    for nm, r in (("a", 16), ("b", 6)):
        q.add_adapter(nm, torch.randn(r, k) * 0.1, torch.randn(n, r) * 0.1, alpha=2 * r)
    x = torch.randn(3, k)
    with torch.no_grad():
        q(x)  # kept in float32 storage ...
    assert pqt._kept_lora(q.lora_B["a"]).storage == "float32"
    q.to(dt)  # ... and dropped with the old values
    assert pqt._kept_lora(q.lora_B["a"]) is None
    qt = pqt.qtensor_from_tensor(q.qdata, q.format, n, k, q.group, q.sym)
    b = q.bias.float().numpy()
    ads = {}
    for nm, r in (("a", 16), ("b", 6)):
        assert q.lora_A[nm].dtype == q.lora_B[nm].dtype == dt
        ads[nm] = pq.LoRA(q.lora_A[nm].detach().float().numpy(), q.lora_B[nm].detach().float().numpy(),
                          alpha=2 * r, storage="float32")
    x = torch.randn(3, k)
    for active in (["a"], ["a", "b"]):
        q.set_adapter(active)
        with torch.no_grad():
            y = q(x)
        for nm in active:
            kept = pqt._kept_lora(q.lora_B[nm])  # the kernels' operands alone, as many bytes as the adapter's
            assert kept.storage == {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dt] and kept.A is None
            assert kept._native[0].nbytes == q.lora_A[nm].nbytes
        assert np.array_equal(y.numpy(), pq.matmul(x.numpy(), qt, b, lora=[ads[nm] for nm in active]))


def test_eager_path_edges_from_review():
    """From a review of the eager path: a vectorized jacobian (the backward under the legacy vmap,
    where the bodies' detach has no batching rule: the ops run there), no graph under
    inference_mode even with enable_grad, and a weight edited before backward is an error even
    when only the bias wants a gradient (as on the ops' path)."""
    torch.manual_seed(2)
    q = pqt.QuantLinear.from_linear(_lin(64, 32), "q4_0")
    x = torch.randn(2, 64)
    jv = torch.autograd.functional.jacobian(q, x, vectorize=True)
    j = torch.autograd.functional.jacobian(q, x)
    assert jv.shape == (2, 32, 2, 64) and torch.equal(jv, j)
    xr = x.clone().requires_grad_()
    y = q(xr)
    v = torch.randn(3, *y.shape)
    gb, = torch.autograd.grad(y, xr, v, is_grads_batched=True)
    for i in range(3):
        assert torch.equal(gb[i], torch.autograd.grad(q(xr), xr, v[i])[0])
    with torch.inference_mode(), torch.enable_grad():
        y = q(xr)
    assert not y.requires_grad and y.grad_fn is None
    q.bias.requires_grad_(True)
    y = q(x)
    assert type(y.grad_fn).__name__ == "_EagerProductBackward"
    q.qdata.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
