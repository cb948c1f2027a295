"""pyqkern.torch on models and modes a review found mishandled: layers torch reads directly,
Linear subclasses, reused modules, inference mode, overlapping threads() blocks, the custom op's
adapter lists, and GPTQ arguments that were silently ignored."""
import threading
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import pyqkern as pq  # noqa: E402
import pyqkern.gptq  # noqa: E402,F401
import pyqkern.torch as pqt  # noqa: E402
from torch import nn  # noqa: E402


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn(*a, **kw)
    return out, [str(x.message) for x in w]


def test_transformer_layers_keep_working_in_eval():
    """nn.TransformerEncoderLayer's fused eval path reads linear1.weight: those two layers are
    skipped (like MultiheadAttention's out_proj), so the model still runs; calibration too."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2).eval()
    x = torch.randn(2, 5, 64)
    summary, msgs = _quiet(pqt.quantize_model, enc, "q8_0")
    assert not summary["quantized"] and any("linear1" in m for m in msgs)
    with torch.no_grad():
        enc(x)
    enc2 = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 1).train()
    _quiet(pqt.quantize_model, enc2, "q8_0", calib=[x])
    enc2.eval()
    with torch.no_grad():
        enc2(x)


def test_linear_subclass_with_own_forward_and_reused_module_are_skipped():
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 10

    class Plain(nn.Linear):  # a subclass without its own forward is a Linear as far as we care
        pass

    shared = nn.Linear(32, 32)
    m = nn.Sequential(Scaled(32, 32), Plain(32, 32), shared, nn.ReLU(), shared)
    summary, msgs = _quiet(pqt.quantize_model, m, "q8_0")
    assert summary["quantized"] == ["1"]
    assert type(m[0]) is Scaled and m[2] is shared and m[4] is shared
    assert any("own forward" in s for s in msgs) and any("also reached as 4" in s for s in msgs)


def test_unfit_int8_layer_is_skipped_before_anything_is_replaced():
    m = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))  # K = 48: no int8 kernels
    summary, msgs = _quiet(pqt.quantize_model, m, "q8_0", compute="int8")
    assert summary["quantized"] == ["0"] and "2" in summary["skipped"]
    assert type(m[2]) is nn.Linear


def test_new_layers_keep_the_model_mode():
    for calib in (None, [torch.randn(3, 64)]):
        m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
        pqt.quantize_model(m, "q8_0", calib=calib)
        assert not any(mod.training for mod in m.modules())
        m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).train()
        pqt.quantize_model(m, "q8_0", calib=calib)
        assert all(mod.training for mod in m.modules())


def test_inference_mode():
    """Inference tensors keep no version counter (reading it raised): QuantLinear built, loaded
    and run under torch.inference_mode."""
    torch.manual_seed(1)
    lin = nn.Linear(64, 32)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        q = pqt.QuantLinear.from_linear(lin, "q4_0")
        y = q(x)
    q2 = pqt.QuantLinear.from_linear(lin, "q4_0")
    assert torch.equal(y, q2(x))
    with torch.inference_mode():
        sd = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in q2.state_dict().items()}
    q3 = pqt.QuantLinear.from_linear(nn.Linear(64, 32), "q4_0")
    q3.load_state_dict(sd, assign=True)
    with torch.inference_mode():
        assert torch.equal(q3(x), y)


def test_load_state_dict_under_inference_mode_leaves_a_trainable_module():
    """The tensors load_state_dict makes (a resized qdata, a bias, adapter parameters) were made
    inside inference_mode, so inference tensors: backward and a second load failed afterwards"""
    torch.manual_seed(2)
    src = pqt.QuantLinear.from_linear(nn.Linear(64, 32), "q8_0")
    src.add_adapter("a", torch.randn(4, 64) * 0.1, torch.randn(32, 4) * 0.1)
    q = pqt.QuantLinear.from_linear(nn.Linear(64, 32, bias=False), "q4_0")   # other qdata size, no bias
    with torch.inference_mode():
        q.load_state_dict(src.state_dict())
    assert not any(t.is_inference() for t in list(q.parameters()) + list(q.buffers()))
    q.lora_A["a"].requires_grad_(True)
    x = torch.randn(3, 64)
    q(x).sum().backward()
    assert q.lora_A["a"].grad is not None
    q.load_state_dict(src.state_dict())
    assert torch.equal(q(x), src(x))


def test_partial_load_keeps_adapters_the_state_does_not_name():
    """load_state_dict(strict=False) of a state without adapter "a" replaced the alphas wholesale:
    "a" kept its weights but lost its alpha (state_dict() and adapter_ids then raised KeyError);
    and it silently stopped being active (a later review): it stays active, as it was."""
    torch.manual_seed(3)
    lin = nn.Linear(64, 48)
    q = pqt.QuantLinear.from_linear(lin, "q8_0", compute="float")
    q.add_adapter("a", torch.randn(4, 64) * 0.1, torch.randn(48, 4) * 0.1)
    res = q.load_state_dict(pqt.QuantLinear.from_linear(lin, "q8_0", compute="float").state_dict(), strict=False)
    assert sorted(res.missing_keys) == ["lora_A.a", "lora_B.a"] and q.adapter_names == ["a"]
    q2 = pqt.QuantLinear.from_linear(lin, "q8_0", compute="float")
    q2.load_state_dict(q.state_dict())                      # saves and loads again
    x = torch.randn(2, 64)
    assert torch.equal(q2(x, adapter_ids=[0, -1]), q(x, adapter_ids=[0, -1]))
    assert q.active_adapters == ["a"] and torch.equal(q(x, adapter_ids=[0, 0]), q(x))  # still active
    assert not torch.equal(q(x, adapter_ids=[-1, -1]), q(x))


def test_refused_load_leaves_the_layer_as_it_was():
    """Review: a state for another shape (ValueError from the extra state) or, in a strict load,
    only another format's qdata was refused after qdata had been resized for it: every forward
    failed afterwards. Both are now refused before anything changes, as torch's size errors are."""
    torch.manual_seed(4)
    lin = nn.Linear(64, 64)
    q = pqt.QuantLinear.from_linear(lin, "q8_0", compute="float")
    x = torch.randn(2, 64)
    want = q(x)
    other = pqt.QuantLinear.from_linear(nn.Linear(64, 32), "q4_1").state_dict()
    with pytest.raises(RuntimeError, match=r"state is for \[32, 64\] but this layer is \[64, 64\]"):
        q.load_state_dict(other)
    assert torch.equal(q(x), want)
    q41 = pqt.QuantLinear.from_linear(lin, "q4_1").state_dict()
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="does not hold a q8_0"):
            q.load_state_dict({"qdata": q41["qdata"]}, strict=strict)
        assert torch.equal(q(x), want)
    bare = pqt.QuantLinear.from_linear(nn.Linear(64, 64, bias=False), "q8_0")
    for key, bad in (("bias", torch.zeros(8)), ("perm", torch.arange(8))):  # were created, then refused
        with pytest.raises(RuntimeError, match=f"{key} of shape"):
            bare.load_state_dict({**bare.state_dict(), key: bad})
        assert getattr(bare, key) is None
    q.load_state_dict(q41)  # the whole state of another format still loads
    assert q.format == "q4_1" and torch.equal(q(x), pqt.QuantLinear.from_linear(lin, "q4_1")(x))


def test_tied_weights_are_skipped():
    """A head whose weight is the embedding's was quantized silently: the float tensor stayed in the
    embedding and a quantized copy was added (the summary claimed bytes saved)"""
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(128, 64)
            self.mid = nn.Linear(64, 64)
            self.head = nn.Linear(64, 128, bias=False)
            self.head.weight = self.emb.weight

    m = LM()
    with pytest.warns(UserWarning, match="head: its weight is tied to emb.weight"):
        summary = pqt.quantize_model(m, "q8_0")
    assert summary["quantized"] == ["mid"] and "head" in summary["skipped"]
    assert m.head.weight is m.emb.weight


def test_threads_blocks_overlapping_in_two_python_threads_restore_the_counts():
    before = (torch.get_num_threads(), pq.get_num_threads())
    try:
        torch.set_num_threads(2)
        pq.set_num_threads(2)
        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

        def req_a():
            with pqt.threads(pyqkern_threads=1):
                a_in.set()
                b_in.wait(10)
            a_out.set()

        def req_b():
            a_in.wait(10)
            with pqt.threads():
                b_in.set()
                a_out.wait(10)

        ts = [threading.Thread(target=req_a), threading.Thread(target=req_b)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert pq.get_num_threads() == 2
        with pqt.threads(pyqkern_threads=1):  # nested in one thread: the inner restores the outer's
            with pqt.threads(pyqkern_threads=2):
                assert pq.get_num_threads() == 2
            assert pq.get_num_threads() == 1
        assert pq.get_num_threads() == 2
    finally:
        torch.set_num_threads(before[0])
        pq.set_num_threads(before[1])


def test_matmul_lora_op_needs_one_of_each_per_adapter():
    lin = pqt.QuantLinear.from_linear(nn.Linear(32, 16), "q8_0")
    x = torch.randn(2, 32)
    A = torch.randn(4, 32)
    with pytest.raises(ValueError, match="one of each"):  # B missing: the adapter was once dropped silently
        torch.ops.pyqkern.matmul_lora(x, lin.qdata, "q8_0", 16, 32, 0, 0, None, [A], [], [1.0], None, "float")


def test_gptq_refuses_bad_damp_and_ignored_options():
    rng = np.random.default_rng(3)
    g = pq.gptq.GPTQ(rng.standard_normal((16, 64)).astype(np.float32))
    g.add_batch(rng.standard_normal((32, 64)).astype(np.float32))
    for d in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="damp"):
            g.quantize(format="q4_0", damp=d)
    with pytest.raises(ValueError, match="fixed blocks"):
        g.quantize(format="q4_0", group_size=128)
    with pytest.raises(ValueError, match="fixed blocks"):
        g.quantize(format="q8_0", sym=True)
    assert g.quantize(format="q4_0", damp=0.0).format == "q4_0"


def test_calibrated_nf4_with_double_quant():
    """quantize_model(format="nf4", double_quant=True, calib=...) once always failed (it passed
    double_quant to GPTQ.quantize, which has no such option): the absmax of GPTQ's result is
    double-quantized, as pq.quantize does, and the summary's GPTQ error is that layer's."""
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(64, 64))
    x = torch.randn(32, 64)
    with torch.no_grad():
        want = m(x)
    s, _ = _quiet(pqt.quantize_model, m, "nf4", double_quant=True, calib=[x])
    assert m[0].format == "nf4:dq" or "double_quant" in repr(m[0])
    assert s["gptq"]["0"]["gptq"] < s["gptq"]["0"]["rtn"]
    with torch.no_grad():
        assert torch.allclose(m(x), want, atol=0.5)


def test_patterns_naming_a_parent_cover_its_children():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Sequential(nn.Linear(32, 32))
            self.mlp = nn.Linear(32, 32)

    def model():
        m = nn.Module()
        m.layers = nn.ModuleList([Block(), Block()])
        return m

    for kw, want in [({"exclude": ["*.attn"]}, ["layers.0.mlp", "layers.1.mlp"]),
                     ({"exclude": ["layers.*.attn"]}, ["layers.0.mlp", "layers.1.mlp"]),
                     ({"include": ["*.attn"]}, ["layers.0.attn.0", "layers.1.attn.0"]),
                     ({"include": ["layers.0"]}, ["layers.0.attn.0", "layers.0.mlp"])]:
        assert sorted(pqt.quantize_model(model(), "q8_0", **kw)["quantized"]) == want, kw


def test_gptq_bits_override_compares_with_rtn_in_the_same_format():
    """gptq={"bits": 3} on format="int4" installs int3: the summary's round-to-nearest figure is
    int3's too (it was int4's, a comparison across formats)."""
    torch.manual_seed(3)
    x = torch.randn(64, 64)
    base = nn.Sequential(nn.Linear(64, 64))
    m4, m3 = copy_module(base), copy_module(base)
    s4, _ = _quiet(pqt.quantize_model, m4, "int4", group=32, calib=[x])
    s3, _ = _quiet(pqt.quantize_model, m3, "int4", group=32, calib=[x], gptq={"bits": 3})
    assert m3[0].qtensor().format == "int3"
    assert s3["gptq"]["0"]["rtn"] > 1.3 * s4["gptq"]["0"]["rtn"]  # int3 rounds coarser than int4
    assert s3["gptq"]["0"]["gptq"] <= s3["gptq"]["0"]["rtn"]


def copy_module(m):
    import copy

    return copy.deepcopy(m)


def test_forward_mode_ad_is_refused_not_zero():
    """Only reverse-mode autograd is registered for the custom ops; a forward-mode tangent came
    out as zeros (jvp) or None (forward_ad). Now NotImplementedError; plain forwards inside a
    dual level without a tangent on x still run."""
    import torch.autograd.forward_ad as fwAD
    import torch.func as tf

    q = pqt.QuantLinear.from_linear(nn.Linear(64, 32), "q8_0", compute="float")
    x, v = torch.randn(3, 64), torch.randn(3, 64)
    with pytest.raises(NotImplementedError, match="forward-mode"):
        tf.jvp(q, (x,), (v,))
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode"):
            q(fwAD.make_dual(x, v))
        assert torch.equal(q(x), q.forward(x))


def test_state_dict_goes_through_safetensors():
    """QuantLinear's extra state is a uint8 tensor of JSON (a dict before, which safetensors, and
    so transformers' save_pretrained, cannot store); a dict from an older checkpoint still loads."""
    st = pytest.importorskip("safetensors.torch")
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    pqt.quantize_model(m, "q4_0")
    m[0].add_adapter("a", torch.randn(2, 64) * 0.1, torch.randn(32, 2) * 0.1, alpha=4.0)  # adapters travel too
    blob = st.save({k: v.contiguous() for k, v in m.state_dict().items()})
    m2 = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    pqt.quantize_model(m2, "q8_0")
    m2.load_state_dict(st.load(blob))
    x = torch.randn(2, 64)
    assert m2[0].format == "q4_0" and m2[0].adapter_names == ["a"] and torch.equal(m(x), m2(x))
    old = {k: v for k, v in m[2].state_dict().items() if k != "_extra_state"}
    old["_extra_state"] = {"format": "q4_0", "in_features": 32, "out_features": 16, "group": 0, "sym": 0,
                           "compute": m[2].compute, "adapters": {}, "active": []}
    m2[2].load_state_dict(old)
    assert torch.equal(m(x), m2(x))
    with pytest.raises(ValueError, match="JSON"):
        m2[2].set_extra_state(torch.tensor([255, 0], dtype=torch.uint8))


def _ref(q, x):
    return x @ q.dequantize().T + q.bias


@pytest.mark.parametrize("compute", ["int8", "float"])
def test_weight_reloaded_in_inference_mode_and_written_through_data(compute):
    """The packed copy follows qdata's version counter. An inference tensor has none: a
    load_state_dict inside torch.inference_mode used to leave forward on the old weight. Writes
    through qdata.data bypass the counter: drop_packed() makes forward see them."""
    torch.manual_seed(0)
    x = torch.randn(2, 64)
    with torch.inference_mode():
        a = pqt.QuantLinear.from_linear(nn.Linear(64, 32), "q4_0", compute=compute)
        b = pqt.QuantLinear.from_linear(nn.Linear(64, 32), "q4_0", compute=compute)
        a(x)
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x), b(x))
    a = pqt.QuantLinear.from_linear(nn.Linear(64, 32), "q4_0", compute=compute)
    a(x)
    a.qdata.data.copy_(b.qdata)
    a.bias.data.copy_(b.bias)
    a.drop_packed()
    assert torch.equal(a(x), b(x))
    torch.testing.assert_close(a(x), _ref(a, x), atol=2e-2, rtol=0)


def test_inputs_refused_like_nn_linear():
    """A module on meta called with a CPU input used to run the shape-only kernel and return
    uninitialised memory; integer and complex inputs were truncated."""
    q = pqt.QuantLinear.from_linear(nn.Linear(64, 32), "q4_0")
    with pytest.raises(RuntimeError, match="same device"):
        q.to("meta")(torch.randn(2, 64))
    q = pqt.QuantLinear.from_linear(nn.Linear(64, 32), "q4_0")
    for dt in (torch.int64, torch.complex64):
        with pytest.raises(TypeError, match="floating-point"):
            q(torch.ones(2, 64, dtype=dt))


def test_adapter_ids_are_checked_not_coerced():
    torch.manual_seed(0)
    q = pqt.QuantLinear.from_linear(nn.Linear(64, 32), "q4_0")
    q.add_adapter("a", torch.randn(4, 64), torch.randn(32, 4))
    q.add_adapter("b", torch.randn(4, 64), torch.randn(32, 4))
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="out of range"):
        q(x, adapter_ids=torch.tensor([0, 1, 2 ** 32]))
    with pytest.raises(TypeError, match="integer tensor"):
        q(x, adapter_ids=torch.tensor([0.0, 1.7, 0.5]))
    with pytest.raises(TypeError, match="ints"):
        q(x, adapter_ids=[0, 1.7, None])
    assert torch.equal(q(x, adapter_ids=torch.tensor([0, 1, -1])), q(x, adapter_ids=[0, "b", None]))


def test_quantize_model_keeps_the_layers_hooks():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    seen = []
    h = m[0].register_forward_hook(lambda mod, a, out: seen.append(type(mod).__name__))
    m[2].register_forward_pre_hook(lambda mod, a: (a[0] * 0.5,))
    grads = []
    m[2].register_full_backward_hook(lambda mod, gi, go: grads.append(go[0].shape))
    x = torch.randn(3, 64)
    y = m(x)
    pqt.quantize_model(m, "q8_0", compute="float")
    seen.clear()
    yq = m(x)
    assert seen == ["QuantLinear"]
    assert ((yq - y).norm() / y.norm()).item() < 0.02
    h.remove()  # the handle still removes it from the replacement
    m(x)
    assert seen == ["QuantLinear"]
    grads.clear()
    m(x.requires_grad_()).sum().backward()  # a full backward hook runs only with its flag carried over
    assert grads == [(3, 32)]


def test_torch_bias_and_weight_parameters_are_taken():
    """from_qtensor with the Linear's own bias (a Parameter, or bfloat16), GPTQ on a Parameter."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    qt = pq.quantize(lin.weight, "q4_0")
    for bias in (lin.bias, lin.bias.detach().bfloat16()):
        q = pqt.QuantLinear.from_qtensor(qt, bias)
        assert torch.equal(q.bias, bias.detach().float())
    X = torch.randn(128, 64, requires_grad=True)
    qt, rep = pq.gptq.quantize(lin.weight.bfloat16(), X=X, format="int4", group_size=32, report=True)
    assert qt.shape == (32, 64) and rep["gptq"] <= rep["rtn"]


def test_second_order_gradients():
    """dy @ W is linear in dy: its backward is the forward product, so create_graph=True works
    (gradient penalties, Hessian-vector products); with adapters it is refused clearly."""
    torch.manual_seed(0)
    q = pqt.QuantLinear.from_linear(nn.Linear(64, 32), "q4_0", compute="float")
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: q(t.float()).double(), (x,), eps=1e-3, atol=1e-3, rtol=1e-3)
    q.add_adapter("a", torch.randn(4, 64), torch.randn(32, 4), 8, trainable=True)
    q.set_adapter("a")
    xf = torch.randn(3, 64, requires_grad=True)
    g, = torch.autograd.grad(q(xf).pow(2).sum(), xf, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order"):
        g.pow(2).sum().backward()


# ------------------------------------------------------------------ from a user review of pyqkern.torch
def _qlin(seed=0, n=32, k=64, fmt="q4_0"):
    torch.manual_seed(seed)
    return pqt.QuantLinear.from_linear(nn.Linear(k, n), fmt)


def test_meta_tensors_among_the_inputs_are_refused_not_returned_as_garbage():
    """A meta bias (a meta skeleton loaded with assign=True from a state without bias), meta
    adapter_ids or a meta adapter sent the op to its fake kernel, which returned uninitialised CPU
    memory as the result. nn.Linear raises in that state; so does QuantLinear now."""
    src = _qlin()
    with torch.device("meta"):
        m = pqt.QuantLinear(64, 32)
    m.load_state_dict({k: v for k, v in src.state_dict().items() if k != "bias"}, assign=True, strict=False)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="same device"):
        m(x)
    q = _qlin()
    q.add_adapter("a", torch.randn(4, 64), torch.randn(32, 4))
    with pytest.raises(RuntimeError, match="same device"):
        q(x, adapter_ids=torch.tensor([0, 0], device="meta"))
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.pyqkern.matmul_lora(x, q.qdata, q.format, 32, 64, q.group, q.sym, None,
                                      [torch.randn(4, 64, device="meta")], [torch.randn(32, 4)], [1.0], None, "float")
    assert torch.isfinite(q(x)).all()


def test_adapter_state_checked_before_anything_changes():
    """A state with lora_A.a but no lora_B.a loaded "successfully" (forward then raised
    AttributeError); A of the wrong width or ranks that differ loaded too; adapter weights without
    an alpha were refused only after the parameters were made (state_dict() then raised). Each is
    now a load error (RuntimeError, as torch's size checks) and the layer stays as it was."""
    src = _qlin(1)
    src.add_adapter("a", torch.randn(4, 64), torch.randn(32, 4), alpha=8)
    full = src.state_dict()
    x = torch.randn(3, 64)
    cases = {
        "half": ({k: v for k, v in full.items() if k != "lora_B.a"}, "lora_A.a but not lora_B.a"),
        "width": (dict(full, **{"lora_A.a": torch.randn(4, 72)}), "do not fit"),
        "ranks": (dict(full, **{"lora_B.a": torch.randn(32, 3)}), "do not fit"),
        "int": (dict(full, **{"lora_A.a": torch.ones(4, 64, dtype=torch.int64)}), "floating point"),
    }
    for what, (sd, msg) in cases.items():
        m = _qlin(2)
        before = m(x)
        with pytest.raises(RuntimeError, match=msg):
            m.load_state_dict(sd)
        assert m.adapter_names == [] and torch.equal(m(x), before), what
        m.state_dict()
    # weights of an adapter the extra state does not name (no alpha)
    other = _qlin(3)
    sd = dict(other.state_dict(), **{"lora_A.b": torch.randn(2, 64), "lora_B.b": torch.randn(32, 2)})
    m = _qlin(2)
    with pytest.raises(RuntimeError, match="no alpha"):
        m.load_state_dict(sd)
    assert m.adapter_names == [] and set(m.state_dict()) == set(_qlin(2).state_dict())


def test_extra_state_of_another_format_without_its_qdata_is_refused():
    """Loading only the extra state of an int4 layer into a q4_0 one (strict=False) switched the
    format but kept the q4_0 bytes: every forward failed afterwards."""
    torch.manual_seed(4)
    lin = nn.Linear(64, 32)
    q4 = pqt.QuantLinear.from_linear(lin, "q4_0")
    i4 = pqt.QuantLinear.from_linear(lin, "int4", group=32)
    with pytest.raises(RuntimeError, match="has no qdata"):
        q4.load_state_dict({"_extra_state": i4.state_dict()["_extra_state"]}, strict=False)
    assert q4.format == "q4_0" and q4(torch.randn(2, 64)).shape == (2, 32)


def test_trainable_adapters_stay_trainable_through_state_dict():
    """A trainable adapter loaded into a fresh layer came back frozen (resuming QLoRA trained
    nothing), and one replacing an adapter of another rank too."""
    src = _qlin(5)
    src.add_adapter("t", torch.randn(4, 64) * 0.1, torch.randn(32, 4) * 0.1, trainable=True)
    src.add_adapter("f", torch.randn(2, 64) * 0.1, torch.randn(32, 2) * 0.1)
    fresh = _qlin(6)
    fresh.load_state_dict(src.state_dict())
    assert fresh.lora_A["t"].requires_grad and fresh.lora_B["t"].requires_grad
    assert not fresh.lora_A["f"].requires_grad
    # an older state without the trainable list: a parameter of another rank keeps its flag
    other = _qlin(7)
    other.add_adapter("t", torch.randn(8, 64), torch.randn(32, 8), trainable=True)
    sd = src.state_dict()
    import json
    st = json.loads(bytes(sd["_extra_state"].numpy()).decode())
    del st["trainable"]
    sd["_extra_state"] = torch.frombuffer(bytearray(json.dumps(st).encode()), dtype=torch.uint8)
    other.load_state_dict(sd, strict=False)
    assert other.lora_A["t"].shape == (4, 64) and other.lora_A["t"].requires_grad


def test_perm_in_a_state_must_be_a_permutation():
    """An all-zero perm loaded and gave silently wrong output; an out-of-range one a raw indexing
    error at forward. QTensor.with_perm already refused both; the load does now too."""
    torch.manual_seed(8)
    lin = nn.Linear(64, 32)
    w = lin.weight.detach().numpy()
    perm = np.random.default_rng(0).permutation(64)
    qt = pq.quantize(np.ascontiguousarray(w[:, perm]), "q4_0").with_perm(perm)
    good = pqt.QuantLinear.from_qtensor(qt, lin.bias.detach())
    x = torch.randn(2, 64)
    for bad in (torch.zeros(64, dtype=torch.int64), torch.arange(64) + 1, torch.arange(64).float()):
        m = pqt.QuantLinear.from_qtensor(qt, lin.bias.detach())
        with pytest.raises(RuntimeError, match="not a permutation"):
            m.load_state_dict(dict(good.state_dict(), perm=bad))
        assert torch.equal(m(x), good(x))


def test_layers_whose_parent_reads_their_weight_are_skipped():
    """T5's feed-forward reads self.wo.weight.dtype: quantize_model replaced wo and the model then
    raised AttributeError. A layer whose parent's forward reads self.<layer>.weight is skipped."""
    class FF(nn.Module):
        def __init__(self):
            super().__init__()
            self.wi, self.wo = nn.Linear(64, 128), nn.Linear(128, 64)

        def forward(self, h):
            h = torch.relu(self.wi(h))
            if h.dtype != self.wo.weight.dtype:
                h = h.to(self.wo.weight.dtype)
            return self.wo(h)

    torch.manual_seed(9)
    m = nn.Sequential(FF(), FF())
    summary, msgs = _quiet(pqt.quantize_model, m, "q8_0")
    assert sorted(summary["quantized"]) == ["0.wi", "1.wi"]
    assert set(summary["skipped"]) == {"0.wo", "1.wo"} and "reads wo.weight" in summary["skipped"]["0.wo"]
    assert m(torch.randn(2, 64)).shape == (2, 64)


def test_quantize_model_changes_nothing_when_a_layer_fails():
    """NaN in the third layer's weight raised after the first two were replaced; a meta-device
    model raised torch's raw NotImplementedError."""
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        m[2].weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"^2: .*NaN.*nothing was replaced"):
        pqt.quantize_model(m, "q4_0")
    assert [type(x) for x in m] == [nn.Linear] * 3
    with torch.device("meta"):
        mm = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="meta device"):
        pqt.quantize_model(mm, "q4_0")


def test_adapter_arguments_refused_when_given():
    q = _qlin(10)
    for alpha in (float("nan"), float("inf"), "16", True):
        with pytest.raises(ValueError, match="alpha"):
            q.add_adapter("a", torch.randn(2, 64), torch.randn(32, 2), alpha=alpha)
    assert q.adapter_names == []
    q.add_adapter("n", torch.randn(2, 64), torch.randn(32, 2), alpha=np.float32(4))
    with pytest.raises(ValueError, match="more than once"):
        q.set_adapter(["n", "n"])  # it was applied twice
    assert q.active_adapters == ["n"]


def test_func_grad_is_refused_with_what_to_use():
    """torch.func.grad / jacrev failed inside torch ("must override the setup_context
    staticmethod"); they are refused by name, and torch.autograd.grad gives the gradient."""
    q = _qlin(11, fmt="q8_0")
    x = torch.randn(3, 64)
    for tf in (torch.func.grad(lambda xx: q(xx).pow(2).sum()), torch.func.jacrev(q)):
        with pytest.raises(NotImplementedError, match="torch.autograd.grad"):
            tf(x)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(q(xr).pow(2).sum(), xr)
    assert g.shape == x.shape and torch.isfinite(g).all()
    assert torch.allclose(torch.func.vmap(q)(x.unsqueeze(1)).squeeze(1), q(x), atol=1e-6)  # vmap still runs
