"""PyTorch backend: pyqkern kernels as torch custom ops, ``QuantLinear`` and ``quantize_model``.

    import pyqkern.torch as pqt
    summary = pqt.quantize_model(model, format="q4_0")   # nn.Linear -> QuantLinear, in place
    y = model(x)                                          # works under torch.compile / torch.export

Custom ops (namespace ``pyqkern``; each has a fake/meta implementation, so torch.compile and
torch.export trace them without graph breaks; the real ones call the native kernels, which
release the GIL):

    pyqkern::matmul(x, qdata, fmt, n, k, group, sym, bias, compute) -> y float32 [..., n]
    pyqkern::matmul_lora(x, qdata, fmt, n, k, group, sym, bias, As, Bs, scales, adapter_ids, compute)
    pyqkern::dequantize(qdata, fmt, n, k, group, sym) -> float32 [n, k]
    pyqkern::quantize(w, fmt, group, sym) -> uint8 [nbytes]

``qdata`` is the QTensor's canonical bytes as a 1-D uint8 tensor (shared with NumPy, no copy).
``fmt`` is the format name; nf4 with double quantization is spelled ``"nf4:dq"``.
Gradients: the weight is frozen; d/dx (dy @ W, W dequantized in row chunks) and, for adapters,
d/dA and d/dB (pyqkern.lora.backward) are registered, so QLoRA training works with plain autograd.
Importing this module imports torch; ``import pyqkern`` alone does not.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional

import numpy as np
import torch
from torch import nn

from . import _formats
from ._lora import LoRA
from ._matmul import matmul as _pq_matmul
from ._ops import dequantize as _pq_dequantize
from ._ops import quantize as _pq_quantize
from ._qtensor import QTensor, total_bytes
from . import lora as _pq_lora

__all__ = ["QuantLinear", "quantize_model", "qtensor_to_tensor", "qtensor_from_tensor"]


# --------------------------------------------------------------------------- QTensor <-> tensor
def _split_fmt(fmt: str):
    if fmt.endswith(":dq"):
        return fmt[:-3], True
    return fmt, False


def _fmt_name(qt: QTensor) -> str:
    return qt.format + (":dq" if qt.params.get("double_quant") else "")


def qtensor_to_tensor(qt: QTensor) -> torch.Tensor:
    """The canonical bytes of qt as a 1-D uint8 tensor sharing its memory."""
    if qt.perm is not None:
        raise NotImplementedError("QTensors with an input permutation (act-order) are not supported by "
                                  "pyqkern.torch yet")
    return torch.from_numpy(np.ascontiguousarray(qt.data).reshape(-1))


def qtensor_from_tensor(qdata: torch.Tensor, fmt: str, n: int, k: int, group: int, sym: int) -> QTensor:
    """Wrap a uint8 tensor of canonical bytes as a QTensor (no copy). The QTensor is cached on the
    tensor object (keyed by its version counter and the parameters), so the int8 kernels' packed
    weight is made once per weight, and in-place updates (load_state_dict) are seen."""
    if qdata.dtype != torch.uint8 or qdata.device.type != "cpu":
        raise TypeError(f"qdata must be a CPU uint8 tensor, got {qdata.dtype} on {qdata.device}")
    key = (qdata.data_ptr(), qdata.numel(), qdata._version, fmt, int(n), int(k), int(group), int(sym))
    hit = getattr(qdata, "_pyqkern_qt", None)
    if hit is not None and hit[0] == key:
        return hit[1]
    base, dq = _split_fmt(fmt)
    arr = qdata.detach().contiguous().reshape(-1).numpy()
    qt = QTensor.from_bytes(base, (n, k), arr, group=group, sym=sym, double_quant=dq)
    try:
        qdata._pyqkern_qt = (key, qt)
    except (AttributeError, RuntimeError):  # some tensor subclasses refuse attributes: no cache
        pass
    return qt


def _nbytes(fmt: str, n: int, k: int, group: int, sym: int) -> int:
    base, dq = _split_fmt(fmt)
    params = _formats.resolve_params(base, k, group, sym, dq)
    return total_bytes(base, n, k, params)


def _x32(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float32).contiguous().numpy()


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("pyqkern::matmul", mutates_args=())
def _op_matmul(x: torch.Tensor, qdata: torch.Tensor, fmt: str, n: int, k: int, group: int, sym: int,
               bias: Optional[torch.Tensor], compute: str) -> torch.Tensor:
    qt = qtensor_from_tensor(qdata, fmt, n, k, group, sym)
    b = None if bias is None else _x32(bias)
    return torch.from_numpy(_pq_matmul(_x32(x), qt, b, compute=compute))


@_op_matmul.register_fake
def _(x, qdata, fmt, n, k, group, sym, bias, compute):
    torch._check(x.shape[-1] == k)
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


@torch.library.custom_op("pyqkern::matmul_lora", mutates_args=())
def _op_matmul_lora(x: torch.Tensor, qdata: torch.Tensor, fmt: str, n: int, k: int, group: int, sym: int,
                    bias: Optional[torch.Tensor], As: List[torch.Tensor], Bs: List[torch.Tensor],
                    scales: List[float], adapter_ids: Optional[torch.Tensor], compute: str) -> torch.Tensor:
    qt = qtensor_from_tensor(qdata, fmt, n, k, group, sym)
    b = None if bias is None else _x32(bias)
    ads = [_lora(a, bb, s) for a, bb, s in zip(As, Bs, scales)]
    ids = None if adapter_ids is None else adapter_ids.detach().reshape(-1).numpy()
    return torch.from_numpy(_pq_matmul(_x32(x), qt, b, lora=ads or None, adapter_ids=ids, compute=compute))


@_op_matmul_lora.register_fake
def _(x, qdata, fmt, n, k, group, sym, bias, As, Bs, scales, adapter_ids, compute):
    torch._check(x.shape[-1] == k)
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


def _lora(A: torch.Tensor, B: torch.Tensor, scale: float) -> LoRA:
    r = A.shape[0]
    return LoRA(_x32(A), _x32(B), alpha=float(scale) * r, storage="float32")


@torch.library.custom_op("pyqkern::dequantize", mutates_args=())
def _op_dequantize(qdata: torch.Tensor, fmt: str, n: int, k: int, group: int, sym: int) -> torch.Tensor:
    return torch.from_numpy(_pq_dequantize(qtensor_from_tensor(qdata, fmt, n, k, group, sym)))


@_op_dequantize.register_fake
def _(qdata, fmt, n, k, group, sym):
    return qdata.new_empty((n, k), dtype=torch.float32)


@torch.library.custom_op("pyqkern::quantize", mutates_args=())
def _op_quantize(w: torch.Tensor, fmt: str, group: int, sym: int) -> torch.Tensor:
    base, dq = _split_fmt(fmt)
    qt = _pq_quantize(_x32(w), base, group=group, sym=sym, double_quant=dq)
    return torch.from_numpy(np.ascontiguousarray(qt.data).reshape(-1).copy())


@_op_quantize.register_fake
def _(w, fmt, group, sym):
    n, k = w.shape
    return w.new_empty((_nbytes(fmt, int(n), int(k), group, sym),), dtype=torch.uint8)


@torch.library.custom_op("pyqkern::matmul_backward", mutates_args=())
def _op_matmul_backward(dy: torch.Tensor, qdata: torch.Tensor, fmt: str, n: int, k: int, group: int,
                        sym: int) -> torch.Tensor:
    """dy @ W (W frozen): the gradient of pyqkern::matmul with respect to x."""
    qt = qtensor_from_tensor(qdata, fmt, n, k, group, sym)
    return torch.from_numpy(np.ascontiguousarray(_pq_lora.backward_base(_x32(dy), qt)))


@_op_matmul_backward.register_fake
def _(dy, qdata, fmt, n, k, group, sym):
    return dy.new_empty((*dy.shape[:-1], k), dtype=torch.float32)


@torch.library.custom_op("pyqkern::lora_backward", mutates_args=())
def _op_lora_backward(x: torch.Tensor, dy: torch.Tensor, qdata: torch.Tensor, fmt: str, n: int, k: int,
                      group: int, sym: int, As: List[torch.Tensor], Bs: List[torch.Tensor], scales: List[float],
                      adapter_ids: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """-> [dx, dA_0, dB_0, dA_1, dB_1, ...] for y = x@W.T + sum_i s_i (x@A_i.T)@B_i.T (rows picked
    by adapter_ids when given). One adapter on every row: exactly pyqkern.lora.backward."""
    qt = qtensor_from_tensor(qdata, fmt, n, k, group, sym)
    x2, dy2 = _x32(x).reshape(-1, k), _x32(dy).reshape(-1, n)
    lead = tuple(x.shape[:-1])
    ads = [_lora(a, b, s) for a, b, s in zip(As, Bs, scales)]
    if len(ads) == 1 and adapter_ids is None:
        dx, dA, dB = _pq_lora.backward(x2, dy2, qt, ads[0])
        grads = [dA, dB]
    else:
        dx = _pq_lora.backward_base(dy2, qt)
        ids = None if adapter_ids is None else adapter_ids.detach().reshape(-1).numpy()
        grads = []
        for i, ad in enumerate(ads):
            rows = slice(None) if ids is None else (ids == i)
            xr, dyr = x2[rows], dy2[rows]
            s = np.float32(ad.scale)
            t = xr @ ad.A.T
            dB = (dyr.T @ t) * s
            dt = (dyr @ ad.B) * s
            grads += [dt.T @ xr, dB]
            if ids is None:
                dx += dt @ ad.A
            else:
                dx[rows] += dt @ ad.A
    out = [torch.from_numpy(np.ascontiguousarray(dx, np.float32).reshape(*lead, k))]
    out += [torch.from_numpy(np.ascontiguousarray(g, np.float32)) for g in grads]
    return out


@_op_lora_backward.register_fake
def _(x, dy, qdata, fmt, n, k, group, sym, As, Bs, scales, adapter_ids):
    out = [x.new_empty((*x.shape[:-1], k), dtype=torch.float32)]
    for a, b in zip(As, Bs):
        out += [a.new_empty(a.shape, dtype=torch.float32), b.new_empty(b.shape, dtype=torch.float32)]
    return out


def _setup_matmul(ctx, inputs, output):
    x, qdata, fmt, n, k, group, sym, bias, compute = inputs
    ctx.save_for_backward(qdata)
    ctx.args = (fmt, n, k, group, sym)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _bwd_matmul(ctx, dy):
    (qdata,) = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0]:
        dx = _op_matmul_backward(dy, qdata, *ctx.args).to(ctx.x_dtype)
    db = None
    if ctx.has_bias and ctx.needs_input_grad[7]:
        db = dy.reshape(-1, dy.shape[-1]).sum(0)
    return dx, None, None, None, None, None, None, db, None


_op_matmul.register_autograd(_bwd_matmul, setup_context=_setup_matmul)


def _setup_lora(ctx, inputs, output):
    x, qdata, fmt, n, k, group, sym, bias, As, Bs, scales, adapter_ids, compute = inputs
    ctx.save_for_backward(x, qdata, adapter_ids, *As, *Bs)
    ctx.args = (fmt, n, k, group, sym)
    ctx.n_ad = len(As)
    ctx.scales = list(scales)
    ctx.x_dtype = x.dtype
    ctx.ad_dtypes = [(a.dtype, b.dtype) for a, b in zip(As, Bs)]
    ctx.has_bias = bias is not None


def _bwd_lora(ctx, dy):
    x, qdata, adapter_ids, *ab = ctx.saved_tensors
    m = ctx.n_ad
    As, Bs = ab[:m], ab[m:]
    g = _op_lora_backward(x, dy, qdata, *ctx.args, list(As), list(Bs), ctx.scales, adapter_ids)
    dx = g[0].to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    dAs = [g[1 + 2 * i].to(ctx.ad_dtypes[i][0]) for i in range(m)]
    dBs = [g[2 + 2 * i].to(ctx.ad_dtypes[i][1]) for i in range(m)]
    db = None
    if ctx.has_bias and ctx.needs_input_grad[7]:
        db = dy.reshape(-1, dy.shape[-1]).sum(0)
    return dx, None, None, None, None, None, None, db, dAs, dBs, None, None, None


_op_matmul_lora.register_autograd(_bwd_lora, setup_context=_setup_lora)


# --------------------------------------------------------------------------- QuantLinear
_EXTRA_KEYS = ("format", "in_features", "out_features", "group", "sym", "compute", "adapters", "active")


class QuantLinear(nn.Module):
    """A linear layer whose weight is a pyqkern QTensor, stored as the uint8 buffer ``qdata``.

    forward(x) = x @ W.T + bias (+ adapters) for x [..., in_features] float32/bfloat16/float16;
    computed in float32, returned in x's dtype. ``compute``: "auto" | "int8" | "float" as in
    pyqkern.matmul. Adapters (LoRA) are nn.Parameters ``lora_A[name]`` / ``lora_B[name]``; they
    are frozen by default (``add_adapter(..., trainable=True)`` for QLoRA training). The weight is
    always frozen."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, format: str = "q4_0",
                 group: Optional[int] = None, sym: bool = False, double_quant: bool = False, compute: str = "auto"):
        super().__init__()
        params = _formats.resolve_params(format, in_features, group, sym, double_quant)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.format = format + (":dq" if params.get("double_quant") else "")
        self.group, self.sym = int(params["group"]), int(params["sym"])
        nb = total_bytes(format, out_features, in_features, params)
        self.register_buffer("qdata", torch.zeros(nb, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)
        self.compute = self._resolve_compute(compute)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self._scales = {}   # name -> float scale
        self._alphas = {}   # name -> (alpha, rslora)
        self._active = []

    # -- construction
    @classmethod
    def from_qtensor(cls, qt: QTensor, bias=None, *, compute: str = "auto") -> "QuantLinear":
        n, k = qt.shape
        base = qt.format
        mod = cls(k, n, bias is not None, format=base, group=qt.params.get("group") or None,
                  sym=bool(qt.params.get("sym")), double_quant=bool(qt.params.get("double_quant")), compute="float")
        mod.qdata = qtensor_to_tensor(qt).clone()
        if bias is not None:
            mod.bias = torch.as_tensor(np.asarray(bias, np.float32)).clone().reshape(n)
        mod.compute = mod._resolve_compute(compute)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str = "q4_0", *, group=None, sym=False, double_quant=False,
                    compute: str = "auto") -> "QuantLinear":
        """Quantize an nn.Linear (its weight [out, in] becomes the QTensor's rows)."""
        w = linear.weight.detach().to("cpu")
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            w = w.float()
        qt = _pq_quantize(w.contiguous(), format, group=group, sym=sym, double_quant=double_quant)
        b = None if linear.bias is None else linear.bias.detach().to("cpu", torch.float32).numpy()
        return cls.from_qtensor(qt, b, compute=compute)

    def _resolve_compute(self, compute):
        from ._matmul import COMPUTES

        if compute not in COMPUTES:
            raise ValueError(f"compute must be one of {COMPUTES}, got {compute!r}")
        ok = self.in_features % 32 == 0 and (not self.format.startswith("int4") or self.group == -1
                                             or self.group >= 32)
        if compute == "auto":
            return "int8" if ok else "float"
        if compute == "int8" and not ok:
            raise ValueError(f"{self.format}: compute='int8' needs K % 32 == 0 and int4 groups >= 32")
        return compute

    def qtensor(self) -> QTensor:
        """The weight as a QTensor sharing this module's bytes."""
        return qtensor_from_tensor(self.qdata, self.format, self.out_features, self.in_features, self.group, self.sym)

    def dequantize(self) -> torch.Tensor:
        return torch.ops.pyqkern.dequantize(self.qdata, self.format, self.out_features, self.in_features,
                                            self.group, self.sym)

    @property
    def bits_per_weight(self) -> float:
        return self.qdata.numel() * 8.0 / (self.in_features * self.out_features)

    # -- adapters
    def add_adapter(self, name: str, A, B, alpha=None, *, rslora: bool = False, trainable: bool = False,
                    active: bool = True) -> None:
        """Attach LoRA A [r, in], B [out, r] under ``name``: y += alpha/r * (x @ A.T) @ B.T
        (alpha/sqrt(r) with rslora; alpha defaults to r)."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError("adapter name must be a non-empty string without '.'")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already attached")
        A = torch.as_tensor(A).detach().to(torch.float32)
        B = torch.as_tensor(B).detach().to(torch.float32)
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != self.in_features or B.shape[0] != self.out_features \
                or A.shape[0] != B.shape[1] or A.shape[0] == 0:
            raise ValueError(f"adapter shapes A {tuple(A.shape)} / B {tuple(B.shape)} do not fit "
                             f"[r, {self.in_features}] / [{self.out_features}, r]")
        r = A.shape[0]
        a = float(r if alpha is None else alpha)
        self.lora_A[name] = nn.Parameter(A.clone().contiguous(), requires_grad=trainable)
        self.lora_B[name] = nn.Parameter(B.clone().contiguous(), requires_grad=trainable)
        self._alphas[name] = (a, bool(rslora))
        self._scales[name] = a / (math.sqrt(r) if rslora else r)
        if active:
            self._active.append(name)

    def add_lora(self, name: str, ad: LoRA, *, trainable: bool = False) -> None:
        """Attach a pyqkern.LoRA (e.g. from pyqkern.io.load_peft_adapter). DoRA is not supported here."""
        if ad.is_dora:
            raise NotImplementedError("DoRA adapters are not supported by QuantLinear yet")
        self.add_adapter(name, ad.A, ad.B, ad.alpha, rslora=ad.rslora, trainable=trainable)

    def remove_adapter(self, name: str) -> None:
        if name not in self.lora_A:
            raise KeyError(f"no adapter named {name!r}; attached: {self.adapter_names}")
        del self.lora_A[name]
        del self.lora_B[name]
        del self._scales[name], self._alphas[name]
        self._active = [a for a in self._active if a != name]

    def set_adapter(self, names) -> None:
        """Adapters applied to every row when forward gets no adapter_ids (a name, a list, or [])."""
        names = [names] if isinstance(names, str) else list(names or [])
        for nm in names:
            if nm not in self.lora_A:
                raise KeyError(f"no adapter named {nm!r}; attached: {self.adapter_names}")
        self._active = names

    @property
    def adapter_names(self) -> list:
        return list(self.lora_A.keys())

    @property
    def active_adapters(self) -> list:
        return list(self._active)

    # -- forward
    def forward(self, x: torch.Tensor, adapter_ids=None) -> torch.Tensor:
        """adapter_ids: None (the active adapters on every row) or one id per row of x flattened
        (ints indexing adapter_names, -1 = none; a tensor, or a list of ints / names / None)."""
        args = (self.qdata, self.format, self.out_features, self.in_features, self.group, self.sym)
        if adapter_ids is not None:
            names = self.adapter_names
            if not names:
                raise ValueError("adapter_ids given but no adapter is attached")
            if not isinstance(adapter_ids, torch.Tensor):
                ids = list(adapter_ids)
                try:
                    ids = [-1 if v is None else (names.index(v) if isinstance(v, str) else int(v)) for v in ids]
                except ValueError:
                    raise KeyError(f"unknown adapter name in adapter_ids; attached: {names}") from None
                adapter_ids = torch.tensor(ids, dtype=torch.int32)
            else:
                adapter_ids = adapter_ids.to(torch.int32).reshape(-1)
        else:
            names = self._active
        if names:
            As = [self.lora_A[nm] for nm in names]
            Bs = [self.lora_B[nm] for nm in names]
            scales = [self._scales[nm] for nm in names]
            y = torch.ops.pyqkern.matmul_lora(x, *args, self.bias, As, Bs, scales, adapter_ids, self.compute)
        else:
            y = torch.ops.pyqkern.matmul(x, *args, self.bias, self.compute)
        return y.to(x.dtype)

    # -- state
    def get_extra_state(self):
        return {"format": self.format, "in_features": self.in_features, "out_features": self.out_features,
                "group": self.group, "sym": self.sym, "compute": self.compute,
                "adapters": {nm: list(self._alphas[nm]) for nm in self.adapter_names}, "active": list(self._active)}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or any(key not in state for key in _EXTRA_KEYS):
            raise ValueError("QuantLinear extra state is missing keys")
        if (state["in_features"], state["out_features"]) != (self.in_features, self.out_features):
            raise ValueError(f"state is for [{state['out_features']}, {state['in_features']}] but this layer is "
                             f"[{self.out_features}, {self.in_features}]")
        self.format, self.group, self.sym = state["format"], int(state["group"]), int(state["sym"])
        self.compute = self._resolve_compute(state["compute"])
        self._alphas = {nm: (float(a), bool(rs)) for nm, (a, rs) in state["adapters"].items()}
        self._active = list(state["active"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the byte count depends on the format: resize qdata (and create adapter parameters) first
        q = state_dict.get(prefix + "qdata")
        if q is not None and q.shape != self.qdata.shape:
            self.qdata = torch.empty_like(q, dtype=torch.uint8)
        b = state_dict.get(prefix + "bias")
        if b is not None and self.bias is None:
            self.bias = torch.empty(self.out_features, dtype=torch.float32)
        for key, val in state_dict.items():
            for which, pdict in (("lora_A.", self.lora_A), ("lora_B.", self.lora_B)):
                if key.startswith(prefix + which):
                    nm = key[len(prefix + which):]
                    if "." not in nm and (nm not in pdict or pdict[nm].shape != val.shape):
                        pdict[nm] = nn.Parameter(torch.empty_like(val, dtype=torch.float32), requires_grad=False)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._scales = {}
        for nm, (a, rs) in self._alphas.items():
            if nm in self.lora_A:
                r = self.lora_A[nm].shape[0]
                self._scales[nm] = a / (math.sqrt(r) if rs else r)

    def extra_repr(self) -> str:
        fmt, dq = _split_fmt(self.format)
        extra = ""
        if fmt in ("nf4", "int4"):
            extra = f", group={self.group}" + (", sym" if self.sym else "") + (", double_quant" if dq else "")
        s = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
             f"format={fmt}{extra}, {self.bits_per_weight:.3f} bits/weight, compute={self.compute}")
        if self.lora_A:
            s += f", adapters={self.adapter_names}, active={self._active}"
        return s


# --------------------------------------------------------------------------- quantize_model
def _matches(name, patterns):
    import fnmatch

    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(name, p) or name == p or name.startswith(p + ".") for p in patterns)


def _fits(fmt, k, group, sym, double_quant):
    try:
        _formats.resolve_params(fmt, k, group, sym, double_quant)
        return None
    except ValueError as e:
        return str(e)


def quantize_model(model: nn.Module, format: str = "q4_0", include=None, exclude=None, *, group=None, sym=False,
                   double_quant=False, compute="auto", verbose=False) -> dict:
    """Replace the model's nn.Linear layers by QuantLinear, in place.

    include / exclude: module names or fnmatch patterns ("*.mlp.*"; a name also matches its
    submodules); None includes all / excludes none. Layers whose in_features does not fit the
    format's block are skipped with a warning. verbose=True prints one line per layer.
    Returns {"quantized": [names], "skipped": {name: reason}, "bytes_before", "bytes_after"}
    (bytes of the replaced layers' weights and biases)."""
    if format not in _formats.FORMATS:
        raise ValueError(f"unknown format {format!r}; supported: {', '.join(_formats.FORMATS)}")
    summary = {"quantized": [], "skipped": {}, "bytes_before": 0, "bytes_after": 0}
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and name]
    if isinstance(model, nn.Linear):
        raise TypeError("quantize_model replaces submodules; wrap a single nn.Linear with QuantLinear.from_linear")
    for name, lin in targets:
        if include is not None and not _matches(name, include):
            continue
        if exclude is not None and _matches(name, exclude):
            continue
        why = _fits(format, lin.in_features, group, sym, double_quant)
        if why is not None:
            warnings.warn(f"pyqkern.torch.quantize_model: skipping {name}: {why}", stacklevel=2)
            summary["skipped"][name] = why
            continue
        q = QuantLinear.from_linear(lin, format, group=group, sym=sym, double_quant=double_quant, compute=compute)
        before = lin.weight.numel() * lin.weight.element_size()
        if lin.bias is not None:
            before += lin.bias.numel() * lin.bias.element_size()
        after = q.qdata.numel() + (0 if q.bias is None else q.bias.numel() * 4)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, q)
        summary["quantized"].append(name)
        summary["bytes_before"] += before
        summary["bytes_after"] += after
        if verbose:
            print(f"[pyqkern] {name}: [{lin.out_features}, {lin.in_features}] -> {format} "
                  f"({q.bits_per_weight:.2f} bits/weight, {before} -> {after} bytes)")
    return summary
