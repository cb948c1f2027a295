"""PyTorch backend: pyqkern kernels as torch custom ops, ``QuantLinear`` and ``quantize_model``.

    import pyqkern.torch as pqt
    summary = pqt.quantize_model(model, format="q4_0")   # nn.Linear -> QuantLinear, in place
    y = model(x)                                          # works under torch.compile / torch.export

    summary = pqt.quantize_model(model, format="int4", calib=batches,      # GPTQ, layer by layer
                                 gptq={"act_order": True})

    with pqt.threads():     # torch's own ops on 1 thread, pyqkern's matmuls on torch's cores
        y = model(x)        # (pqt.attach_threads(model) does it around every forward)

    pqt.load_peft_adapter(model, "adapter_dir", trainable=True)   # QLoRA: PEFT adapters in,
    pqt.save_peft_adapter(model, "out_dir")                       # trained ones out (peft loads them)

Custom ops (namespace ``pyqkern``; each has a fake/meta implementation, so torch.compile and
torch.export trace them without graph breaks; the real ones call the native kernels, which
release the GIL):

    pyqkern::matmul(x, qdata, fmt, n, k, group, sym, bias, compute) -> y float32 [..., n]
    pyqkern::matmul_lora(x, qdata, fmt, n, k, group, sym, bias, As, Bs, scales, adapter_ids, compute)
    pyqkern::dequantize(qdata, fmt, n, k, group, sym) -> float32 [n, k]
    pyqkern::quantize(w, fmt, group, sym) -> uint8 [nbytes]

QuantLinear calls the ops' bodies itself in plain eager mode (one torch.autograd.Function with
the same gradients; the same numbers): the ops' dispatch and autograd wrapper cost 0.05-0.15 ms
per inference call and ~0.9 ms per training forward + backward (a 4096x4096 decode GEMV takes
~0.5 ms). Under torch.compile / export / jit.trace, a dispatch or function mode, a torch.func
transform or the profiler it calls the ops.

``qdata`` is the QTensor's canonical bytes as a 1-D uint8 tensor (shared with NumPy, no copy).
``fmt`` is the format name; nf4 with double quantization is spelled ``"nf4:dq"``.
Gradients: the weight is frozen; d/dx (dy @ W, W dequantized by pyqkern in row chunks, products
in torch) and, for adapters, d/dA and d/dB (pyqkern.lora.backward's math, in torch) are
registered, so QLoRA training works with plain autograd.
Importing this module imports torch; ``import pyqkern`` alone does not.
"""
from __future__ import annotations

import math
import operator
import threading
import time
import warnings
import weakref
from typing import List, Optional

import numpy as np
import torch
from torch import nn
import torch.autograd.forward_ad as _fwad

from . import _formats
from ._lora import LoRA, _real
from ._matmul import COMPUTES, INT8_NEEDS, _int8_call, _int8_rows, int8_fits, int8_supported, matmul as _pq_matmul
from ._ops import dequantize as _pq_dequantize
from ._ops import quantize as _pq_quantize
from ._qtensor import QTensor, total_bytes
from . import lora as _pq_lora

__all__ = ["QuantLinear", "quantize_model", "save_peft_adapter", "load_peft_adapter", "threads", "attach_threads",
           "qtensor_to_tensor", "qtensor_from_tensor"]


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
        raise ValueError("this QTensor has an input permutation (act-order), which its bytes alone do not "
                         "carry; use QuantLinear.from_qtensor (it keeps the permutation)")
    return torch.from_numpy(np.ascontiguousarray(qt.data).reshape(-1))


def _tkey(t: torch.Tensor):
    """What QuantLinear's kept plan checks a tensor against on every call."""
    return (t.data_ptr(), _version(t), t.shape, t.stride(), t.dtype, t.requires_grad)


def _version(t: torch.Tensor):
    """t's version counter, or None for an inference tensor (made under torch.inference_mode,
    which keeps none and raises on reading it); such a tensor cannot be modified in place outside
    inference mode, so its cache key needs no version."""
    if t.is_inference():
        return None
    return t._version


class _IdCache:
    """A value per live tensor object, beside it rather than an attribute on it (an attribute was
    pickled with the tensor: torch.load(weights_only=True) of saved parameters refused its class).
    Keyed by id() with a weak reference whose callback drops the entry when the tensor dies (so no
    later object can find it under a reused id): a look-up costs ~0.1 us, where torch's
    WeakIdKeyDictionary makes a weak reference per look-up (~0.8 us, on every forward)."""

    def __init__(self):
        self._d = {}

    def get(self, t):
        hit = self._d.get(id(t))
        return None if hit is None or hit[0]() is not t else hit[1]

    def set(self, t, value):
        i, d = id(t), self._d
        try:
            d[i] = (weakref.ref(t, lambda _, i=i, d=d: d.pop(i, None)), value)
        except TypeError:  # a tensor subclass without weak references: not cached
            pass

    def pop(self, t):
        hit = self._d.get(id(t))
        if hit is not None and hit[0]() is t:
            del self._d[id(t)]


_QT_CACHE = _IdCache()    # qdata tensor -> (key, QTensor)
_LORA_CACHE = _IdCache()  # adapter B tensor -> (key, weakref to A, storages, LoRA)


def qtensor_from_tensor(qdata: torch.Tensor, fmt: str, n: int, k: int, group: int, sym: int) -> QTensor:
    """Wrap a uint8 tensor of canonical bytes as a QTensor (no copy). The QTensor is cached for the
    tensor object (keyed by its version counter and the parameters), so the int8 kernels' packed
    weight is made once per weight, and in-place updates (load_state_dict) are seen."""
    if qdata.dtype != torch.uint8 or qdata.device.type != "cpu":
        raise TypeError(f"qdata must be a CPU uint8 tensor, got {qdata.dtype} on {qdata.device}")
    key = (qdata.data_ptr(), qdata.numel(), _version(qdata), fmt, int(n), int(k), int(group), int(sym))
    hit = _QT_CACHE.get(qdata)
    if hit is not None and hit[0] == key:  # the QTensor views qdata's storage: its address stays taken
        return hit[1]
    base, dq = _split_fmt(fmt)
    arr = qdata.detach().contiguous().reshape(-1).numpy()
    qt = QTensor.from_bytes(base, (n, k), arr, group=group, sym=sym, double_quant=dq)
    _QT_CACHE.set(qdata, (key, qt))
    return qt


def _drop_cache(qdata) -> None:
    _QT_CACHE.pop(qdata)


class _QTCache:
    """Unpickles what modules saved by earlier versions carry (the cache was then an attribute of
    type _QTCache on the tensor); unused otherwise."""

    __slots__ = ("key", "qt")

    def __init__(self, key=None, qt=None):
        self.key, self.qt = key, qt

    def __reduce__(self):
        return (_QTCache, ())


def _nbytes(fmt: str, n: int, k: int, group: int, sym: int) -> int:
    base, dq = _split_fmt(fmt)
    params = _formats.resolve_params(base, k, group, sym, dq)
    return total_bytes(base, n, k, params)


def _x32(x: torch.Tensor) -> np.ndarray:
    if x.dtype == torch.float32 and x.is_contiguous():  # the common case, in a third of the time
        return x.detach().numpy() if x.requires_grad else x.numpy()
    return x.detach().to(torch.float32).contiguous().numpy()


# --------------------------------------------------------------------------- custom ops
# The ops' bodies are plain functions: QuantLinear calls them directly in eager mode (_eager),
# where the custom op's dispatch and its autograd wrapper cost more than a small layer's product.
def _matmul_impl(x, qdata, fmt, n, k, group, sym, bias, compute):
    qt = qtensor_from_tensor(qdata, fmt, n, k, group, sym)
    b = None if bias is None else _x32(bias)
    return _matmul_x32(_x32(x), qt, b, compute)


def _matmul_x32(x2, qt, b, compute, ads=()):
    """pq.matmul(x2, qt, b, lora=ads or None, compute=compute) as a tensor: through _int8_rows
    where that is all matmul would do, without its argument handling."""
    n, k = qt.shape
    if (x2.ndim >= 1 and x2.shape[-1] == k and compute in ("auto", "int8") and qt.perm is None and int8_supported(qt)
            and x2.flags.aligned and (b is None or (b.shape == (n,) and b.flags.aligned))):  # else matmul copies
        return torch.from_numpy(_int8_rows(x2.reshape(-1, k), qt, b, ads).reshape(*x2.shape[:-1], n))
    return torch.from_numpy(_pq_matmul(x2, qt, b, lora=list(ads) or None, compute=compute))


@torch.library.custom_op("pyqkern::matmul", mutates_args=())
def _op_matmul(x: torch.Tensor, qdata: torch.Tensor, fmt: str, n: int, k: int, group: int, sym: int,
               bias: Optional[torch.Tensor], compute: str) -> torch.Tensor:
    return _matmul_impl(x, qdata, fmt, n, k, group, sym, bias, compute)


def _one_device(what, *tensors):
    """RuntimeError, as torch's own ops raise, unless the tensors (None skipped, lists flattened)
    share one device: with a meta tensor among CPU ones the op dispatches to its fake kernel, which
    would return uninitialised memory as the result (a review)."""
    devs = []
    for t in tensors:
        for u in (t if isinstance(t, (list, tuple)) else [t]):
            if u is not None and u.device not in devs:
                devs.append(u.device)
    if len(devs) > 1:
        raise RuntimeError(f"{what}: expected all tensors to be on the same device, but found at least two devices, "
                           f"{devs[0]} and {devs[1]}")


@_op_matmul.register_fake
def _(x, qdata, fmt, n, k, group, sym, bias, compute):
    _one_device("pyqkern::matmul", x, qdata, bias)
    torch._check(x.shape[-1] == k)
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


def _matmul_lora_impl(x, qdata, fmt, n, k, group, sym, bias, As, Bs, scales, adapter_ids, compute, cache=False):
    """cache: reuse the LoRA objects kept for frozen adapter tensors (_lora)."""
    qt = qtensor_from_tensor(qdata, fmt, n, k, group, sym)
    b = None if bias is None else _x32(bias)
    if not len(As) == len(Bs) == len(scales):
        raise ValueError(f"pyqkern::matmul_lora: {len(As)} A, {len(Bs)} B and {len(scales)} scales; one of each per adapter")
    ads = [_lora(a, bb, s, cache) for a, bb, s in zip(As, Bs, scales)]
    if adapter_ids is None:
        return _matmul_x32(_x32(x), qt, b, compute, ads)
    ids = adapter_ids.detach().reshape(-1).numpy()
    return torch.from_numpy(_pq_matmul(_x32(x), qt, b, lora=ads or None, adapter_ids=ids, compute=compute))


@torch.library.custom_op("pyqkern::matmul_lora", mutates_args=())
def _op_matmul_lora(x: torch.Tensor, qdata: torch.Tensor, fmt: str, n: int, k: int, group: int, sym: int,
                    bias: Optional[torch.Tensor], As: List[torch.Tensor], Bs: List[torch.Tensor],
                    scales: List[float], adapter_ids: Optional[torch.Tensor], compute: str) -> torch.Tensor:
    return _matmul_lora_impl(x, qdata, fmt, n, k, group, sym, bias, As, Bs, scales, adapter_ids, compute)


@_op_matmul_lora.register_fake
def _(x, qdata, fmt, n, k, group, sym, bias, As, Bs, scales, adapter_ids, compute):
    _one_device("pyqkern::matmul_lora", x, qdata, bias, As, Bs, adapter_ids)
    torch._check(x.shape[-1] == k)
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


def _lora(A: torch.Tensor, B: torch.Tensor, scale: float, cache: bool = False) -> LoRA:
    """The kernels' LoRA of this call's tensors (views of them where they are float32). Building
    one checks A and B for NaN / Inf and tiles B: ~60 us at rank 16 and 4096x4096, as long as the
    decode product itself. With cache=True and neither tensor requiring grad (a served adapter),
    a LoRA of the kernels' operands alone (its own copies, in 16 bits if both are bf16 or fp16:
    half the bytes the kernels read, the same products) is kept for B, keyed by A's identity and
    both tensors' storage, shape, dtype and version counter, as qtensor_from_tensor keeps the
    QTensor: an in-place change (copy_, load_state_dict) or a new A makes a new one. Not kept for
    inference tensors (no version counter) nor for trainable adapters (built per call). An
    in-place edit through .data (which the version counter does not see) is seen after
    QuantLinear.drop_packed(); a new tensor assigned to .data is seen."""
    if not cache or A.requires_grad or B.requires_grad or A.is_inference() or B.is_inference():
        return LoRA._of_arrays(_x32(A), _x32(B), float(scale))
    key = (_tkey(A), _tkey(B), float(scale))
    hit = _LORA_CACHE.get(B)
    # A by identity too (a weak reference), and both storages held: a new tensor or a .data
    # replacement could otherwise take a freed one's address with the same version
    if hit is not None and hit[0] == key and hit[1]() is A:
        return hit[3]
    a, b, storage = _kernel_arrays(A, B)
    ad = LoRA._for_kernels(a, b, float(scale), storage)
    _LORA_CACHE.set(B, (key, weakref.ref(A), (A.untyped_storage(), B.untyped_storage()), ad))
    return ad


def _kernel_arrays(A: torch.Tensor, B: torch.Tensor):
    """(A, B, storage) as NumPy arrays the kernels read: bf16 (as uint16 bits) or fp16 when both
    are, else float32."""
    if A.dtype == B.dtype == torch.bfloat16:
        a, b = (t.detach().contiguous().view(torch.int16).numpy().view(np.uint16) for t in (A, B))
        return a, b, "bfloat16"
    if A.dtype == B.dtype == torch.float16:
        return A.detach().contiguous().numpy(), B.detach().contiguous().numpy(), "float16"
    return _x32(A), _x32(B), "float32"


def _kept_lora(B):
    """The LoRA kept for adapter tensor B, or None (for tests)."""
    hit = _LORA_CACHE.get(B)
    return None if hit is None else hit[3]


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


_BWD_CHUNK = 1 << 22  # float32 weights dequantized at a time in the backward (16 MiB)


def _dy_w(dy2: torch.Tensor, qt: QTensor) -> torch.Tensor:
    """dy2 [M, N] @ W [N, K] for the frozen quantized W: W dequantized (pyqkern, native) in row
    chunks of at most _BWD_CHUNK values, products accumulated in row order with torch's matmul.
    torch, not NumPy: NumPy's BLAS brings a third thread pool whose busy-waiting workers fight
    torch's and pyqkern's (a MiniLM QLoRA step: 240-3700 ms with OpenBLAS at 2 threads, 88 ms
    with it at 1)."""
    n, k = qt.shape
    step = max(1, _BWD_CHUNK // max(k, 1))
    if step >= n:
        return dy2 @ torch.from_numpy(_pq_dequantize(qt))
    rows = _pq_lora._Rows(qt)
    dx = dy2.new_zeros((dy2.shape[0], k))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        dx.addmm_(dy2[:, r0:r1], torch.from_numpy(rows.dequantize(r0, r1)))
    return dx


def _matmul_backward_impl(dy, qdata, fmt, n, k, group, sym):
    qt = qtensor_from_tensor(qdata, fmt, n, k, group, sym)
    lead = tuple(dy.shape[:-1])
    with torch.no_grad():
        return _dy_w(dy.detach().reshape(-1, n).float(), qt).reshape(*lead, k)


@torch.library.custom_op("pyqkern::matmul_backward", mutates_args=())
def _op_matmul_backward(dy: torch.Tensor, qdata: torch.Tensor, fmt: str, n: int, k: int, group: int,
                        sym: int) -> torch.Tensor:
    """dy @ W (W frozen): the gradient of pyqkern::matmul with respect to x."""
    return _matmul_backward_impl(dy, qdata, fmt, n, k, group, sym)


@_op_matmul_backward.register_fake
def _(dy, qdata, fmt, n, k, group, sym):
    return dy.new_empty((*dy.shape[:-1], k), dtype=torch.float32)


def _lora_backward_impl(x, dy, qdata, fmt, n, k, group, sym, As, Bs, scales, adapter_ids, need_dx=True):
    """-> [dx, dA_0, dB_0, dA_1, dB_1, ...] for y = x@W.T + sum_i s_i (x@A_i.T)@B_i.T (rows picked
    by adapter_ids when given): t = x@A.T, dB = s dy.T@t, dt = s dy@B, dA = dt.T@x,
    dx = dy@W + sum dt@A (the math of pyqkern.lora.backward, in torch float32). need_dx=False:
    dx is None (the first layers of a QLoRA model: x from frozen embeddings; dy@W is the most
    of the work)."""
    qt = qtensor_from_tensor(qdata, fmt, n, k, group, sym)
    lead = tuple(x.shape[:-1])
    with torch.no_grad():
        x2 = x.detach().reshape(-1, k).float()
        dy2 = dy.detach().reshape(-1, n).float()
        dx = _dy_w(dy2, qt) if need_dx else None
        ids = None if adapter_ids is None else adapter_ids.detach().reshape(-1)
        grads = []
        for i, (A, B, s) in enumerate(zip(As, Bs, scales)):
            A, B = A.detach().float(), B.detach().float()
            if ids is None:
                xr, dyr = x2, dy2
            else:
                rows = ids == i
                xr, dyr = x2[rows], dy2[rows]
            t = xr @ A.T
            dB = (dyr.T @ t) * s
            dt = (dyr @ B) * s
            grads += [dt.T @ xr, dB]
            if dx is None:
                pass
            elif ids is None:
                dx += dt @ A
            else:
                dx[rows] += dt @ A
        return [None if dx is None else dx.reshape(*lead, k)] + grads


@torch.library.custom_op("pyqkern::lora_backward", mutates_args=())
def _op_lora_backward(x: torch.Tensor, dy: torch.Tensor, qdata: torch.Tensor, fmt: str, n: int, k: int,
                      group: int, sym: int, As: List[torch.Tensor], Bs: List[torch.Tensor], scales: List[float],
                      adapter_ids: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """The gradients of pyqkern::matmul_lora (see _lora_backward_impl)."""
    return _lora_backward_impl(x, dy, qdata, fmt, n, k, group, sym, As, Bs, scales, adapter_ids)


@_op_lora_backward.register_fake
def _(x, dy, qdata, fmt, n, k, group, sym, As, Bs, scales, adapter_ids):
    out = [x.new_empty((*x.shape[:-1], k), dtype=torch.float32)]
    for a, b in zip(As, Bs):
        out += [a.new_empty(a.shape, dtype=torch.float32), b.new_empty(b.shape, dtype=torch.float32)]
    return out


def _product_grads(dy, saved, args, scales, need_x, need_bias, x_dtype, ops):
    """(dx, db, dAs, dBs) of y = x @ W.T (+ bias) (+ adapters) from the saved tensors: (qdata,)
    without adapters, else (x, qdata, adapter_ids, *As, *Bs). ops: through the backward ops (the
    ops' own autograd, create_graph=True, a batched dy: they carry the second-order formula and
    vmap's fallback), else their bodies (dy @ W skipped when x needs no gradient)."""
    m = len(scales)
    dx = db = None
    dAs, dBs = [], []
    if m:
        x, qdata, adapter_ids, *ab = saved
        As, Bs = list(ab[:m]), list(ab[m:])
        if ops:
            g = _op_lora_backward(x, dy, qdata, *args, As, Bs, list(scales), adapter_ids)
        else:
            g = _lora_backward_impl(x, dy, qdata, *args, As, Bs, list(scales), adapter_ids, need_dx=need_x)
        dx = g[0].to(x_dtype) if need_x else None
        dAs = [g[1 + 2 * i].to(a.dtype) for i, a in enumerate(As)]
        dBs = [g[2 + 2 * i].to(b.dtype) for i, b in enumerate(Bs)]
    elif need_x:
        (qdata,) = saved
        dx = (_op_matmul_backward if ops else _matmul_backward_impl)(dy, qdata, *args).to(x_dtype)
    if need_bias:
        db = dy.reshape(-1, dy.shape[-1]).sum(0)
    return dx, db, dAs, dBs


def _setup_matmul(ctx, inputs, output):
    x, qdata, fmt, n, k, group, sym, bias, compute = inputs
    ctx.save_for_backward(qdata)
    ctx.args = (fmt, n, k, group, sym)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _bwd_matmul(ctx, dy):
    dx, db, _, _ = _product_grads(dy, ctx.saved_tensors, ctx.args, (), ctx.needs_input_grad[0],
                                  ctx.has_bias and ctx.needs_input_grad[7], ctx.x_dtype, ops=True)
    return dx, None, None, None, None, None, None, db, None


_op_matmul.register_autograd(_bwd_matmul, setup_context=_setup_matmul)


# second order (create_graph=True: gradient penalties, Hessian-vector products): dy @ W is linear
# in dy, so its backward is the forward product g @ W.T (compute="float", as dy @ W is)
def _setup_matmul_backward(ctx, inputs, output):
    dy, qdata, fmt, n, k, group, sym = inputs
    ctx.save_for_backward(qdata)
    ctx.args = (fmt, n, k, group, sym)
    ctx.dy_dtype = dy.dtype


def _bwd_matmul_backward(ctx, g):
    (qdata,) = ctx.saved_tensors
    ddy = None
    if ctx.needs_input_grad[0]:
        ddy = _op_matmul(g, qdata, *ctx.args, None, "float").to(ctx.dy_dtype)
    return ddy, None, None, None, None, None, None


_op_matmul_backward.register_autograd(_bwd_matmul_backward, setup_context=_setup_matmul_backward)


def _setup_lora(ctx, inputs, output):
    x, qdata, fmt, n, k, group, sym, bias, As, Bs, scales, adapter_ids, compute = inputs
    ctx.save_for_backward(x, qdata, adapter_ids, *As, *Bs)
    ctx.args = (fmt, n, k, group, sym)
    ctx.scales = list(scales)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _bwd_lora(ctx, dy):
    dx, db, dAs, dBs = _product_grads(dy, ctx.saved_tensors, ctx.args, ctx.scales, ctx.needs_input_grad[0],
                                      ctx.has_bias and ctx.needs_input_grad[7], ctx.x_dtype, ops=True)
    return dx, None, None, None, None, None, None, db, dAs, dBs, None, None, None


_op_matmul_lora.register_autograd(_bwd_lora, setup_context=_setup_lora)


def _bwd_lora_backward(ctx, *grads):
    raise RuntimeError("pyqkern: second-order gradients (create_graph=True) through a QuantLinear with adapters "
                       "are not supported; without adapters they are")


_op_lora_backward.register_autograd(_bwd_lora_backward, setup_context=lambda ctx, inputs, output: None)


# --------------------------------------------------------------------------- eager path
_FT_PEEK = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
_FT_WRAPPED = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def _plain_cpu(t) -> bool:
    """t is a dense CPU tensor, not a functorch wrapper nor a batched tensor of the legacy vmap
    behind torch.autograd.functional.jacobian(vectorize=True) and is_grads_batched (whose key
    set has no CPU key; the bodies' detach has no batching rule there, the ops a fallback)"""
    return ((_FT_WRAPPED is None or not _FT_WRAPPED(t)) and type(t) is torch.Tensor
            and torch._C._dispatch_keys(t).has(torch._C.DispatchKey.CPU))


def _eager(x, tensors) -> bool:
    """QuantLinear may call the ops' bodies itself: x a plain tensor, it and the other tensors
    (None skipped) on the CPU (the ops refuse a meta one among them), nothing tracing
    (torch.compile, torch.export, jit.trace), no dispatch / function mode (fake tensors,
    torch.device(...)), no torch.func transform, no profiler (its traces name the ops).
    Otherwise the custom ops."""
    if (type(x) is not torch.Tensor or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack()
            or (_FT_PEEK is not None and _FT_PEEK() is not None) or torch.autograd._profiler_enabled()):
        return False
    for t in tensors:  # a loop, not all() over a generator: this runs on every call
        if t is not None and not t.is_cpu:
            return False
    return True


class _EagerProduct(torch.autograd.Function):
    """QuantLinear's product in eager mode: the ops' bodies with the ops' gradients (a MiniLM
    384x384 layer at 80 rows: 1050 us per forward through pyqkern::matmul_lora with autograd,
    of which the product is 360). The backward calls the ops' bodies too, or under
    create_graph=True the backward ops, which carry the second-order formula (or refuse it)."""

    @staticmethod
    def forward(ctx, x, qdata, bias, adapter_ids, spec, *ab):
        args, compute, scales = spec
        m = len(scales)
        if m:
            y = _matmul_lora_impl(x, qdata, *args, bias, list(ab[:m]), list(ab[m:]), scales, adapter_ids, compute)
            ctx.save_for_backward(x, qdata, adapter_ids, *ab)
        else:
            y = _matmul_impl(x, qdata, *args, bias, compute)
            ctx.save_for_backward(qdata)
        ctx.spec = spec
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        args, _, scales = ctx.spec
        need = ctx.needs_input_grad
        # create_graph=True, or batched gradients (jacobian(vectorize=True), is_grads_batched: the
        # backward runs under vmap, whose fallback takes the ops, not the bodies' detach): the ops.
        # saved_tensors is read even for the bias alone: an edited weight is an error, as on the ops' path
        ops = torch.is_grad_enabled() or not _plain_cpu(dy)
        dx, db, dAs, dBs = _product_grads(dy, ctx.saved_tensors, args, scales, need[0], need[2], ctx.x_dtype, ops)
        return (dx, None, db, None, None, *dAs, *dBs)


# --------------------------------------------------------------------------- QuantLinear
def _refuse_forward_ad(x, module):
    """The custom ops register reverse-mode autograd only: a forward-mode tangent on x or an
    adapter would come out as zero (torch gives no error), so refuse it."""
    if _fwad.unpack_dual(x).tangent is not None or any(
            _fwad.unpack_dual(p).tangent is not None for p in module.parameters()):
        raise NotImplementedError("forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not supported "
                                  "through pyqkern's QuantLinear; reverse mode (loss.backward()) is")


# torch.func.grad / jacrev / vjp wrap x in a grad-tracking tensor; the custom ops' autograd
# formulas are torch.autograd's only, and the transforms failed inside torch with "must override
# the setup_context staticmethod" (a review)
_IS_GRAD_TRACKING = getattr(getattr(torch._C, "_functorch", None), "is_gradtrackingtensor", None)


def _refuse_func_grad(x) -> None:
    if _IS_GRAD_TRACKING is not None and not torch.compiler.is_compiling() and _IS_GRAD_TRACKING(x):
        raise NotImplementedError("torch.func.grad / jacrev / vjp are not supported through pyqkern's QuantLinear "
                                  "(its ops have torch.autograd formulas only): use torch.autograd.grad or "
                                  "loss.backward()")


_EXTRA_KEYS = ("format", "in_features", "out_features", "group", "sym", "compute", "adapters", "active")


_EMPTY_PDICT = nn.ParameterDict()
_ADAPTERS_LOCK = threading.RLock()  # QuantLinear's adapter changes (see add_adapter); re-entrant: torch parameter hooks run under it


def _check_adapter_name(name) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError("adapter name must be a non-empty string without '.'")
    if hasattr(_EMPTY_PDICT, name):  # "train", "to", "training", ...: the ParameterDict refuses them
        raise ValueError(f"adapter name {name!r} is an attribute of nn.Module; choose another name")


class QuantLinear(nn.Module):
    """A linear layer whose weight is a pyqkern QTensor, stored as the uint8 buffer ``qdata``.

    forward(x) = x @ W.T + bias (+ adapters) for x [..., in_features] float32/bfloat16/float16;
    computed in float32, returned in x's dtype. ``compute``: "auto" | "int8" | "float" as in
    pyqkern.matmul. Adapters (LoRA) are nn.Parameters ``lora_A[name]`` / ``lora_B[name]``; they
    are frozen by default (``add_adapter(..., trainable=True)`` for QLoRA training). The weight is
    always frozen.

    The kernels' packed copy of the weight is made on first use and kept while ``qdata``'s version
    counter stays the same: load_state_dict and in-place ops on ``qdata`` are seen. Writes that
    bypass the counter (through ``qdata.data``, or to an inference tensor inside
    torch.inference_mode other than by load_state_dict) are not: call ``drop_packed()`` after them."""

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
        self.register_buffer("perm", None)  # int64 [K] input permutation (GPTQ act-order): W stored as W[:, perm]
        self.compute = self._resolve_compute(compute)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self._scales = {}   # name -> float scale
        self._alphas = {}   # name -> (alpha, rslora)
        self._active = []

    def drop_packed(self) -> None:
        """Forget the packed copy of the weight and the kernels' copies of frozen adapters: the next
        forward builds them from ``qdata`` and the adapters as they are now (needed after an edit
        through ``.data``, which the tensors' version counters do not see)."""
        _drop_cache(self.qdata)
        self._drop_lora_caches()

    def _drop_lora_caches(self) -> None:
        self.__dict__.pop("_plan", None)
        for B in self.lora_B.values():
            _LORA_CACHE.pop(B)

    def __getstate__(self):  # pickle / deepcopy: the plan holds native objects, made again on use
        state = super().__getstate__()
        if "_plan" in state:
            state = dict(state)
            del state["_plan"]
        return state

    def _apply(self, *args, **kwargs):
        # .to(dtype) / .half() give the parameters new storage (same objects): the kernels' copies
        # of the old values would stay alive until the adapter runs again, maybe never
        out = super()._apply(*args, **kwargs)
        self._drop_lora_caches()
        return out

    # -- construction
    @classmethod
    def from_qtensor(cls, qt: QTensor, bias=None, *, compute: str = "auto") -> "QuantLinear":
        n, k = qt.shape
        base = qt.format
        mod = cls(k, n, bias is not None, format=base, group=qt.params.get("group") or None,
                  sym=bool(qt.params.get("sym")), double_quant=bool(qt.params.get("double_quant")), compute="float")
        mod.qdata = torch.from_numpy(np.ascontiguousarray(qt.data).reshape(-1)).clone()
        if qt.perm is not None:
            mod.perm = torch.from_numpy(np.array(qt.perm, dtype=np.int64))  # a writable copy
        if bias is not None:
            if isinstance(bias, torch.Tensor):  # a Parameter (requires grad), any float dtype or device
                bias = bias.detach().to("cpu", torch.float32).numpy()
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
        if compute not in COMPUTES:
            raise ValueError(f"compute must be one of {COMPUTES}, got {compute!r}")
        ok = int8_fits(_split_fmt(self.format)[0], self.in_features, self.group)
        if compute == "auto":
            return "int8" if ok else "float"
        if compute == "int8" and not ok:
            raise ValueError(f"{self.format}: {INT8_NEEDS}")
        return compute

    def qtensor(self) -> QTensor:
        """The weight as a QTensor sharing this module's bytes (with ``perm`` set for act-order weights)."""
        qt = qtensor_from_tensor(self.qdata, self.format, self.out_features, self.in_features, self.group, self.sym)
        return qt if self.perm is None else qt.with_perm(self.perm.numpy())

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 [out_features, in_features] (original input-channel order)."""
        w = torch.ops.pyqkern.dequantize(self.qdata, self.format, self.out_features, self.in_features,
                                         self.group, self.sym)
        return w if self.perm is None else w.index_select(1, torch.argsort(self.perm))

    @property
    def bits_per_weight(self) -> float:
        return self.qdata.numel() * 8.0 / (self.in_features * self.out_features)

    # -- adapters
    def add_adapter(self, name: str, A, B, alpha=None, *, rslora: bool = False, trainable: bool = False,
                    active: bool = True) -> None:
        """Attach LoRA A [r, in], B [out, r] under ``name``: y += alpha/r * (x @ A.T) @ B.T
        (alpha/sqrt(r) with rslora; alpha defaults to r)."""
        _check_adapter_name(name)
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already attached")
        # a read-only NumPy array (a LoRA's A / B) copied first: torch.as_tensor would warn
        A, B = (torch.as_tensor(np.array(v) if isinstance(v, np.ndarray) and not v.flags.writeable else v).detach()
                for v in (A, B))
        for what, v in (("A", A), ("B", B)):  # as LoRA(): .to(float32) would turn them into numbers silently
            if not v.is_floating_point():
                hint = " (bfloat16 bits: pass pyqkern.LoRA(A, B) to add_lora)" if v.dtype == torch.uint16 else ""
                raise TypeError(f"adapter {what} must be floating point, got {v.dtype}{hint}")
        A, B = A.to(torch.float32), B.to(torch.float32)
        why = self._adapter_shape_error(A, B)
        if why:
            raise ValueError(f"adapter shapes {why}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):  # as LoRA(): here, not in every forward
            raise ValueError(f"adapter {name!r}: A or B contains NaN or Inf")
        r = A.shape[0]
        try:  # a finite number (a NumPy / torch scalar too), not a str or bool
            a = float(r) if alpha is None else _real(alpha, "alpha")
        except TypeError as e:  # a ValueError, as this method's other argument errors
            raise ValueError(str(e)) from None
        pa = nn.Parameter(A.clone().contiguous(), requires_grad=trainable)
        pb = nn.Parameter(B.clone().contiguous(), requires_grad=trainable)
        # Threads: adapter changes one at a time and forward's look-up of the adapters it uses
        # under one lock (held for a few dict reads), and the lists / dicts forward reads are
        # replaced, not edited: a forward sees the adapters before or after a change (a review:
        # a forward during another thread's add / remove raised AttributeError / KeyError)
        with _ADAPTERS_LOCK:
            if name in self.lora_A:
                raise ValueError(f"adapter {name!r} already attached")
            self.lora_A[name] = pa
            self.lora_B[name] = pb
            self._alphas[name] = (a, bool(rslora))
            self._scales = {**self._scales, name: a / (math.sqrt(r) if rslora else r)}
            if active:
                self._active = self._active + [name]

    def add_lora(self, name: str, ad: LoRA, *, trainable: bool = False) -> None:
        """Attach a pyqkern.LoRA (e.g. from pyqkern.io.load_peft_adapter). DoRA is not supported here."""
        if ad.is_dora:
            raise NotImplementedError("DoRA adapters are not supported by QuantLinear yet")
        self.add_adapter(name, ad.A, ad.B, ad.alpha, rslora=ad.rslora, trainable=trainable)

    def remove_adapter(self, name: str) -> None:
        with _ADAPTERS_LOCK:  # see add_adapter
            if name not in self.lora_A:
                raise KeyError(f"no adapter named {name!r}; attached: {self.adapter_names}")
            self._active = [a for a in self._active if a != name]
            del self.lora_A[name]
            del self.lora_B[name]
            self._scales = {nm: v for nm, v in self._scales.items() if nm != name}
            del self._alphas[name]

    def set_adapter(self, names) -> None:
        """Adapters applied to every row when forward gets no adapter_ids (a name, a list, or [])."""
        names = [names] if isinstance(names, str) else list(names or [])
        if len(set(names)) != len(names):  # it would be applied twice
            raise ValueError(f"an adapter is named more than once in {names}")
        with _ADAPTERS_LOCK:  # see add_adapter
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

    def _adapters_used(self, every: bool):
        """(names, As, Bs, scales) of the adapters a forward applies: every attached one (for
        adapter_ids) or the active ones"""
        names = self.adapter_names if every else list(self._active)
        if not names:
            return names, [], [], []
        if torch.compiler.is_compiling():
            pa, pb = self.lora_A, self.lora_B
        else:  # nn.Module.__getattr__ costs ~0.4 us a read: four reads a call for one adapter
            pa, pb = self._modules["lora_A"], self._modules["lora_B"]
            a, b = pa._parameters, pb._parameters
            if all(nm in a and nm in b for nm in names):  # ParameterDict keeps a str key as its name
                return names, [a[nm] for nm in names], [b[nm] for nm in names], [self._scales[nm] for nm in names]
        return names, [pa[nm] for nm in names], [pb[nm] for nm in names], [self._scales[nm] for nm in names]

    # -- forward
    def forward(self, x: torch.Tensor, adapter_ids=None) -> torch.Tensor:
        """adapter_ids: None (the active adapters on every row) or one id per row of x flattened
        (ints indexing adapter_names, -1 = none; a tensor, or a list of ints / names / None)."""
        if _fwad._current_level >= 0:  # inside forward_ad.dual_level / torch.func.jvp (a global read otherwise)
            _refuse_forward_ad(x, self)
        _refuse_func_grad(x)
        qdata, bias, perm = self._qbp()
        if not (x.is_cpu and qdata.is_cpu and (bias is None or bias.is_cpu) and (perm is None or perm.is_cpu)):
            if x.device != qdata.device:  # as nn.Linear (a meta module would run the shape-only kernel)
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                                   f"{qdata.device} (the weight) and {x.device} (the input)")
            for what, t in (("bias", bias), ("perm", perm)):
                if t is not None and t.device != x.device:  # e.g. a meta skeleton loaded without its bias
                    raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two "
                                       f"devices, {x.device} (the input and weight) and {t.device} ({what})")
        if not x.is_floating_point():
            raise TypeError(f"QuantLinear expects a floating-point input, got {x.dtype}")
        out_dtype = x.dtype
        if perm is None and adapter_ids is None and not torch.compiler.is_compiling() and "_plan" in self.__dict__:
            y = self._planned(x, qdata, bias)
            if y is not None:
                return y if y.dtype == out_dtype else y.to(out_dtype)
        args = (qdata, self.format, self.out_features, self.in_features, self.group, self.sym)
        if perm is not None:  # the stored weight is W[:, perm]: x @ W.T = x[..., perm] @ W[:, perm].T
            x = x.index_select(-1, perm)
        if torch.compiler.is_compiling():  # traced: no lock (a graph break), no other thread
            names, As, Bs, scales = self._adapters_used(adapter_ids is not None)
            snap = None
        else:
            with _ADAPTERS_LOCK:  # see add_adapter
                names, As, Bs, scales = self._adapters_used(adapter_ids is not None)
                snap = (self._active, self._scales)  # what these adapters were read from
        if adapter_ids is not None:
            if not names:
                raise ValueError("adapter_ids given but no adapter is attached")
            if not isinstance(adapter_ids, torch.Tensor):
                ids = list(adapter_ids)
                if any(isinstance(v, (bool, np.bool_)) for v in ids):  # operator.index takes them as 0 / 1
                    raise TypeError("adapter_ids must hold ints, adapter names or None, not bools")
                try:
                    ids = [-1 if v is None else (names.index(v) if isinstance(v, str) else operator.index(v))
                           for v in ids]
                except ValueError:
                    raise KeyError(f"unknown adapter name in adapter_ids; attached: {names}") from None
                except TypeError:
                    raise TypeError("adapter_ids must hold ints, adapter names or None") from None
                bad = [v for v in ids if not -1 <= v < len(names)]
                if bad:
                    raise ValueError(f"adapter id {bad[0]} is out of range [-1, {len(names)})")
                adapter_ids = torch.tensor(ids, dtype=torch.int32)
            else:
                if adapter_ids.is_floating_point() or adapter_ids.is_complex() or adapter_ids.dtype == torch.bool:
                    raise TypeError(f"adapter_ids must be an integer tensor, got {adapter_ids.dtype}")
                # not cast to int32 here (2**32 would wrap to 0): the op checks the range (traceable)
                adapter_ids = adapter_ids.reshape(-1)
        if names and perm is not None:
            As = [a.index_select(1, perm) for a in As]
        tensors = (x, qdata, bias, adapter_ids, *As, *Bs)
        if _eager(x, tensors):
            spec = (args[1:], self.compute, tuple(scales))
            if (torch.is_grad_enabled() and not torch.is_inference_mode_enabled()  # enable_grad inside inference_mode: no graph
                    and any(t is not None and t.requires_grad for t in tensors)):
                y = _EagerProduct.apply(x, qdata, bias, adapter_ids, spec, *As, *Bs)
            else:
                if names:
                    y = _matmul_lora_impl(x, *args, bias, As, Bs, scales, adapter_ids, self.compute,
                                          cache=perm is None)  # permuted As are new tensors every call
                else:
                    y = _matmul_impl(x, *args, bias, self.compute)
                if perm is None and adapter_ids is None and snap is not None:
                    self._keep_plan(qdata, bias, snap, names, As, Bs, scales)
        elif names:
            y = torch.ops.pyqkern.matmul_lora(x, *args, bias, As, Bs, scales, adapter_ids, self.compute)
        else:
            y = torch.ops.pyqkern.matmul(x, *args, bias, self.compute)
        return y if y.dtype == out_dtype else y.to(out_dtype)

    # The eager inference call, planned: what the product of a frozen weight and frozen adapters
    # needs (the QTensor, the bias as float32, the adapters' native arguments) is kept after a
    # call and reused while the tensors it came from are the same objects with the same address,
    # version counter, shape, strides, dtype and requires_grad (_tkey), the active adapters and
    # scales the same objects (adapter changes replace them) and compute the same. Changing
    # format / group / sym other than through load_state_dict (which drops the plan) is not seen.
    # It skips the look-ups and cache keys of the general route: a 64x64 layer's call 7.6 -> 5.3
    # us, a rank-16 adapter's part 3.8 -> 1.4 us. A float32
    # bias is kept as a view (it sees every write), another is converted per call as before; the
    # storages are held, so a .data replacement cannot take a freed tensor's address.
    def _keep_plan(self, qdata, bias, snap, names, As, Bs, scales) -> None:
        self.__dict__.pop("_plan", None)
        compute = self.compute
        if compute not in ("auto", "int8"):
            return
        for A, B in zip(As, Bs):  # trainable adapters (an eval pass in training): rebuilt per call anyway
            if A.requires_grad or B.requires_grad or A.is_inference() or B.is_inference():
                return
        if not _plain_cpu(qdata) or (bias is not None and (bias.requires_grad or not _plain_cpu(bias)
                                                           or bias.shape != (self.out_features,))):
            return
        qt = qtensor_from_tensor(qdata, self.format, self.out_features, self.in_features, self.group, self.sym)
        if qt.perm is not None or not int8_supported(qt):
            return
        held = [qdata.untyped_storage()]
        if bias is None:
            kb, b = None, None
        else:
            # float32: a view, which sees every write; another dtype (a bf16 module): converted
            # per call as on the general route (a kept copy would miss writes through .data / numpy)
            kb, b = _tkey(bias), None
            if bias.dtype == torch.float32 and bias.is_contiguous():
                b = _x32(bias)
                if not b.flags.aligned:
                    return
            held.append(bias.untyped_storage())
        kab, nat = [], []
        for nm, A, B, sc in zip(names, As, Bs, scales):
            ad = _lora(A, B, sc, cache=True)
            ad.check_base(qt.shape)
            kab.append((nm, A, B, _tkey(A), _tkey(B)))
            nat.append(ad.native_args(qt))
            held += [A.untyped_storage(), B.untyped_storage()]
        self._plan = (qdata, _tkey(qdata), bias, kb, b, snap[0], snap[1], compute, tuple(kab), qt, nat or None,
                      tuple(held))

    def _planned(self, x, qdata, bias):
        """forward's product through the kept plan, or None where it does not apply (the general
        route then runs, and keeps a new plan)."""
        plan = self.__dict__.get("_plan")
        if plan is None or not _eager(x, ()):
            return None
        pq_, kq, pb, kb, b, act, sc, compute, kab, qt, nat, _ = plan
        if (qdata is not pq_ or bias is not pb or self._active is not act or self._scales is not sc
                or self.compute != compute or _tkey(qdata) != kq or (bias is not None and _tkey(bias) != kb)):
            return None
        if kab:
            pa, pb_ = self._modules["lora_A"]._parameters, self._modules["lora_B"]._parameters
            for nm, A, B, ka, kb_ in kab:
                if pa.get(nm) is not A or pb_.get(nm) is not B or _tkey(A) != ka or _tkey(B) != kb_:
                    return None
        if x.requires_grad and torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            return None  # a graph to record
        if b is None and bias is not None:
            b = _x32(bias)
        p = qt._packed  # None after qt.release_packed(): the general route packs again
        if p is None:
            return None
        n, k = qt.shape
        x2 = _x32(x)
        if x2.ndim == 0 or x2.shape[-1] != k or not x2.flags.aligned:
            return None
        lead = x2.shape[:-1]
        y = _int8_call(p, x2 if x2.ndim == 2 else x2.reshape(-1, k), b, nat)
        return torch.from_numpy(y if len(lead) == 1 else y.reshape(*lead, n))

    def _qbp(self):
        """(qdata, bias, perm): read from the buffer dict outside tracing, where nn.Module's
        __getattr__ costs ~0.4 us a name (three to eight reads per forward, beside a few-us
        product); a bias or perm made a Parameter or a plain attribute is still found."""
        if torch.compiler.is_compiling():
            return self.qdata, self.bias, self.perm
        b = self._buffers
        return (b["qdata"] if "qdata" in b else self.qdata, b["bias"] if "bias" in b else self.bias,
                b["perm"] if "perm" in b else self.perm)

    # -- state
    def get_extra_state(self):
        # a uint8 tensor of JSON, not a dict: safetensors (and so transformers' save_pretrained)
        # stores only tensors in a state_dict
        import json

        state = {"format": self.format, "in_features": self.in_features, "out_features": self.out_features,
                 "group": self.group, "sym": self.sym, "compute": self.compute,
                 "adapters": {nm: list(self._alphas[nm]) for nm in self.adapter_names}, "active": list(self._active),
                 "trainable": [nm for nm in self.adapter_names if self.lora_A[nm].requires_grad]}
        return torch.frombuffer(bytearray(json.dumps(state, sort_keys=True).encode()), dtype=torch.uint8)

    def _parse_extra_state(self, state) -> dict:
        """The extra state as a dict, checked against this layer (ValueError otherwise)."""
        if isinstance(state, torch.Tensor):  # the JSON bytes get_extra_state writes (a dict: older checkpoints)
            import json

            if state.dtype != torch.uint8 or state.dim() != 1:
                raise ValueError("QuantLinear extra state must be a uint8 tensor of JSON")
            try:
                state = json.loads(bytes(state.cpu().numpy()).decode())
            except (UnicodeDecodeError, ValueError):
                raise ValueError("QuantLinear extra state is not valid JSON") from None
        if not isinstance(state, dict) or any(key not in state for key in _EXTRA_KEYS):
            raise ValueError("QuantLinear extra state is missing keys")
        tr = state.get("trainable", [])
        if not isinstance(tr, list) or not all(isinstance(nm, str) for nm in tr):
            raise ValueError("QuantLinear extra state: 'trainable' must be a list of adapter names")
        if (state["in_features"], state["out_features"]) != (self.in_features, self.out_features):
            raise ValueError(f"state is for [{state['out_features']}, {state['in_features']}] but this layer is "
                             f"[{self.out_features}, {self.in_features}]")
        return state

    def set_extra_state(self, state):
        state = self._parse_extra_state(state)
        self.format, self.group, self.sym = state["format"], int(state["group"]), int(state["sym"])
        self.compute = self._resolve_compute(state["compute"])
        alphas = {nm: (float(a), bool(rs)) for nm, (a, rs) in state["adapters"].items()}
        for nm in self.lora_A:  # attached here, absent from a partial state (strict=False): kept as it was
            if nm not in alphas and nm in self._alphas:
                alphas[nm] = self._alphas[nm]
        self._alphas = alphas
        # adapters attached here and absent from a partial state stay active if they were
        kept = [nm for nm in self._active if nm in self.lora_A and nm not in state["adapters"]]
        self._active = list(dict.fromkeys(list(state["active"]) + kept))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checked before anything changes (review: a refused state left qdata resized for it, and
        # every forward failed after): the extra state against this layer, and qdata's size
        # against the format it will have (the state's, else this layer's). Problems go to
        # error_msgs, which load_state_dict raises as RuntimeError, as torch's own size checks do.
        q = state_dict.get(prefix + "qdata")
        extra = state_dict.get(prefix + "_extra_state")
        try:
            st = self._parse_extra_state(extra) if extra is not None else None
            fmt, group, sym = ((st["format"], int(st["group"]), int(st["sym"])) if st is not None
                               else (self.format, self.group, self.sym))
            for key, size in (("bias", self.out_features), ("perm", self.in_features)):
                v = state_dict.get(prefix + key)
                if v is not None and tuple(v.shape) != (size,):  # created below before torch's own check
                    raise ValueError(f"{key} of shape {tuple(v.shape)} does not fit this layer ({size},)")
            v = state_dict.get(prefix + "perm")
            if v is not None and not v.is_meta and (v.is_floating_point() or v.is_complex() or v.dtype == torch.bool
                                                    or not torch.equal(torch.sort(v.long()).values,
                                                                       torch.arange(self.in_features))):
                raise ValueError(f"perm is not a permutation of range({self.in_features}) (dtype {v.dtype})")
            if st is not None and q is None and (fmt, group, sym) != (self.format, self.group, self.sym):
                raise ValueError(f"the extra state is for a {fmt} weight (group {group}, sym {sym}) but the state "
                                 f"has no qdata, and this layer holds {self.format} (group {self.group}, sym {self.sym})")
            self._check_adapter_state(state_dict, prefix, st)
            if q is not None:
                want = _nbytes(fmt, self.out_features, self.in_features, group, sym)
                if q.dim() != 1 or q.numel() != want:
                    raise ValueError(f"qdata of shape {tuple(q.shape)} does not hold a {fmt} "
                                     f"[{self.out_features}, {self.in_features}] weight ({want} bytes)"
                                     + ("" if st is not None else " (the state has no extra state naming "
                                                                  "another format)"))
        except (ValueError, TypeError, KeyError) as e:
            error_msgs.append(f"{prefix or 'QuantLinear'}: {e}")
            return
        # the byte count depends on the format: resize qdata (and create adapter parameters) first;
        # as normal tensors under inference_mode too (inference tensors could not be saved for
        # backward nor loaded into again afterwards)
        with torch.inference_mode(False):
            if q is not None and q.shape != self.qdata.shape:
                self.qdata = torch.empty(q.shape, dtype=torch.uint8)
            b = state_dict.get(prefix + "bias")
            if b is not None and self.bias is None:
                self.bias = torch.empty(self.out_features, dtype=torch.float32)
            p = state_dict.get(prefix + "perm")
            if p is not None and (self.perm is None or self.perm.shape != p.shape):
                self.perm = torch.empty(self.in_features, dtype=torch.int64)
            elif p is None and q is not None:  # a weight without an input permutation replaces this one
                self.perm = None
            trainable = None if st is None else st.get("trainable")
            for key, val in state_dict.items():
                for which, pdict in (("lora_A.", self.lora_A), ("lora_B.", self.lora_B)):
                    if key.startswith(prefix + which):
                        nm = key[len(prefix + which):]
                        if "." not in nm and (nm not in pdict or pdict[nm].shape != val.shape):
                            # trainable as the state says (its extra state lists them), else as the
                            # parameter it replaces (a different rank), else frozen
                            grad = (nm in trainable if trainable is not None
                                    else nm in pdict and pdict[nm].requires_grad)
                            pdict[nm] = nn.Parameter(torch.empty(val.shape, dtype=torch.float32), requires_grad=grad)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # the copy into qdata bumps its version counter, except for an inference tensor (no counter)
        self.drop_packed()
        self._active = [nm for nm in self._active if nm in self.lora_A]
        scales = {}
        for nm, (a, rs) in self._alphas.items():
            if nm in self.lora_A:
                r = self.lora_A[nm].shape[0]
                scales[nm] = a / (math.sqrt(r) if rs else r)
        self._scales = scales

    def _adapter_shape_error(self, A, B):
        """why A [r, in] / B [out, r] do not fit this layer (r >= 1), or None"""
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != self.in_features or B.shape[0] != self.out_features \
                or A.shape[0] != B.shape[1] or A.shape[0] == 0:
            return (f"A {tuple(A.shape)} / B {tuple(B.shape)} do not fit [r, {self.in_features}] / "
                    f"[{self.out_features}, r]")
        return None

    def _check_adapter_state(self, state_dict, prefix, st) -> None:
        """ValueError, before anything changes, unless every adapter the state holds weights of ends up
        with both halves (from the state, or attached here), shapes that fit this layer and each
        other, and an alpha (from the state's extra state, or attached here)."""
        halves = {}
        for key, val in state_dict.items():
            for which in ("lora_A.", "lora_B."):
                if key.startswith(prefix + which) and "." not in key[len(prefix + which):]:
                    halves.setdefault(key[len(prefix + which):], {})[which] = val
        alphas = set(st["adapters"]) if st is not None else set()
        for nm, h in halves.items():
            _check_adapter_name(nm)
            A = h.get("lora_A.", self.lora_A[nm] if nm in self.lora_A else None)
            B = h.get("lora_B.", self.lora_B[nm] if nm in self.lora_B else None)
            if A is None or B is None:
                raise ValueError(f"adapter {nm!r}: the state has lora_{'A' if B is None else 'B'}.{nm} but not "
                                 f"lora_{'B' if B is None else 'A'}.{nm}, and no such adapter is attached here")
            why = self._adapter_shape_error(A, B)
            if why:
                raise ValueError(f"adapter {nm!r}: {why}")
            if not (A.is_floating_point() and B.is_floating_point()):
                raise ValueError(f"adapter {nm!r}: A / B must be floating point, got {A.dtype} / {B.dtype}")
            if nm not in alphas and nm not in self._alphas:
                raise ValueError(f"adapter {nm!r} has weights in the state dict but no alpha in its extra state")

    def extra_repr(self) -> str:
        fmt, dq = _split_fmt(self.format)
        extra = ""
        if fmt in _formats.GROUPED:
            extra = f", group={self.group}" + (", sym" if self.sym else "") + (", double_quant" if dq else "")
        if self.perm is not None:
            extra += ", act_order"
        s = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
             f"format={fmt}{extra}, {self.bits_per_weight:.3f} bits/weight, compute={self.compute}")
        if self.lora_A:
            s += f", adapters={self.adapter_names}, active={self._active}"
        return s


# --------------------------------------------------------------------------- quantize_model
def _matches(name, patterns):
    """name, or a module it sits in, matches one of the patterns (exact dotted names or fnmatch
    patterns): a pattern naming a parent covers its children, as a plain name always did
    ("*.attn" covers layers.0.attn.q)."""
    import fnmatch

    if isinstance(patterns, str):
        patterns = [patterns]
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(pre, p) or pre == p for p in patterns for pre in prefixes)


def _fits(fmt, k, group, sym, double_quant, compute="auto"):
    """None if a [*, k] layer can become fmt (with compute="int8": run the int8 kernels, checked
    here so an unfit layer is skipped before any layer is replaced), else why not."""
    try:
        params = _formats.resolve_params(fmt, k, group, sym, double_quant)
    except ValueError as e:
        return str(e)
    if compute == "int8" and not int8_fits(fmt, k, params["group"]):
        return INT8_NEEDS
    return None


def _progress(total, progress, desc):
    """A tqdm bar (if tqdm is installed and progress is not False; None = only on a terminal)."""
    if progress is False or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="layer", leave=False, disable=None if progress is None else False)


_READS_WEIGHT: dict = {}


def _reads_weight(parent: nn.Module, child: str) -> bool:
    """parent's forward reads self.<child>.weight (T5's feed-forward reads wo.weight.dtype): a
    QuantLinear there, which has no float weight, would break it"""
    import inspect
    import re

    key = (type(parent), child)
    if key not in _READS_WEIGHT:
        try:
            src = inspect.getsource(type(parent).forward)
        except (OSError, TypeError):
            src = ""
        _READS_WEIGHT[key] = re.search(rf"\bself\.{re.escape(child)}\.weight\b", src) is not None
    return _READS_WEIGHT[key]


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _install(model, summary, name, lin, q, verbose, note=""):
    before = lin.weight.numel() * lin.weight.element_size()
    if lin.bias is not None:
        before += lin.bias.numel() * lin.bias.element_size()
    after = q.qdata.numel() + (0 if q.bias is None else q.bias.numel() * 4) + (0 if q.perm is None else
                                                                                q.perm.numel() * 8)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    q.train(lin.training)  # a new module starts in training mode; keep the replaced one's
    # hooks registered on the replaced layer run on its replacement: the same dicts, so the
    # handles that registered them still remove them
    for attr in _HOOK_DICTS:
        d = getattr(lin, attr, None)
        if d:
            setattr(q, attr, d)
    if lin._backward_hooks:  # torch runs full backward hooks only with this flag set
        q._is_full_backward_hook = lin._is_full_backward_hook
    setattr(parent, child, q)
    summary["quantized"].append(name)
    summary["bytes_before"] += before
    summary["bytes_after"] += after
    if verbose:
        print(f"[pyqkern] {name}: [{lin.out_features}, {lin.in_features}] -> {_split_fmt(q.format)[0]} "
              f"({q.bits_per_weight:.2f} bits/weight, {before} -> {after} bytes){note}", flush=True)


def quantize_model(model: nn.Module, format: str = "q4_0", include=None, exclude=None, *, group=None, sym=False,
                   double_quant=False, compute="auto", calib=None, gptq=None, sequential=True, mask_padding=True,
                   progress=None, verbose=False) -> dict:
    """Replace the model's nn.Linear layers by QuantLinear, in place; with ``calib``, by GPTQ.

    include / exclude: module names or fnmatch patterns ("*.mlp.*"; a name or pattern that matches
    a module also matches its submodules: "*.attn" covers layers.0.attn.q_proj); None includes all
    / excludes none. Skipped with a warning: layers whose in_features does not fit the format's
    block (or, with compute="int8", the int8 kernels), layers torch reads directly instead of
    calling them (nn.MultiheadAttention's out_proj, nn.TransformerEncoderLayer / DecoderLayer's
    linear1 / linear2, and any layer whose parent's forward reads ``self.<layer>.weight``, as T5's
    feed-forward does), nn.Linear subclasses with their own forward, a module reached under
    several names, and a layer whose weight is tied to another module's (an LM head tied to the
    embedding: untie it first to quantize it).

    Without ``calib`` every layer is rounded to nearest (pq.quantize). With ``calib`` (an iterable
    of model inputs: a tensor -> model(t), a tuple -> model(*t), a dict -> model(**d); a single
    tensor or dict counts as one batch) the layers are quantized with GPTQ (pyqkern.gptq; the
    formats in ``pyqkern.gptq.FORMATS``, others raise ValueError). ``gptq``: a dict of extra
    options for :meth:`pyqkern.gptq.GPTQ.quantize` (``act_order``, ``static_groups``, ``damp``,
    ``blocksize``, ...); group / sym / double_quant come from this function's arguments. Each
    layer's Hessian comes from its inputs, captured with forward pre-hooks while the calibration
    batches run (model in eval mode, no grad; the train/eval flags are restored afterwards).
    With ``mask_padding`` and a dict batch holding a 2-D ``attention_mask`` [B, T], layer inputs
    shaped [B, T, K] contribute their unmasked tokens only.

    sequential=True (default): layers are quantized in execution order and each layer's Hessian
    is taken with every earlier layer already quantized, so it sees the quantized model's
    activations (as AutoGPTQ's ``true_sequential``). Layers that read the same input tensor
    (e.g. q, k, v) form one stage. If the targeted layers sit in a list of repeated blocks (an
    nn.ModuleList of one block type, called in order, each block's first argument the previous
    block's output: HF transformers' layers), the inputs of the first block are cached once and
    each block runs on its own (stages + 1 block passes per block; linears before / after the
    blocks get whole-model passes, stopped at the first block when possible). Otherwise every
    stage costs one pass of the whole model over the calibration data. Key-value caches passed
    to the blocks are replaced by None. sequential=False: one pass of the float model; every
    Hessian from float activations (all Hessians in memory at once).

    The calibration runs inside :class:`threads` (torch 1 thread, pyqkern the larger thread
    count; restored afterwards): MiniLM int4 GPTQ on a loaded 2-core VM took 36 s instead of 64 s.
    Layers never called on the calibration data are rounded to nearest, with a warning.
    progress: a tqdm bar over the layers (None: on a terminal only, True: always, False: never;
    none if tqdm is not installed). verbose=True prints one line per layer and a total.

    Returns {"quantized": [names], "skipped": {name: reason}, "bytes_before", "bytes_after"}
    (bytes of the replaced layers' weights and biases, and act-order permutations), plus with
    calib ``"gptq"``: {name: {"gptq": e, "rtn": e, "tokens": n, "damp": d}} where e is the
    relative output error ||XWᵀ - XŴᵀ|| / ||XWᵀ|| on the layer's calibration inputs X (what
    :meth:`pyqkern.gptq.GPTQ.report` computes; here from the Hessian, so X is not kept) of GPTQ
    and of round-to-nearest in the same format, and ``"calibration"``: {"mode", "batches",
    "model_passes", "block_passes", "seconds"}."""
    if format not in _formats.FORMATS:
        raise ValueError(f"unknown format {format!r}; supported: {', '.join(_formats.FORMATS)}")
    if isinstance(model, nn.Linear):
        raise TypeError("quantize_model replaces submodules; wrap a single nn.Linear with QuantLinear.from_linear")
    if gptq is not None and calib is None:
        raise ValueError("gptq options need calibration data: pass calib=[batch, ...]")
    summary = {"quantized": [], "skipped": {}, "bytes_before": 0, "bytes_after": 0}
    mha = {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
           for c, _ in m.named_children()}
    paths = {}  # a module reachable under several names (reused): replacing one name leaves the others
    for n, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(n)
    owners = {}  # a weight tied to another module's (lm_head and the embedding): the float one stays there
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)
    # torch's encoder / decoder layers check linear1.weight / linear2.weight for their fused eval path
    tlayer = {f"{n}.{c}" if n else c for n, m in model.named_modules()
              if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
              for c in ("linear1", "linear2")}
    targets = []
    for name, lin in model.named_modules():
        if not isinstance(lin, nn.Linear) or not name:
            continue
        if include is not None and not _matches(name, include):
            continue
        if exclude is not None and _matches(name, exclude):
            continue
        if lin.weight.is_meta:
            raise ValueError(f"{name}'s weight is on the meta device (not loaded): load the weights first "
                             "(nothing was replaced)")
        parent_name, _, child = name.rpartition(".")
        if name in mha:
            why = "nn.MultiheadAttention reads out_proj.weight directly, not through the module"
        elif name in tlayer:
            why = "nn.TransformerEncoderLayer / DecoderLayer read linear1.weight / linear2.weight directly"
        elif len(paths[id(lin)]) > 1:
            why = f"the same module is also reached as {', '.join(p for p in paths[id(lin)] if p != name)}"
        elif len(owners.get(id(lin.weight), ())) > 1:
            tied = ", ".join(p for p in owners[id(lin.weight)] if p != name + ".weight")
            why = f"its weight is tied to {tied}: the float tensor would stay there beside a quantized copy"
        elif type(lin).forward is not nn.Linear.forward:
            why = f"{type(lin).__name__} has its own forward, which a QuantLinear would drop"
        elif _reads_weight(model.get_submodule(parent_name) if parent_name else model, child):
            why = (f"{type(model.get_submodule(parent_name) if parent_name else model).__name__}.forward reads "
                   f"{child}.weight directly (a QuantLinear has no float weight)")
        else:
            why = _fits(format, lin.in_features, group, sym, double_quant, compute)
        if why is not None:
            warnings.warn(f"pyqkern.torch.quantize_model: skipping {name}: {why}", stacklevel=2)
            summary["skipped"][name] = why
            continue
        targets.append((name, lin))
    if calib is not None:
        run = _GPTQRun(model, targets, format, group, sym, double_quant, compute, gptq, calib, sequential,
                       mask_padding, summary, verbose)
        bar = _progress(len(targets), progress, f"GPTQ {format}")
        try:
            run.run(bar)
        finally:
            if bar is not None:
                bar.close()
    else:
        bar = _progress(len(targets), progress, f"quantize {format}")
        try:
            # every layer quantized before any is replaced: an error (NaN in a weight) leaves the
            # model as it was, not half quantized (the quantized copies are a fraction of its size)
            done = []
            for name, lin in targets:
                try:
                    q = QuantLinear.from_linear(lin, format, group=group, sym=sym, double_quant=double_quant,
                                                compute=compute)
                except (ValueError, TypeError) as e:
                    if type(e) in (ValueError, TypeError):  # named; a subclass re-raised as it is
                        raise type(e)(f"{name}: {e} (nothing was replaced)") from e
                    raise
                done.append((name, lin, q))
                if bar is not None:
                    bar.update(1)
            for name, lin, q in done:
                _install(model, summary, name, lin, q, verbose)
        finally:
            if bar is not None:
                bar.close()
    if verbose:
        b0, b1 = summary["bytes_before"], summary["bytes_after"]
        print(f"[pyqkern] {len(summary['quantized'])} layers quantized to {format}, {len(summary['skipped'])} "
              f"skipped; {b0 / 2**20:.2f} MiB -> {b1 / 2**20:.2f} MiB" + (f" ({b0 / b1:.2f}x smaller)" if b1 else ""))
    return summary


# --------------------------------------------------------------------------- threads
class _ThreadsState:
    """Blocks of ``threads`` open across Python threads: the thread counts from before the first one
    are restored when the last one closes (each block restoring what it saw on entry leaked a
    block's counts when blocks in two threads overlapped). A block nested in the same thread
    restores the enclosing block's counts."""
    lock = threading.Lock()
    depth = 0
    saved = None
    local = threading.local()

    # Callers hold ``lock`` from reading the counts to setting them (enter) and from exit to the
    # restore: reading them outside it let a block opening while another restored record that
    # block's counts as the ones to restore (four threads left pyqkern at 1 thread instead of 2).

    @classmethod
    def enter(cls, t, p):
        if cls.depth == 0:
            cls.saved = (t, p)
        cls.depth += 1
        cls.local.depth = getattr(cls.local, "depth", 0) + 1

    @classmethod
    def exit(cls):
        """-> the counts to restore: the ones before the first block, "nested" (the enclosing
        block's, in this thread), or None (another thread's block is open: restore nothing)"""
        cls.local.depth -= 1
        cls.depth -= 1
        if cls.depth == 0:
            return cls.saved
        return "nested" if cls.local.depth > 0 else None


class threads:
    """Context manager (and decorator) giving the CPU cores to pyqkern's kernels: inside it torch
    runs its own ops on ``torch_threads`` intra-op threads (default 1) and pyqkern on
    ``pyqkern_threads`` (default: the larger of torch's and pyqkern's thread counts on entry).
    Both are restored on exit. Nests; process-wide like torch.set_num_threads.

        with pqt.threads():
            y = model(x)            # or a whole training step: forward, backward, optimizer

    Why: after every parallel op torch's OpenMP workers busy-wait for the next one, and pyqkern's
    pool splits each matmul statically over its threads; with both pools at the core count they
    take turns on the same cores and every pyqkern matmul waits for its slowest share. With torch
    at one thread nothing spins between pyqkern's jobs. Worth it when the quantized matmuls are
    most of the time (measured numbers: pyqkern.torch's commit log / README). ``attach_threads``
    does the same around every forward of a model."""

    def __init__(self, pyqkern_threads: Optional[int] = None, torch_threads: int = 1):
        for name, v in (("pyqkern_threads", pyqkern_threads), ("torch_threads", torch_threads)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.pyqkern_threads = pyqkern_threads
        self.torch_threads = torch_threads
        self._saved = []

    def __enter__(self):
        from . import get_num_threads, set_num_threads

        with _ThreadsState.lock:
            t, p = torch.get_num_threads(), get_num_threads()
            self._saved.append((t, p))
            _ThreadsState.enter(t, p)
            n = self.pyqkern_threads or max(t, p)
            if p != n:
                set_num_threads(n)
            if t != self.torch_threads:
                torch.set_num_threads(self.torch_threads)
        return self

    def __exit__(self, *exc):
        from . import get_num_threads, set_num_threads

        t, p = self._saved.pop()
        with _ThreadsState.lock:
            outer = _ThreadsState.exit()
            if outer is None:  # another Python thread is still inside a block: leave its settings
                return False
            t, p = outer if outer != "nested" else (t, p)
            if torch.get_num_threads() != t:
                torch.set_num_threads(t)
            if get_num_threads() != p:
                set_num_threads(p)
        return False

    def __call__(self, fn):
        import functools

        @functools.wraps(fn)
        def wrapped(*a, **kw):
            with threads(self.pyqkern_threads, self.torch_threads):
                return fn(*a, **kw)
        return wrapped


def attach_threads(model: nn.Module, pyqkern_threads: Optional[int] = None, torch_threads: int = 1):
    """Run every forward of ``model`` inside :class:`threads` (forward pre-hook + an always-called
    forward hook). A backward pass runs after the forward returns, outside it: wrap training steps
    in ``with pqt.threads():`` instead. Returns a handle whose ``remove()`` detaches the hooks."""
    pol = threads(pyqkern_threads, torch_threads)

    def pre(mod, args):
        pol.__enter__()

    def post(mod, args, out):
        pol.__exit__(None, None, None)

    h1 = model.register_forward_pre_hook(pre)
    h2 = model.register_forward_hook(post, always_call=True)

    class _Handle:
        def remove(self):
            h1.remove()
            h2.remove()
    return _Handle()


# --------------------------------------------------------------------------- PEFT adapters
def save_peft_adapter(model: nn.Module, path, adapter_name: Optional[str] = None, *,
                      base_model_name_or_path: Optional[str] = None) -> list:
    """Write the adapter ``adapter_name`` of every QuantLinear in ``model`` as a Hugging Face PEFT
    adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
    ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (float32), <module> being the
    layer's name in ``model`` (pass the model PEFT will wrap). ``peft.PeftModel.from_pretrained``
    loads it onto the float model (same scale alpha/r or alpha/sqrt(r) with rslora; per-layer rank
    and alpha through rank_pattern / alpha_pattern). adapter_name None: the one adapter name the
    model's QuantLinear layers carry. Returns the module names written. See pyqkern.io.peft."""
    from .io import peft as _peft_io

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise ValueError("the model has no QuantLinear layers (quantize_model first, then add adapters)")
    if adapter_name is None:
        names = sorted({a for _, m in layers for a in m.adapter_names})
        if len(names) != 1:
            raise ValueError(f"pass adapter_name=: the model's QuantLinear layers carry adapters {names}")
        adapter_name = names[0]
    ads = {}
    for n, m in layers:
        if adapter_name in m.lora_A:
            alpha, rslora = m._alphas[adapter_name]
            A = m.lora_A[adapter_name].detach().to("cpu", torch.float32).numpy()
            B = m.lora_B[adapter_name].detach().to("cpu", torch.float32).numpy()
            ads[n] = LoRA(A, B, alpha, rslora=rslora, storage="float32")
    if not ads:
        raise ValueError(f"no QuantLinear layer has an adapter named {adapter_name!r}")
    _peft_io.save_peft_adapter(path, ads, base_model_name_or_path)
    return sorted(ads)


def load_peft_adapter(model: nn.Module, path, adapter_name: str = "default", *, trainable: bool = False,
                      active: bool = True) -> list:
    """Attach a PEFT LoRA adapter directory (pyqkern.io.load_peft_adapter) to the model's QuantLinear
    layers under ``adapter_name`` (``add_adapter``; trainable / active as there). Module names in
    the file must be names in ``model``, and those modules QuantLinear layers. Checks every target
    before attaching anything. DoRA adapters are not supported; the config's lora_dropout is not
    applied (a warning says so when trainable=True). Returns the module names."""
    import json
    import os

    from .io import peft as _peft_io

    _check_adapter_name(adapter_name)  # before the file is read
    ads = _peft_io.load_peft_adapter(path)
    if trainable:  # the config was read and checked above
        with open(os.path.join(os.fspath(path), "adapter_config.json"), encoding="utf-8") as f:
            drop = json.load(f).get("lora_dropout") or 0.0
        if isinstance(drop, (int, float)) and drop > 0:
            warnings.warn(f"{path}: lora_dropout={drop} is not applied: QuantLinear runs adapters without "
                          "dropout, in training too (PEFT drops the adapter branch's input)", stacklevel=2)
    plan = []
    for name, ad in ads.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"{path}: the adapter targets {name!r}, which is not a module of this model") from None
        if not isinstance(mod, QuantLinear):
            hint = ("quantize_model replaces nn.Linear layers only; GPT-2-style Conv1D layers stay as they are"
                    if type(mod).__name__ == "Conv1D" else "quantize the model with pyqkern.torch.quantize_model first")
            raise TypeError(f"{path}: {name} is a {type(mod).__name__}, not a QuantLinear ({hint})")
        if ad.is_dora:
            raise NotImplementedError(f"{path}: DoRA adapters are not supported by QuantLinear yet")
        if (ad.in_features, ad.out_features) != (mod.in_features, mod.out_features):
            raise ValueError(f"{path}: {name}: adapter is [{ad.out_features}, {ad.in_features}] but the layer is "
                             f"[{mod.out_features}, {mod.in_features}]")
        if adapter_name in mod.lora_A:
            raise ValueError(f"{name} already has an adapter named {adapter_name!r}")
        plan.append((mod, ad))
    for mod, ad in plan:
        mod.add_adapter(adapter_name, ad.A, ad.B, ad.alpha, rslora=ad.rslora, trainable=trainable, active=active)
    return sorted(ads)


# --------------------------------------------------------------------------- GPTQ driver
_CACHE_KWARGS = ("cache", "past_key_value", "past_key_values", "layer_past")


class _StopForward(Exception):
    """Raised by a hook to end a calibration forward early (the rest of the model is not needed)."""


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    try:  # transformers ModelOutput
        v = out[0]
    except (TypeError, IndexError, KeyError):
        return None
    return v if isinstance(v, torch.Tensor) else None


def _tensors(obj, depth=0):
    """Tensors inside nested tuples / lists / dicts (a few levels)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)


def _input_key(x):
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, _version(x))


def _strip_cache(kw):
    kw = dict(kw)
    for key in _CACHE_KWARGS:
        if key in kw:
            kw[key] = None
    if "use_cache" in kw:
        kw["use_cache"] = False
    return kw


def _calib_items(calib, mask_padding):
    from collections.abc import Mapping

    if isinstance(calib, (torch.Tensor, Mapping)):
        calib = [calib]
    try:
        items = list(calib)
    except TypeError:
        raise TypeError(f"calib must be an iterable of model inputs, got {type(calib).__name__}") from None
    if not items:
        raise ValueError("calib is empty: give at least one batch of model inputs")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            args, kw = (item,), {}
        elif isinstance(item, Mapping):
            args, kw = (), dict(item)
        elif isinstance(item, (tuple, list)):
            args, kw = tuple(item), {}
        else:
            raise TypeError(f"calib[{i}]: expected a tensor, a tuple of positional inputs or a dict of keyword "
                            f"inputs, got {type(item).__name__}")
        mask = None
        am = kw.get("attention_mask")
        if mask_padding and isinstance(am, torch.Tensor) and am.dim() == 2:
            mb = am != 0
            if not bool(mb.all()):
                mask = mb
        out.append((args, kw, mask))
    return out


def _find_blocks(model, names):
    """The nn.ModuleList of one module type holding the most targeted layers (in >= 2 of its
    entries): (its name, [block modules]) or None."""
    best = None
    for lname, ml in model.named_modules():
        if not isinstance(ml, nn.ModuleList) or len(ml) < 2 or len({type(b) for b in ml}) != 1:
            continue
        prefix = lname + "." if lname else ""
        counts = [sum(1 for n in names if n.startswith(f"{prefix}{j}.")) for j in range(len(ml))]
        if sum(1 for c in counts if c) < 2:
            continue
        if best is None or sum(counts) > best[0]:
            best = (sum(counts), lname, list(ml))
    return None if best is None else best[1:]


def _hessian_rel_err(H, W, n, whats):
    """||X(W - Ŵ)ᵀ|| / ||XWᵀ|| from H = 2/n XᵀX: sqrt(tr(D H Dᵀ) / tr(W H Wᵀ)), for each Ŵ."""
    W = W.astype(np.float64)
    den = float(np.einsum("ij,ij->", W @ H, W))
    out = []
    for wh in whats:
        d = W - np.asarray(wh, np.float64)
        num = max(float(np.einsum("ij,ij->", d @ H, d)), 0.0)
        out.append(math.sqrt(num / den) if den > 0 else math.sqrt(num * n / 2))
    return out


class _GPTQRun:
    """GPTQ over a model's targeted nn.Linear layers (see quantize_model)."""

    def __init__(self, model, targets, fmt, group, sym, double_quant, compute, gptq, calib, sequential,
                 mask_padding, summary, verbose):
        from . import gptq as gmod

        if fmt not in gmod.FORMATS:
            raise ValueError(f"GPTQ (calib=...) does not support format {fmt!r}; pyqkern.gptq supports "
                             f"{', '.join(gmod.FORMATS)}. Quantize {fmt} without calib (round-to-nearest) "
                             f"or pick one of those")
        self.gmod = gmod
        self.model = model
        self.names = [n for n, _ in targets]
        self.lin = dict(targets)
        self.fmt, self.group, self.sym, self.dq = fmt, group, sym, double_quant
        self.compute = compute
        self.qkw = self._options(gptq)
        self.items = _calib_items(calib, mask_padding)
        self.sequential = bool(sequential)
        self.summary = summary
        self.verbose = verbose
        self.g = {}
        self._mask = None
        self.bar = None
        self.model_passes = 0
        self.block_passes = 0

    def _options(self, gptq):
        import inspect
        from collections.abc import Mapping

        if gptq is None or gptq is True:
            user = {}
        elif isinstance(gptq, Mapping):
            user = dict(gptq)
        else:
            raise TypeError(f"gptq must be a dict of GPTQ.quantize options (or None), got {type(gptq).__name__}")
        for key in ("format", "group_size", "sym", "double_quant"):
            if key in user:
                raise ValueError(f"gptq={{{key!r}: ...}}: give format / group / sym / double_quant to quantize_model "
                                 f"itself")
        kw = {"format": self.fmt}
        if self.fmt in _formats.GROUPED:
            # every targeted layer passed _fits, so this resolves for the default group too
            g = _formats.DEFAULT_GROUP[self.fmt] if self.group in (None, 0) else int(self.group)
            kw["group_size"] = g
            kw["sym"] = bool(self.sym)
        kw.update(user)  # double_quant: applied to GPTQ's result in _finish (GPTQ.quantize has no such option)
        accepted = inspect.signature(self.gmod.GPTQ.quantize).parameters
        bad = [k for k in kw if k not in accepted]
        if bad:
            raise ValueError(f"pyqkern.gptq.GPTQ.quantize does not take {bad}; it takes "
                             f"{[k for k in accepted if k != 'self']}")
        return kw

    # -- running the model / a block
    def _call_model(self, item, stop_at=None):
        args, kw, mask = item
        self._mask = mask
        hook = None
        if stop_at is not None:
            def stop(mod, a):
                raise _StopForward
            hook = stop_at.register_forward_pre_hook(stop)
        try:
            self.model(*args, **kw)
        except _StopForward:
            pass
        finally:
            if hook is not None:
                hook.remove()
            self._mask = None

    def _model_pass(self, stop_at=None):
        for item in self.items:
            self._call_model(item, stop_at)
        self.model_passes += 1

    def _hooks(self, names):
        hs = []
        for name in names:
            g = self.g[name]

            def f(mod, args, kwargs, g=g):
                x = args[0] if args else kwargs.get("input")
                if not isinstance(x, torch.Tensor):
                    return
                m = self._mask
                if m is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(m.shape):
                    x = x[m]
                g.add_batch(x.detach().reshape(-1, x.shape[-1]).float().numpy())

            hs.append(self.lin[name].register_forward_pre_hook(f, with_kwargs=True))
        return hs

    def _accumulate(self, names, run):
        """GPTQ state for names, run() with hooks feeding their Hessians, then quantize them."""
        for name in names:
            self.g[name] = self.gmod.GPTQ(self.lin[name].weight.detach().float().cpu().numpy())
        hs = self._hooks(names)
        try:
            out = run()
        finally:
            for h in hs:
                h.remove()
        got = [self._finish(name) for name in names]
        return out, any(got)

    def _finish(self, name):
        g = self.g.pop(name)
        lin = self.lin[name]
        # not called, or only on all-zero inputs (GPTQ refuses: it would zero the weight)
        idle = g.nsamples == 0 or g.inputs_all_zero
        if idle:
            why = "was not called on" if g.nsamples == 0 else "saw only zeros in"
            warnings.warn(f"pyqkern.torch.quantize_model: {name} {why} the calibration data; "
                          f"rounded to nearest instead of GPTQ", stacklevel=4)
            q = QuantLinear.from_linear(lin, self.fmt, group=self.group, sym=self.sym, double_quant=self.dq,
                                        compute=self.compute)
            self.summary["gptq"][name] = None
            _install(self.model, self.summary, name, lin, q, self.verbose, " (RTN: no calibration data)")
        else:
            try:
                qt = g.quantize(**self.qkw)
            except ValueError as e:
                raise ValueError(f"pyqkern.torch.quantize_model: GPTQ failed on {name}: {e}") from e
            if self.dq and qt.format in _formats.BNB4:  # bitsandbytes' double quantization of the absmax
                from . import _qtensor

                perm = qt.perm
                qt = _qtensor.assemble(qt.format, *qt.shape, dict(qt.params, double_quant=True), *qt.sections())
                if perm is not None:
                    qt = qt.with_perm(perm)
            # round-to-nearest in the format GPTQ produced (gptq={"bits": 3} turns int4 into int3)
            base = qt.format
            rtn = _pq_quantize(g.W, base, group=qt.params.get("group"), sym=qt.params.get("sym"),
                               double_quant=self.dq and base in _formats.BNB4)
            e_g, e_r = _hessian_rel_err(g.H, g.W, g.nsamples, [_pq_dequantize(qt), _pq_dequantize(rtn)])
            self.summary["gptq"][name] = {"gptq": e_g, "rtn": e_r, "tokens": int(g.nsamples),
                                          "damp": float(g.damp_used)}
            bias = None if lin.bias is None else lin.bias.detach().to("cpu", torch.float32).numpy()
            q = QuantLinear.from_qtensor(qt, bias, compute=self.compute)
            _install(self.model, self.summary, name, lin, q, self.verbose,
                     f", rel. output error GPTQ {e_g:.4f} vs RTN {e_r:.4f}")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(name, refresh=False)
        return g.nsamples > 0

    # -- the whole run
    def run(self, bar=None):
        self.bar = bar
        self.summary["gptq"] = {}
        flags = [(m, m.training) for m in self.model.modules()]
        by_name = {n: m.training for n, m in self.model.named_modules()}  # for the layers replaced meanwhile
        self.model.eval()
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), threads():  # torch's spinning OpenMP workers would slow every pass
                mode = self._sequential() if self.sequential else self._parallel()
        finally:
            for m, t in flags:
                m.training = t
            for n in self.summary["quantized"]:
                self.model.get_submodule(n).train(by_name.get(n, self.model.training))
        self.summary["calibration"] = {"mode": mode, "batches": len(self.items), "model_passes": self.model_passes,
                                       "block_passes": self.block_passes, "seconds": time.perf_counter() - t0}

    def _parallel(self):
        self._accumulate(self.names, self._model_pass)
        return "parallel (one float pass)"

    def _discover(self, blocks):
        """One forward of the first batch, recording the targeted layers' calls (with their input
        tensors) and the blocks' calls."""
        events = []
        hs = []
        for name in self.names:
            def f(mod, args, kwargs, name=name):
                x = args[0] if args else kwargs.get("input")
                if isinstance(x, torch.Tensor):
                    events.append(("lin", name, x))
            hs.append(self.lin[name].register_forward_pre_hook(f, with_kwargs=True))
        for i, b in enumerate(blocks or []):
            def pre(mod, args, kwargs, i=i):
                events.append(("start", i, args, kwargs))

            def post(mod, args, kwargs, out, i=i):
                events.append(("end", i, out))
            hs.append(b.register_forward_pre_hook(pre, with_kwargs=True))
            hs.append(b.register_forward_hook(post, with_kwargs=True))
        try:
            self._call_model(self.items[0])
        finally:
            for h in hs:
                h.remove()
        self.model_passes += 1
        return events

    @staticmethod
    def _chained(events, nblocks):
        """True if the blocks ran once each, in order, each one's first argument the previous one's
        output, and no other argument aliasing the previous block's outputs."""
        seq = [(e[0], e[1]) for e in events if e[0] != "lin"]
        if seq != [(k, i) for i in range(nblocks) for k in ("start", "end")]:
            return False
        starts = [e for e in events if e[0] == "start"]
        ends = [e for e in events if e[0] == "end"]
        for i, (_, _, args, kwargs) in enumerate(starts):
            if not args or not isinstance(args[0], torch.Tensor):
                return False
            if i == 0:
                continue
            prev = _first_tensor(ends[i - 1][2])
            h = args[0]
            if prev is None or prev.data_ptr() != h.data_ptr() or prev.shape != h.shape:
                return False
            outs = {t.data_ptr() for t in _tensors(ends[i - 1][2])}
            if any(t.data_ptr() in outs for t in _tensors((args[1:], _strip_cache(kwargs)))):
                return False
        return True

    @staticmethod
    def _stages(events, names):
        """names (a unit's layers) in stages: layers reading the same input tensor, in call order."""
        want = set(names)
        stages, key_of, seen = [], {}, set()
        for e in events:
            if e[0] != "lin" or e[1] not in want or e[1] in seen:
                continue
            seen.add(e[1])
            key = _input_key(e[2])
            if key not in key_of:
                key_of[key] = len(stages)
                stages.append([])
            stages[key_of[key]].append(e[1])
        return stages, [n for n in names if n not in seen]

    def _unit(self, stages, leftover, run, need_output=False):
        """Quantize stage after stage (each run() sees the earlier stages quantized); layers not seen
        in discovery collect inputs during one more run(). Returns the result of a run() made with
        all the unit's layers quantized (if need_output)."""
        for st in stages:
            self._accumulate(st, run)
        if not leftover:
            return run() if need_output else None
        out, any_quantized = self._accumulate(leftover, run)
        return run() if any_quantized and need_output else out

    def _capture(self, blocks):
        """Run the (float) blocks on every batch; keep the first block's input hidden state (a copy)
        and every block's other arguments (caches dropped)."""
        hidden, extras = [], [[] for _ in blocks]
        hs = []
        for j, b in enumerate(blocks):
            def pre(mod, args, kwargs, j=j):
                if j == 0:
                    hidden.append(args[0].detach().clone())
                extras[j].append((tuple(args[1:]), _strip_cache(kwargs)))
            hs.append(b.register_forward_pre_hook(pre, with_kwargs=True))

        def stop(mod, args, out):
            raise _StopForward
        hs.append(blocks[-1].register_forward_hook(stop))
        try:
            self._model_pass()
        finally:
            for h in hs:
                h.remove()
        if len(hidden) != len(self.items) or any(len(e) != len(self.items) for e in extras):
            raise RuntimeError("pyqkern.torch.quantize_model: the blocks were not called once per calibration batch "
                               "(pass sequential=False, or calibration batches that run the whole model)")
        return [(h, item[2]) for h, item in zip(hidden, self.items)], extras

    def _block_pass(self, block, hidden, extras):
        outs = []
        try:
            for (h, mask), (a, kw) in zip(hidden, extras):
                self._mask = mask
                y = _first_tensor(block(h, *a, **kw))
                if y is None:
                    raise RuntimeError("pyqkern.torch.quantize_model: a block returned no tensor")
                outs.append((y, mask))
        finally:
            self._mask = None
        self.block_passes += 1
        return outs

    def _sequential(self):
        found = _find_blocks(self.model, self.names)
        blocks = found[1] if found else None
        events = self._discover(blocks)
        if blocks is not None and not self._chained(events, len(blocks)):
            blocks = None
        if blocks is None:
            stages, leftover = self._stages(events, self.names)
            del events
            self._unit(stages, leftover, self._model_pass)
            return "sequential, whole-model passes"
        lname = found[0]
        prefix = lname + "." if lname else ""
        inside = [[n for n in self.names if n.startswith(f"{prefix}{j}.")] for j in range(len(blocks))]
        in_blocks = {n for ns in inside for n in ns}
        start0 = next(j for j, e in enumerate(events) if e[0] == "start")
        pre_set = {e[1] for e in events[:start0] if e[0] == "lin" and e[1] not in in_blocks}
        pre = [n for n in self.names if n in pre_set]
        post = [n for n in self.names if n not in in_blocks and n not in pre_set]
        pre_stages = self._stages(events, pre)
        block_stages = [self._stages(events, ns) for ns in inside]
        post_stages = self._stages(events, post)
        del events  # the discovery forward's activations
        if pre:
            self._unit(*pre_stages, lambda: self._model_pass(stop_at=blocks[0]))
        hidden, extras = self._capture(blocks)
        for j, block in enumerate(blocks):
            def run(block=block, j=j, h=hidden):
                return self._block_pass(block, h, extras[j])
            hidden = self._unit(*block_stages[j], run, need_output=True)
            extras[j] = None
        del hidden
        if post:
            self._unit(*post_stages, self._model_pass)
        return f"sequential, {len(blocks)} blocks ({lname}) run one at a time"
