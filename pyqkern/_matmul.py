"""matmul and QLinear: y = x @ W.T (+ bias) with W a QTensor.

compute:
  "int8"  activations quantized per block of 32 (dx = amax/127, xq = round_half_even(x / dx)), integer
          dot products (AVX2 maddubs, AVX-VNNI, AVX-512 (VNNI), NEON sdot/i8mm or scalar), block
          scales applied in fp32; a min term m (q4_1,
          q4_k) as its own product m * dx * sum(xq), as llama.cpp does, so where a * u + m cancels
          (a weight near 0 in a block of large ones) the fp32 rounding is relative to |a u| + |m|,
          not |w| (tests/test_matmul.py states the distance from the float result). The result is
          bit-identical for every native variant and thread count and equals
          pyqkern.reference.matmul_int8. x with NaN / Inf, or with values so large that the fp32
          products a * dx could overflow (|x| >= 2^(e - 127) for reference.int8_x_exp_limit's e:
          2^102 for q4_0 with fp16 scales up to 65504, more for smaller scales), raises ValueError
          (use "float"): Inf * 0 would make NaN of a finite result. Needs K % 32 == 0 (and int4
          groups >= 32). nf4 and fp4 use their code books rounded to 1/127 in this mode.
  "float" weights dequantized exactly (as pyqkern.dequantize) and multiplied in fp32; within
          fp32 accumulation error of x @ dequantize(W).T: |y - y_ref| <= K * 2^-23 * sum|x||w|
          + K * 2^-149 (the second term: products and sums in fp32's subnormal range; a loose
          bound; tests check it). At decode size on q4_0 / int2 / int3 / int4,
          adapters too, a kernel on the packed weight takes over: AVX512-BF16 where the CPU has
          it (bfloat16 x with M <= 4, float32 / float16 x with M <= 2, split exactly into three
          bf16 parts), else in the AVX2 variant an fp32 one (M <= 8, 16-bit x widened): (u - o)
          * x is exact in fp32 (fused in the multiply-add), sums per block then scaled, under
          the same bound (x with 0 < |x| < 2^-100, |x| >= 2^101 or NaN/Inf, and weights with a
          non-finite scale, go the fp32 way: vdpbf16ps flushes subnormals, the AVX2 kernel
          takes x scaled by up to 2^-24, and Inf * a finite sum is not NaN). Not
          q4_1 / q4_k: their min term summed apart (a * sum(u x) + m * sum(x)) cancels where
          a * u + m does, far beyond the bound. So in
          this mode a row's last bits can depend on the batch it came in; "int8" never does.
          Otherwise for M <= 8 every format but int2 / int3 (int4: groups >= 32)
          has an AVX2 / AVX-512 kernel that decodes each weight in registers to dequantize's float
          and multiply-adds it into fp32 sums (no dequantized chunk in memory), same bound.
  "auto"  "int8" where supported, else "float".
"""
from __future__ import annotations

import threading

import numpy as np

from . import _formats, reference
from ._formats import INTN_BITS
from ._lora import LoRA
from ._ops import _BF16, _check_backend, _native, as_float32_2d, isa_id
from ._qtensor import QTensor

COMPUTES = ("auto", "int8", "float")


def _x_rows(x, k, what="x"):
    """x [..., K] (float32/16/bf16, numpy or a CPU torch tensor) -> (float32 [M, K] with
    contiguous rows, leading shape). k None: any K (lora.backward's x and dy)."""
    if hasattr(x, "detach") and hasattr(x, "numpy"):
        x = x.detach()
    elif not isinstance(x, np.ndarray):
        raise TypeError(f"{what} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if x.ndim < 1:
        raise ValueError(f"{what} must have at least one dimension [..., K]")
    if k is None:
        k = x.shape[-1]
        if k == 0:  # reshape(-1, 0) cannot infer the rows
            raise ValueError(f"{what} is empty (shape {tuple(x.shape)})")
    elif x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]} but the weight has K={k} (x is [..., K], W is [N, K])")
    lead = tuple(x.shape[:-1])
    return as_float32_2d(x.reshape(-1, k), what, allow_empty=True), lead


def _bias(bias, n):
    """bias as float32 [n]: float32 / float16 / bfloat16 (ml_dtypes or torch) like x, or float64
    whose values float32 holds (an overflow to Inf is an error, not a warning)."""
    if bias is None:
        return None
    if hasattr(bias, "detach") and hasattr(bias, "numpy"):  # torch: its bf16 has no NumPy dtype
        if str(bias.dtype) == "torch.float64":  # as a NumPy float64 bias (a review: refused)
            b = np.asarray(bias.detach().cpu().numpy())
        else:
            b = as_float32_2d(bias.reshape(1, -1), "bias")[0] if bias.ndim == 1 else bias.detach().numpy()
    else:
        b = np.asarray(bias)
        if _BF16 is not None and b.dtype == _BF16 and b.ndim == 1:  # ml_dtypes (its kind is "V")
            b = as_float32_2d(b.reshape(1, -1), "bias")[0]
    if b.dtype.kind != "f":
        raise TypeError(f"bias must be a float array, got dtype {b.dtype}")
    if b.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {b.shape}")
    if b.dtype.itemsize > 4:  # finite values float32 cannot hold (an Inf beside them hid them: review)
        big = np.abs(b[np.isfinite(b)])
        if big.size and big.max() > np.finfo(np.float32).max:
            raise ValueError(f"bias has values beyond the float32 range (|b| up to {float(big.max()):.3g})")
    return np.require(b, np.float32, ["C", "A"])


INT8_NEEDS = "compute='int8' needs K % 32 == 0 and int2/int3/int4 groups >= 32"


def int8_fits(fmt: str, k: int, group) -> bool:
    """The int8 kernels take a [*, k] weight of fmt (group: its group parameter, -1 per channel)."""
    return k % 32 == 0 and (fmt not in INTN_BITS or group == -1 or group >= 32)


def int8_supported(qt: QTensor) -> bool:
    return int8_fits(qt.format, qt.shape[1], qt.group)


def resolve_compute(qt: QTensor, compute: str) -> str:
    if compute not in COMPUTES:
        raise ValueError(f"compute must be one of {COMPUTES}, got {compute!r}")
    if compute == "auto":
        return "int8" if int8_supported(qt) else "float"
    if compute == "int8" and not int8_supported(qt):
        raise ValueError(f"{qt.format} {qt.shape}: {INT8_NEEDS}; use compute='float'")
    return compute


def _packed(qt: QTensor):
    """The int8 packed form of qt, made once and cached on it (qt.release_packed() frees it)."""
    p = qt._packed
    if p is None:
        q, s, z = qt.sections()
        n, k = qt.shape
        p = _native().pack(_formats.FORMAT_IDS[qt.format], np.ascontiguousarray(q),
                           np.ascontiguousarray(s) if s.size else None, np.ascontiguousarray(z) if z.size else None,
                           n, k, qt.params["group"], qt.params["sym"])
        qt._packed = p
    return p


def _out(out, shape, w=None):
    """out checked (or a new array); w: the QTensor the call reads, whose bytes out must not
    overlap (the float kernels read them while writing y: a review got errors of 1e6)"""
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32:
        raise TypeError("out must be a float32 numpy array")
    if out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, expected {shape}")
    if not out.flags.c_contiguous or not out.flags.writeable or not out.flags.aligned:
        raise ValueError("out must be C-contiguous, aligned and writeable")
    if w is not None and np.may_share_memory(out, w.data):
        raise ValueError("out overlaps the weight's bytes (the product reads them while writing out)")
    return out


def _adapters(lora, adapter_ids, w, m):
    """-> (list of LoRA, int32 ids [m] or None)"""
    if lora is None:
        if adapter_ids is not None:
            raise ValueError("adapter_ids given without adapters")
        return [], None
    if isinstance(lora, dict):
        raise TypeError("lora must be a LoRA or a list of LoRA, got a dict (its keys would be taken): pass "
                        "list(d.values()), or attach them by name with QLinear.add_adapter")
    ads = [lora] if isinstance(lora, LoRA) else list(lora)
    for a in ads:
        if not isinstance(a, LoRA):
            raise TypeError(f"lora must be a LoRA or a list of LoRA, got {type(a).__name__}")
        a.check_base(w.shape)
    ids = None
    if adapter_ids is not None:
        ids = np.asarray(adapter_ids)
        if ids.size == 0 and ids.dtype.kind == "f":  # [] is float64 to NumPy: an empty batch's ids
            ids = ids.astype(np.int32)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"adapter_ids must be integers, got dtype {ids.dtype}")
        ids = ids.reshape(-1)
        if ids.shape[0] != m:
            raise ValueError(f"adapter_ids has {ids.shape[0]} entries for {m} rows of x")
        if ids.size and (ids.min() < -1 or ids.max() >= len(ads)):
            raise ValueError(f"adapter id out of range [-1, {len(ads)}): {int(ids.min())}..{int(ids.max())}")
        ids = np.ascontiguousarray(ids, dtype=np.int32)
    else:
        _refuse_summed_dora(ads)
    return ads, ids


def _sums_dora(ads) -> bool:
    """adapters applied together on the same rows include a DoRA one: its rescale does not sum"""
    return len(ads) > 1 and any(a.is_dora for a in ads)


def _refuse_summed_dora(ads):
    if _sums_dora(ads):
        raise ValueError("a DoRA adapter cannot be summed with others on the same rows; use adapter_ids")


def _bf16_bits(x):
    """x as a numpy uint16 array of bf16 bits if it is a bfloat16 array / CPU tensor (or uint16
    bits), else None."""
    if hasattr(x, "detach") and hasattr(x, "numpy"):
        import torch  # noqa: F401 - only reached when torch is present

        if x.dtype != torch.bfloat16:
            return None
        return x.detach().contiguous().view(torch.int16).numpy().view(np.uint16)
    if isinstance(x, np.ndarray) and ((_BF16 is not None and x.dtype == _BF16) or x.dtype == np.uint16):
        return x.view(np.uint16)  # uint16 holds bf16 bits, as everywhere in the API
    return None


def _apart(b, y):
    """bias, copied if out overlaps it (every route writes y before or while it reads the bias)"""
    return b.copy() if b is not None and np.may_share_memory(b, y) else b


def _float_packed(x, w, bias, compute, out, isa, lora=None, adapter_ids=None):
    """compute="float" at decode size on the packed weight through the AVX512-BF16 kernel
    (bfloat16 x (M <= 4) as it is, float32 x (M <= 2) split exactly into three bf16 parts) or the
    AVX2 fp32 one (M <= 8): exact products, fp32 sums per block (pqk_matmul_float_bf16 / _packed),
    adapters as in the fp32 route (shrink
    on x, expansion after the base). None when it does not apply (then the usual fp32 route
    runs, under the same result bound)."""
    xb = _bf16_bits(x)
    f32 = xb is None
    if f32:  # float32 x (numpy or torch), split exactly into three bf16 parts by the kernel
        if hasattr(x, "detach") and hasattr(x, "numpy"):
            import torch  # noqa: F401 - only reached when torch is present

            if x.dtype not in (torch.float32, torch.float16):
                return None
            x = x.detach().numpy()
        if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float16):
            return None
        # float16 x widened (exact): the same values give the same bits as float32 x (a review:
        # float16 x took the fp32 route, whose last bits differ)
        xb = x.astype(np.float32) if x.dtype == np.float16 else x
    if xb.ndim < 1 or xb.shape[-1] != w.shape[1]:
        return None
    n, k = w.shape
    m = int(np.prod(xb.shape[:-1]))
    if not packed_float_route(w, compute, m, f32, isa):
        return None
    lead = tuple(xb.shape[:-1])
    x2 = np.require(xb.reshape(-1, k), requirements=["C", "A"])
    if w.perm is not None:
        x2 = np.ascontiguousarray(x2[:, w.perm])
    b = _bias(bias, n)
    ads, ids = _adapters(lora, adapter_ids, w, m)
    nat_ads = [a.native_args(w) for a in ads] if ads else None
    y = _out(out, lead + (n,), w)
    b = _apart(b, y)
    kernel = _native().matmul_float_packed if f32 else _native().matmul_float_bf16
    if not kernel(isa_id(isa), _packed(w), x2, b, y.reshape(m, n), nat_ads, ids):
        return None
    return y


_PACKED_FLOAT_SLOT: dict = {}


def _packed_float_kernel(isa):
    """The variant's (None: the active one) compute="float" kernel on the packed weight on this CPU:
    "bf16" (AVX512-BF16), "f32" (the AVX2 variant's fp32 one) or None (checked before packing the
    weight for it)."""
    key = isa
    if key not in _PACKED_FLOAT_SLOT:
        nat = _native()
        i = nat.active_isa() if isa is None else isa_id(isa)
        src = nat.matmul_sources(i) if nat.isa_runnable(i) else {}
        _PACKED_FLOAT_SLOT[key] = "bf16" if src.get("gemv_bf16") else "f32" if src.get("gemv_f32p") else None
    return _PACKED_FLOAT_SLOT[key]


# 4-bit codes without a code book or a min term: (u - o) and bf16 x multiply exactly
_PACKED_FLOAT_FORMATS = frozenset({"q4_0", "int2", "int3", "int4"})  # q4_1 / q4_k: see the module docstring


def packed_float_route(w: QTensor, compute: str, m: int, f32: bool = True, isa=None) -> bool:
    """Whether compute on m rows of x (float32, else bfloat16) takes the packed weight's float
    kernel, AVX512-BF16 or AVX2 fp32 (unless x holds values it leaves to the fp32 route: see the
    module docstring)."""
    if resolve_compute(w, compute) != "float" or m < 1 or not int8_supported(w) or w.format not in _PACKED_FLOAT_FORMATS:
        return False
    kind = _packed_float_kernel(isa)
    return kind is not None and m <= (8 if kind == "f32" else 2 if f32 else 4)


def streamed_weight_bytes(w: QTensor, compute: str, m: int, f32: bool = True, isa=None) -> int:
    """Bytes of the weight form a native matmul of m rows reads: the packed copy for int8 compute and
    for the packed float decode kernels (q6_k's codes as bytes, int2 / int3's as nibbles: q6_k 1.31x its
    QTensor, int2 1.73x / 1.91x and int3 1.27x / 1.31x at group 32 / 128, q4_k 1.06x; the other
    formats within a few hundred bytes), else the QTensor's own bytes."""
    if resolve_compute(w, compute) == "int8" or packed_float_route(w, compute, m, f32, isa):
        return _packed(w).nbytes
    return w.nbytes


def _lora_reference(y2, x2, w, ads, ids, bias):
    """Unfused float reference of the adapter part, PEFT's definition (y2 holds x@W.T, no bias)."""
    xd = x2.astype(np.float32)  # already permuted when w.perm is set
    for a_i, ad in enumerate(ads):
        rows = slice(None) if ids is None else (ids == a_i)
        A = ad.A if w.perm is None else ad.A[:, w.perm]
        term = np.float32(ad.scale) * ((xd[rows] @ A.T) @ ad.B.T)
        y2[rows] = y2[rows] + term
        if ad.is_dora:
            y2[rows] = y2[rows] * ad.dora_factor(w)[None, :]
    if bias is not None:
        y2 += bias


def matmul(x, w: QTensor, bias=None, *, lora=None, adapter_ids=None, compute="auto", out=None, backend="native",
           isa=None, _packed_w=None):
    """y = x @ W.T (+ bias); x [..., K] float32/float16/bfloat16, W a QTensor [N, K] -> y [..., N] float32.

    lora: a LoRA, or a list of them. Without adapter_ids every adapter applies to every row (their
    terms add up; use LoRA.scaled(w) for weighted blends). adapter_ids [M] (one per row of x
    flattened, -1 = none) picks one adapter per row: different adapters and ranks in one batch.
    The adapter term is computed in fp32 inside the same call: the shrink x@A.T as each
    activation row is quantized (decode, M <= 8: shared by the threads before their weight tiles,
    or after them at one thread), the expansion (+ DoRA rescale, + bias) on each range of output
    tiles right after the base kernel wrote it.

    backend="numba" supports compute="float" only ("auto" means "float" there), adapters fused the
    same way (shrink first, expansion in the epilogue of each output value)."""
    _check_backend(backend)
    if backend == "numba" and compute == "auto":
        compute = "float"
    if not isinstance(w, QTensor):
        raise TypeError(f"w must be a QTensor, got {type(w).__name__}")
    n, k = w.shape
    mode = resolve_compute(w, compute)
    if backend == "native" and mode == "float":  # "auto" taking int8 skips the packed-float look-up
        done = _float_packed(x, w, bias, compute, out, isa, lora, adapter_ids)
        if done is not None:
            return done
    x2, lead = _x_rows(x, k)
    if w.perm is not None and x2.shape[0]:
        x2 = np.ascontiguousarray(x2[:, w.perm])  # the stored weight is W[:, perm]
    b = _bias(bias, n)
    y = _out(out, tuple(lead) + (n,), w)
    b = _apart(b, y)
    m = x2.shape[0]
    ads, ids = _adapters(lora, adapter_ids, w, m)  # checked for an empty batch too
    if m == 0:
        return y
    y2 = y.reshape(m, n)
    if np.may_share_memory(x2, y2):  # out overlapping x: the kernels read x while writing y
        x2 = x2.copy()
    if ads and backend == "reference":
        base = w if w.perm is None else w.with_perm(np.arange(k))  # x2 is already permuted
        matmul(x2, base, None, compute=compute, out=y2, backend=backend, isa=isa)
        _lora_reference(y2, x2, w, ads, ids, b)
        return y
    if backend == "reference":
        if isa is not None:
            raise ValueError("isa= applies to the native backend only")
        q, s, z = w.sections()
        if mode == "int8":
            y2[...] = reference.matmul_int8(x2, w.format, q, s, z, n, k, w.params["group"], w.params["sym"], b)
        else:
            from ._ops import dequantize

            stored = w if w.perm is None else w.with_perm(np.arange(k))  # columns as stored: x2 is permuted
            y2[...] = reference.matmul_float(x2, dequantize(stored, backend="reference"), b)
        return y
    if backend == "numba":
        # Numba backend: compute="float" as one fused kernel (decodes a block at a time, never the whole W).
        if isa is not None:
            raise ValueError("isa= applies to the native backend only")
        if mode == "int8":
            raise NotImplementedError("compute='int8' is native-only; the numba backend runs compute='float'")
        from .numba_kernels.matmul import matmul_float as _numba_matmul_float  # ImportError names numba

        q, s, z = w.sections()
        nb_ads = None
        if ads:  # fused: shrink first, expansion (+ DoRA rescale) in each output value's epilogue
            nb_ads = [(a.A if w.perm is None else a.A[:, w.perm], a.B, a.scale,
                       a.dora_factor(w) if a.is_dora else None) for a in ads]
        _numba_matmul_float(_formats.FORMAT_IDS[w.format], q, s, z, k, w.params["group"], w.params["sym"],
                            x2, b, y2, nb_ads, ids)
        return y
    nat = _native()
    nat_ads = [a.native_args(w) for a in ads] if ads else None
    if mode == "int8":
        p = _packed_w if _packed_w is not None else _packed(w)
        nat.matmul_int8(isa_id(isa), p, x2, b, y2, nat_ads, ids)
    else:
        q, s, z = w.sections()
        nat.matmul_float(isa_id(isa), _formats.FORMAT_IDS[w.format], np.ascontiguousarray(q),
                         np.ascontiguousarray(s) if s.size else None, np.ascontiguousarray(z) if z.size else None,
                         n, k, w.params["group"], w.params["sym"], x2, b, y2, nat_ads, ids)
    return y


def _int8_rows(x2: np.ndarray, w: QTensor, b, ads=()):
    """matmul(x2, w, b, lora=ads) through the active variant's int8 kernel, for callers that hold
    what matmul would make of its arguments: x2 float32 [M, K] with contiguous rows, b None or
    float32 [N], w int8-capable without a permutation, ads LoRA objects applied to every row
    (pyqkern.torch's eager QuantLinear, whose ~2-4 us of matmul's argument handling per call is
    not small beside a decode GEMV). The adapters' shapes and DoRA sums are checked as matmul
    does, the binding checks every array; x's NaN / Inf check is the kernel's, as in matmul."""
    for a in ads:
        a.check_base(w.shape)
    _refuse_summed_dora(ads)
    return _int8_call(_packed(w), x2, b, [a.native_args(w) for a in ads] or None)


def _int8_call(p, x2, b, nat):
    """The native int8 call on packed weight p: a new float32 [M, N] y for x2 [M, K] (no call for
    M = 0), bias b, nat the adapters' native_args (or None)."""
    y = np.empty((x2.shape[0], p.n), np.float32)
    if y.shape[0]:
        _native().matmul_int8(-1, p, x2, b, y, nat, None)
    return y


_ADAPTERS_LOCK = threading.Lock()  # QLinear's adapter changes (see QLinear.add_adapter)


class QLinear:
    """A quantized linear layer: the weight is prepacked once for this CPU's int8 kernels.

    ``lin(x)`` computes ``x @ W.T + bias``. The canonical QTensor is kept by reference (no copy),
    so ``lin.weight`` exports exactly the bytes it was built from."""

    def __init__(self, weight: QTensor, bias=None, *, compute="auto"):
        if not isinstance(weight, QTensor):
            raise TypeError(f"weight must be a QTensor, got {type(weight).__name__}")
        self._weight = weight
        n, _ = weight.shape
        b = _bias(bias, n)
        # the layer's own copy: a caller changing its array later changed the layer (a review)
        self.bias = None if b is None else np.array(b, np.float32)
        self._packed = None
        self._adapters = {}
        self._set_active([])
        self._k, self._n = weight.shape[1], weight.shape[0]
        self.compute = compute

    @property
    def weight(self) -> QTensor:
        """The QTensor the layer was built from (fixed: the packed copy and the adapters' shapes
        belong to it; build a new QLinear for another weight)."""
        return self._weight

    @weight.setter
    def weight(self, value):
        raise AttributeError("QLinear.weight cannot be reassigned (the packed copy and the adapters belong to it); "
                             "build a new QLinear")

    @property
    def compute(self) -> str:
        """"int8" or "float" (set "auto", "int8" or "float" to switch; int8 packs the weight)."""
        return self._compute

    @compute.setter
    def compute(self, value):
        c = resolve_compute(self._weight, value)
        if c != "int8":
            self._packed = None
        elif self._packed is None:
            self._packed = _packed(self._weight)
        self._compute = c
        self._set_fast()

    def _set_fast(self):
        # the decode fast path's packed weight where its conditions that do not depend on x hold,
        # else None: one attribute, read once per call, so a compute switch in another thread
        # cannot pair the fast path with the packed copy it just dropped (a review's TypeError)
        self._fast = self._packed if self._packed is not None and self._weight.perm is None else None
        self._fast_args = None

    def __getstate__(self):  # pickle / deepcopy: the packed copy is native, packed again on load
        return dict(self.__dict__, _packed=None, _fast=None, _fast_args=None)

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._compute == "int8":
            self._packed = _packed(self._weight)
        self._set_fast()

    def __copy__(self):
        # a copy gets its own adapter registry (the packed weight and the LoRAs are shared)
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._adapters, new._active, new._active_loras = dict(self._adapters), list(self._active), list(self._active_loras)
        return new

    @property
    def in_features(self):
        return self.weight.shape[1]

    @property
    def out_features(self):
        return self.weight.shape[0]

    @property
    def packed_nbytes(self) -> int:
        """Bytes of the packed copy: made at construction for compute="int8", on the first
        decode-size call for compute="float" where a packed float kernel takes it; 0 if none."""
        p = self._packed if self._packed is not None else self.weight._packed
        return p.nbytes if p is not None else 0

    # -- adapters
    # Threads: the changes below are made one at a time (one lock for all layers: they are rare
    # and short), and each publishes new objects instead of editing the ones a call may be reading
    # (the registry dict, the active lists), so a call running meanwhile sees the adapters before
    # or after a change, never half of one (a review: KeyError in calls with adapter_ids, and two
    # concurrent adds lost an active adapter).
    def add_adapter(self, name: str, lora, *, active: bool = True) -> None:
        """Attach an adapter under a name; active (added to the adapters applied to every row
        when no adapter_ids are given) unless active=False, for adapters only picked per row."""
        if not isinstance(lora, LoRA):
            raise TypeError(f"expected a LoRA, got {type(lora).__name__}")
        if not isinstance(name, str):
            raise TypeError("adapter name must be a string")
        lora.check_base(self.weight.shape)
        with _ADAPTERS_LOCK:
            if name in self._adapters:
                raise ValueError(f"adapter {name!r} already attached")
            if active and _sums_dora(self._active_loras + [lora]):
                raise ValueError(f"adapter {name!r}: a DoRA adapter cannot be active together with others "
                                 f"(active: {self._active}); add it with active=False and pick it per row "
                                 "with adapter_ids, or set_adapter() first")
            self._adapters = {**self._adapters, name: lora}
            if active:
                self._set_active(self._active + [name])

    def remove_adapter(self, name: str) -> None:
        with _ADAPTERS_LOCK:
            if name not in self._adapters:
                raise KeyError(f"no adapter named {name!r}; attached: {list(self._adapters)}")
            self._set_active([a for a in self._active if a != name])
            self._adapters = {nm: a for nm, a in self._adapters.items() if nm != name}

    def set_adapter(self, names) -> None:
        """Adapters applied to every row when no adapter_ids are given (a name, a list, or [] for none)."""
        names = [names] if isinstance(names, str) else list(names or [])
        with _ADAPTERS_LOCK:
            for nm in names:
                if nm not in self._adapters:
                    raise KeyError(f"no adapter named {nm!r}; attached: {list(self._adapters)}")
            _refuse_summed_dora([self._adapters[nm] for nm in names])  # here, not at the next call
            self._set_active(names)

    def _set_active(self, names) -> None:
        # the names, and the LoRAs the decode path reads without a lookup per call (new lists)
        self._active = list(names)
        self._active_loras = [self._adapters[nm] for nm in names]

    @property
    def adapter_names(self) -> list:
        """Attached adapters in order; adapter_ids index this list."""
        return list(self._adapters)

    def __call__(self, x, *, adapter_ids=None, out=None, isa=None):
        """x @ W.T + bias, plus adapters: the active ones on every row, or with adapter_ids one per
        row: ints indexing adapter_names (-1 = none) or a list of names / None."""
        if adapter_ids is not None:
            reg = self._adapters  # read once: a change in another thread publishes a new dict
            names = list(reg)
            ids = adapter_ids
            if isinstance(ids, np.ndarray) and ids.dtype.kind in "USO":  # names as a NumPy array
                ids = ids.tolist()
            if isinstance(ids, (list, tuple)) and any(isinstance(v, str) or v is None for v in ids):
                def index(v):  # a name, None (no adapter) or already an index
                    if v is None:
                        return -1
                    if isinstance(v, (bool, np.bool_)):  # as a bool array is refused
                        raise TypeError("adapter_ids must hold ints, adapter names or None, not bools")
                    if isinstance(v, str):
                        if v not in names:
                            raise KeyError(f"unknown adapter name {v!r} in adapter_ids; attached: {names}")
                        return names.index(v)
                    return v  # checked with the other indices below

                ids = [index(v) for v in ids]
            lora = [reg[nm] for nm in names] if names else None
            if lora is None:
                raise ValueError("adapter_ids given but no adapter is attached")
            return matmul(x, self.weight, self.bias, lora=lora, adapter_ids=ids, compute=self.compute, out=out,
                          isa=isa, _packed_w=self._packed)
        lora = self._active_loras
        fast = self._fast
        if (fast is not None and isa is None and type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 2
                and x.shape[0] and x.shape[1] == self._k and x.flags.c_contiguous and x.flags.aligned
                and len(lora) <= 1):
            # decode fast path (a plain float32 [M, K] array): straight to the kernel. The general
            # route costs ~2.5 us of argument handling per call, 2-4% of a 4096x4096 GEMV; the
            # adapters were checked against the weight when attached.
            m = x.shape[0]
            if out is None:
                out = np.empty((m, self._n), np.float32)  # new: cannot overlap x
            else:
                if not (type(out) is np.ndarray and out.dtype == np.float32 and out.shape == (m, self._n)
                        and out.flags.c_contiguous and out.flags.writeable and out.flags.aligned):
                    out = _out(out, (m, self._n))  # raises the usual error
                # out overlapping x: the native call copies x itself (pqk_matmul_* accept y over x)
            args = None
            if lora:
                # the adapter's native arguments, kept with the list they were made from (a new
                # list on every adapter change): ~0.15 us a call, 0.3% of a 4096x4096 decode at 2 threads
                kept = self._fast_args
                if kept is None or kept[0] is not lora:
                    kept = self._fast_args = (lora, [lora[0].native_args(self._weight)])
                args = kept[1]
            _native().matmul_int8(-1, fast, x, _apart(self.bias, out), out, args, None)
            return out
        return matmul(x, self.weight, self.bias, lora=lora or None, compute=self.compute, out=out, isa=isa,
                      _packed_w=self._packed)

    def __repr__(self):
        return (f"QLinear(in={self.in_features}, out={self.out_features}, format={self.weight.format}, "
                f"compute={self.compute}, bias={self.bias is not None})")
