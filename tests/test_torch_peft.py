"""pyqkern.torch.save_peft_adapter / load_peft_adapter against the real ``peft`` package; copying used models."""
import copy
import json

import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
import pyqkern.torch as pqt  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

ADAPTED = ["enc.q", "enc.v", "mlp.0", "mlp.2"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.ModuleDict({"q": nn.Linear(64, 64), "v": nn.Linear(64, 64, bias=False)})
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.out = nn.Linear(64, 8)

    def forward(self, x):
        h = self.enc["q"](x) * torch.sigmoid(self.enc["v"](x))
        return self.out(self.mlp(h) + h)


def _quantized(fp):
    q = copy.deepcopy(fp)
    pqt.quantize_model(q, "q4_0", exclude="out", compute="float")
    return q


def _dequantized_float(fp, q):
    """The float model with every quantized weight replaced by its dequantized value: PEFT on it
    computes what pyqkern computes."""
    d = copy.deepcopy(fp)
    for name in ADAPTED:
        d.get_submodule(name).weight.data.copy_(q.get_submodule(name).dequantize())
    return d


def _train(q, steps=3):
    torch.manual_seed(1)
    params = [p for n, p in q.named_parameters() if p.requires_grad and ".lora_" in n]  # adapters only
    opt = torch.optim.Adam(params, lr=1e-2)
    x, target = torch.randn(16, 64), torch.randn(16, 8)
    for _ in range(steps):
        opt.zero_grad()
        ((q(x) - target) ** 2).mean().backward()
        opt.step()


def test_save_loads_in_peft_with_same_outputs(tmp_path):
    fp = Net()
    q = _quantized(fp)
    for name in ADAPTED:
        mod = q.get_submodule(name)
        r = 8 if name == "mlp.0" else 4  # one layer with another rank and alpha: rank/alpha_pattern
        torch.manual_seed(hash(name) % 1000)
        mod.add_adapter("tuned", torch.randn(r, mod.in_features) * 0.1, torch.zeros(mod.out_features, r),
                        alpha=32 if name == "mlp.0" else 8, trainable=True)
    _train(q)
    assert all(q.get_submodule(n).lora_B["tuned"].abs().max() > 0 for n in ADAPTED)
    written = pqt.save_peft_adapter(q, tmp_path, base_model_name_or_path="tiny-net")
    assert written == sorted(ADAPTED)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["rank_pattern"] == {"mlp.0": 8} and cfg["alpha_pattern"] == {"mlp.0": 32}
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(sd) == {f"base_model.model.{n}.lora_{ab}.weight" for n in ADAPTED for ab in "AB"}
    assert torch.equal(sd["base_model.model.mlp.0.lora_A.weight"], q.mlp[0].lora_A["tuned"].detach())

    x = torch.randn(5, 64)
    with torch.no_grad():
        want = q(x)
        pm = peft.PeftModel.from_pretrained(_dequantized_float(fp, q), str(tmp_path))
        pm.eval()
        got = pm(x)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        # and the adapter matters (the outputs are not just the base model's)
        base = _dequantized_float(fp, q)(x)
        assert (got - base).abs().max() > 1e-2

    # round trip into a fresh quantized model: identical outputs
    q2 = _quantized(fp)
    assert pqt.load_peft_adapter(q2, tmp_path, "tuned") == sorted(ADAPTED)
    with torch.no_grad():
        assert torch.equal(q2(x), want)


def test_load_peft_written_adapter(tmp_path):
    """An adapter made and saved by peft itself (rslora, random B) -> pyqkern gives PEFT's outputs."""
    fp = Net()
    q = _quantized(fp)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q", "v", "mlp.2"],
                          init_lora_weights=False)
    pm = peft.get_peft_model(_dequantized_float(fp, q), cfg)
    pm.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():  # the LoRA's read-only A / B are copied, not handed to torch (it warned)
        warnings.simplefilter("error")
        names = pqt.load_peft_adapter(q, tmp_path)
    assert names == ["enc.q", "enc.v", "mlp.2"]
    assert q.enc["q"].active_adapters == ["default"] and not q.enc["q"].lora_A["default"].requires_grad
    x = torch.randn(7, 64)
    pm.eval()
    with torch.no_grad():
        assert torch.allclose(q(x), pm(x), atol=1e-5, rtol=1e-5)


def test_dropout_not_applied_is_said_when_training(tmp_path):
    """PEFT drops the adapter branch's input in training; QuantLinear has no dropout. Loading a
    config with lora_dropout > 0 for training warns (a review: it was silently ignored)."""
    fp = Net()
    q = _quantized(fp)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q"], init_lora_weights=False)
    peft.get_peft_model(_dequantized_float(fp, q), cfg).save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pqt.load_peft_adapter(q, tmp_path, "inference")         # not trained: nothing to say
    with pytest.warns(UserWarning, match=r"lora_dropout=0.1 is not applied"):
        pqt.load_peft_adapter(q, tmp_path, "tuned", trainable=True)
    with pytest.raises(ValueError, match="attribute of nn.Module"):  # was a KeyError from the ParameterDict
        pqt.load_peft_adapter(q, tmp_path, "train")


def test_qlora_step_after_load_and_save_again(tmp_path):
    fp = Net()
    q = _quantized(fp)
    pm = peft.get_peft_model(_dequantized_float(fp, q), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q"],
                                                                        init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "a"))
    pqt.load_peft_adapter(q, tmp_path / "a", "ft", trainable=True)
    before = q.enc["q"].lora_B["ft"].detach().clone()
    _train(q, steps=1)
    assert not torch.equal(q.enc["q"].lora_B["ft"], before)
    pqt.save_peft_adapter(q, tmp_path / "b")  # the only adapter name: "ft"
    sd = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert torch.equal(sd["base_model.model.enc.q.lora_B.weight"], q.enc["q"].lora_B["ft"].detach())


def test_errors(tmp_path):
    fp = Net()
    q = _quantized(fp)
    with pytest.raises(ValueError, match="no QuantLinear"):
        pqt.save_peft_adapter(fp, tmp_path)
    with pytest.raises(ValueError, match="adapter_name"):
        pqt.save_peft_adapter(q, tmp_path)  # no adapters at all
    q.enc["q"].add_adapter("a", torch.randn(2, 64), torch.randn(64, 2))
    q.enc["v"].add_adapter("b", torch.randn(2, 64), torch.randn(64, 2))
    with pytest.raises(ValueError, match=r"\['a', 'b'\]"):
        pqt.save_peft_adapter(q, tmp_path)
    with pytest.raises(ValueError, match="'c'"):
        pqt.save_peft_adapter(q, tmp_path, "c")
    pqt.save_peft_adapter(q, tmp_path / "a", "a")
    # the target must exist and be a QuantLinear; nothing is attached when a target fails
    with pytest.raises(TypeError, match="not a QuantLinear"):
        pqt.load_peft_adapter(fp, tmp_path / "a")
    other = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(KeyError, match="enc.q"):
        pqt.load_peft_adapter(other, tmp_path / "a")
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        pqt.load_peft_adapter(q, tmp_path / "a", "a")
    with pytest.raises(FileNotFoundError):
        pqt.load_peft_adapter(q, tmp_path / "missing")
    q2 = _quantized(fp)
    q2.enc["v"].add_adapter("x", torch.randn(2, 64), torch.randn(64, 2))
    q2.enc["q"].add_adapter("x", torch.randn(2, 64), torch.randn(64, 2))
    q3 = _quantized(fp)
    q3.enc["v"].add_adapter("x", torch.randn(2, 64), torch.randn(64, 2))
    pqt.save_peft_adapter(q2, tmp_path / "both", "x")
    with pytest.raises(ValueError, match="enc.v already has"):
        pqt.load_peft_adapter(q3, tmp_path / "both", "x")
    assert "x" not in q3.enc["q"].lora_A  # enc.q (checked first) was not attached


def test_deepcopy_and_pickle_after_forward(tmp_path):
    """A used QuantLinear (its packed int8 weight cached) deep-copies and pickles."""
    fp = Net()
    q = copy.deepcopy(fp)
    pqt.quantize_model(q, "q4_0")
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = q(x)
        q2 = copy.deepcopy(q)
        assert torch.equal(q2(x), y)
        torch.save(q, tmp_path / "m.pt")
        q3 = torch.load(tmp_path / "m.pt", weights_only=False)
        assert torch.equal(q3(x), y)
