"""LoRA / DoRA adapters in PEFT's layout: A [r, K], B [N, r], scale = alpha / r (rslora: alpha / sqrt(r)).

    y = x @ W.T + scale * (x @ A.T) @ B.T                       (LoRA)
    y = (m / ||W + scale*B@A||_row) * (x @ W.T + scale * (x @ A.T) @ B.T)   (DoRA, PEFT's definition;
                                                                  bias added after the rescale)
"""
from __future__ import annotations

import numpy as np

from ._formats import INTN_BITS


def _as_f32(a, what, ndim):
    from ._ops import as_float32_2d

    torch_in = hasattr(a, "detach") and hasattr(a, "numpy")
    if not (torch_in or isinstance(a, np.ndarray)):
        raise TypeError(f"{what} must be a numpy array, got {type(a).__name__}")
    if a.ndim != ndim:
        raise ValueError(f"{what} must be {ndim}-D, got shape {tuple(a.shape)}")
    if torch_in:
        a = a.detach()
        if ndim == 1:
            a = a.reshape(1, -1)
        out = as_float32_2d(a, what)
        return out.reshape(-1) if ndim == 1 else np.ascontiguousarray(out)
    if ndim == 1:
        return np.ascontiguousarray(as_float32_2d(a.reshape(1, -1), what).reshape(-1))
    return np.ascontiguousarray(as_float32_2d(a, what))


class LoRA:
    """One low-rank adapter. A [r, K], B [N, r] (float32, float16 or bfloat16; ``.A`` / ``.B`` are
    float32, what the kernels read is in the storage dtype: by default a 16-bit input's own).
    A and B of two different float dtypes are widened to float32 (exact) and stored so (see
    storage); any other dtype (integers, float64, complex) is a TypeError.

    alpha: PEFT's lora_alpha (default: r, i.e. scale 1). rslora: scale = alpha / sqrt(r).
    magnitude: DoRA magnitude vector [N] (PEFT's lora_magnitude_vector); the per-row norms of
    W + scale*B@A are computed once per base weight and cached. A row whose merged weight is all
    zero gets the factor 0 (its output is the bias), where PEFT's division would give NaN.

    A LoRA is an immutable snapshot: it keeps its own read-only copies of A, B and magnitude, and
    its attributes (alpha, scale, ...) cannot be set (the kernels read B in a tiled copy and cache
    DoRA norms, so an edit could only be half seen). After a training step build a new one:
    LoRA(A - lr * dA, B - lr * dB, alpha=...); for another weight, ad.scaled(w)."""

    def __init__(self, A, B, alpha=None, *, rslora=False, magnitude=None, storage="auto", _shared=False):
        # _shared: A and B are read-only views of the caller's arrays instead of copies, for
        # callers that build a LoRA per call from arrays they own (pyqkern.torch's custom op)
        store = _storage_dtype(A, B, storage)
        bits = any(isinstance(a, np.ndarray) and a.dtype == np.uint16 for a in (A, B))
        A = _as_f32(A, "A", 2)
        B = _as_f32(B, "B", 2)
        r, k, n = _checked_pair(A, B, " (uint16 arrays are read as bfloat16 bit patterns)" if bits else "")
        if store != "float32":  # what the kernels read; .A / .B are its exact float32 widening
            A, B = _round_to(A, store), _round_to(B, store)
            if not (np.isfinite(A).all() and np.isfinite(B).all()):
                raise ValueError(f"A or B overflows {store}; use storage='float32'")
        self.storage = store
        self.A = _frozen_copy(A, copy=not _shared)
        self.B = _frozen_copy(B, copy=not _shared)
        self.Bp = _tiles_of(B)
        # native operands: A and Bp in the storage dtype (fp16 as float16, bf16 as its uint16 bits)
        self._native = (_to_storage(self.A, store), _to_storage(self.Bp, store), _DTYPE_ID[store])
        self.rank, self.in_features, self.out_features = r, k, n
        self.alpha = float(r) if alpha is None else _real(alpha, "alpha")
        self.rslora = bool(rslora)
        self.scale = float(self.alpha / (np.sqrt(r) if rslora else r))
        _check_scale(self.scale)
        self.magnitude = None
        if magnitude is not None:
            mg = _as_f32(magnitude, "magnitude", 1)
            if mg.shape != (n,):
                raise ValueError(f"magnitude must have shape ({n},), got {mg.shape}")
            if not np.isfinite(mg).all():
                raise ValueError("magnitude contains NaN or Inf")
            self.magnitude = _frozen_copy(mg)
        self._dora_cache = {}  # id(base QTensor) -> (weakref, per-row factor m / norm)
        self._frozen = True

    @classmethod
    def _of_arrays(cls, A, B, scale):
        """A float32 LoRA on views of A [r, K] and B [N, r] (C-contiguous float32 arrays the caller
        keeps unchanged while the LoRA is used) with this scale: what LoRA(A, B, alpha=scale * r,
        storage="float32", _shared=True) makes, in a third of its time (pyqkern.torch builds one
        per call: ~100 us of a small layer's call went here)."""
        if not all(a.dtype == np.float32 and a.flags.c_contiguous for a in (A, B)):  # what the kernels read
            raise TypeError("LoRA._of_arrays takes C-contiguous float32 arrays")
        A, B = A.view(), B.view()
        A.flags.writeable = B.flags.writeable = False
        return cls._bare(A, B, scale, "float32", keep=True)

    @classmethod
    def _for_kernels(cls, A, B, scale, storage):
        """A LoRA of the native kernels' operands alone, in its own copies: A [r, K] and B [N, r]
        as the kernels read ``storage`` (float32, float16, or bfloat16 as uint16 bits), B tiled;
        .A, .B and .Bp are None, so only pq.matmul's native routes take it (pyqkern.torch keeps
        one per served adapter: as many bytes as the adapter's, where a float32 LoRA of 16-bit
        tensors held several times that). Rank, shape, NaN / Inf and scale checked as by LoRA()."""
        a = np.array(A, order="C", copy=True)
        a.flags.writeable = False
        return cls._bare(a, B, scale, storage, keep=False)

    @classmethod
    def _bare(cls, A, B, scale, storage, keep):
        """_of_arrays' and _for_kernels' LoRA of A (the kernels' operand as it is) and B (tiled
        here) in storage, after the constructor's shape, rank, NaN / Inf and scale checks; keep:
        A, B and Bp kept as the LoRA's .A / .B / .Bp (float32 only), else None."""
        if A.ndim != 2 or B.ndim != 2:
            raise ValueError(f"A and B must be 2-D, got shapes {A.shape} and {B.shape}")
        if A.shape[1] == 0 or B.shape[0] == 0:  # the constructor's as_float32_2d refuses them
            raise ValueError(f"A or B is empty (shapes {A.shape} and {B.shape})")
        r, k, n = _checked_pair(A, B, bf16_bits=storage == "bfloat16")
        _check_scale(scale)
        bp = _tiles_of(B)
        self = object.__new__(cls)
        self.__dict__.update(storage=storage, A=A if keep else None, B=B if keep else None, Bp=bp if keep else None,
                             _native=(A, bp, _DTYPE_ID[storage]), rank=r, in_features=k, out_features=n,
                             alpha=float(scale * r), rslora=False, scale=float(scale), magnitude=None, _dora_cache={},
                             _frozen=True)
        return self

    # Immutable: a new alpha / scale would not reach the cached DoRA norms, save_peft_adapter
    # writes alpha, and adapters are shared by reference between layers and blends.
    def __setattr__(self, name, value):
        if self.__dict__.get("_frozen"):
            raise AttributeError(f"LoRA is immutable (cannot set {name!r}): build a new one, e.g. "
                                 "LoRA(A, B, alpha=...) or ad.scaled(weight)")
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        raise AttributeError(f"LoRA is immutable (cannot delete {name!r})")

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def native_args(self, qt):
        """(A, Bp, scale, row_scale, dtype) as the native matmul takes them."""
        A, Bp, dt = self._native
        if qt.perm is not None:  # matmul feeds x[:, perm]: the shrink reads A's columns the same way
            A = np.ascontiguousarray(A[:, qt.perm])
        return (A, Bp, self.scale, self.dora_factor(qt) if self.magnitude is not None else None, dt)

    def scaled(self, weight: float) -> "LoRA":
        """The same adapter with its contribution multiplied by weight (for weighted blends:
        lora=[a.scaled(0.7), b.scaled(0.3)]). Shares A and B; not for DoRA adapters."""
        import copy

        if self.is_dora:
            raise ValueError("a DoRA adapter cannot be blended (its rescale is not linear)")
        weight = _real(weight, "blend weight")
        out = copy.copy(self)
        # alpha too: it is what save_peft_adapter (and pyqkern.torch's add_lora) write and rebuild from
        alpha = float(self.alpha * weight)
        scale = float(alpha / (np.sqrt(self.rank) if self.rslora else self.rank))
        _check_scale(scale)
        out.__dict__.update(alpha=alpha, scale=scale, _dora_cache={})
        return out

    # A LoRA is immutable (its arrays read-only; the kernels read a tiled copy of B and cache DoRA
    # norms): a deep copy is the object itself, and unpickling makes its arrays read-only again.
    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_dora_cache"] = {}  # weak references to base weights
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _frozen=True)
        for a in (self.A, self.B, self.Bp, self.magnitude, *self._native[:2]):
            if a is not None:
                a.flags.writeable = False

    def delta(self) -> np.ndarray:
        """scale * B @ A, float32 [N, K]."""
        return (np.float32(self.scale) * (self.B @ self.A)).astype(np.float32)

    def check_base(self, shape):
        n, k = shape
        if (self.out_features, self.in_features) != (n, k):
            raise ValueError(f"adapter is for [N={self.out_features}, K={self.in_features}] but the weight is "
                             f"[N={n}, K={k}]")

    def dora_factor(self, qt) -> np.ndarray:
        """m / ||W + scale*B@A|| per output row, float32 [N] (computed once per base weight)."""
        import weakref

        from ._ops import dequantize

        if self.magnitude is None:
            raise ValueError("not a DoRA adapter (no magnitude)")
        hit = self._dora_cache.get(id(qt))
        if hit is not None and hit[0]() is qt:
            return hit[1]
        n, k = qt.shape
        norms = np.empty(n, np.float64)
        step = max(1, (1 << 22) // k)  # ~16 MB of float32 at a time, never the whole W
        from ._qtensor import QTensor

        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            part = QTensor.from_bytes(qt.format, (r1 - r0, k), _row_bytes_slice(qt, r0, r1), group=qt.group or None,
                                      sym=qt.sym if qt.format in INTN_BITS else None)
            w = dequantize(part).astype(np.float64)  # stored column order (W[:, perm] if permuted)
            A = self.A if qt.perm is None else self.A[:, qt.perm]
            w += self.scale * (self.B[r0:r1].astype(np.float64) @ A.astype(np.float64))
            norms[r0:r1] = np.linalg.norm(w, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            f = np.where(norms > 0, self.magnitude / norms, 0.0).astype(np.float32)
        # the entry goes with the weight (review: dead weights' factors stayed, one [N] array each)
        cache, key = self._dora_cache, id(qt)

        def gone(ref):
            if cache.get(key, (None,))[0] is ref:
                del cache[key]

        cache[key] = (weakref.ref(qt, gone), f)
        return f

    def __repr__(self):
        kind = "DoRA" if self.is_dora else "LoRA"
        return (f"{kind}(r={self.rank}, in={self.in_features}, out={self.out_features}, alpha={self.alpha:g}, "
                f"scale={self.scale:g}{', rslora' if self.rslora else ''})")


_DTYPE_ID = {"float32": 0, "float16": 1, "bfloat16": 2}


def _real(v, what) -> float:
    """v as a finite float: a Python / NumPy real number or a one-element array or tensor, never
    a str or bool (float("16") and float(True) would pass silently)."""
    if isinstance(v, np.ndarray) and v.size == 1:  # float() of a 1-D array is an error in NumPy >= 2.4
        v = v.reshape(())[()]
    if isinstance(v, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{what} must be a real number, got {type(v).__name__} {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a real number, got {type(v).__name__}") from None
    if not np.isfinite(f):
        raise ValueError(f"{what} must be finite, got {f}")
    return f


def _check_scale(scale):
    """every backend computes the adapter term in float32: a scale beyond its range is refused"""
    if not abs(scale) <= float(np.finfo(np.float32).max):
        raise ValueError(f"adapter scale {scale:g} (alpha / r) is beyond float32's range")


def _checked_pair(A, B, nan_hint="", bf16_bits=False):
    """(r, K, N) of A [r, K] and B [N, r] (2-D float32 or float16, or bf16_bits: bfloat16 as uint16
    bits): a rank of 0, ranks that differ and NaN / Inf are ValueErrors"""
    r, k = A.shape
    n, rb = B.shape
    if r == 0:
        raise ValueError("rank must be >= 1")
    if rb != r:
        raise ValueError(f"rank mismatch: A is [{r}, K] but B is [N, {rb}]")
    if bf16_bits:  # NaN / Inf: all exponent bits set
        finite = all(((a & np.uint16(0x7F80)) != np.uint16(0x7F80)).all() for a in (A, B))
    else:
        finite = np.isfinite(A).all() and np.isfinite(B).all()
    if not finite:
        raise ValueError("A or B contains NaN or Inf" + nan_hint)
    return r, k, n


def _tiles_of(B):
    """B [N, r] in tiles of 16 output rows, [ceil(N/16), r, 16] zero-padded, read-only: the
    expansion of one output tile reads one contiguous block (pqk_lora.Bp)"""
    n, r = B.shape
    nt = -(-n // 16)
    bp = np.zeros((nt, 16, r), B.dtype)
    bp.reshape(nt * 16, r)[:n] = B
    out = np.ascontiguousarray(bp.transpose(0, 2, 1))
    out.flags.writeable = False
    return out


def _frozen_copy(a, copy=True):
    """A read-only copy of a (never a view of the caller's array), or with copy=False a read-only
    view of it (the caller's array stays writeable)."""
    out = np.array(a, dtype=np.float32, order="C", copy=True) if copy else np.require(a, np.float32, ["C", "A"]).view()
    out.flags.writeable = False
    return out


def _colocate(loras):
    """Moves the fused kernels' operands of these adapters (A and Bp in the storage dtype) into one
    buffer, 64-byte aligned. From 4 MB on NumPy backs a buffer with huge pages, and the kernels
    stream A and B from DRAM faster than from 4 KB pages: rank 16 at 4096x4096, 8 layers, one
    thread, 4-5.5 us less per layer. The buffer lives while any of the adapters does."""
    loras = list(loras)
    sizes = [[(a.nbytes + 63) // 64 * 64 for a in ad._native[:2]] for ad in loras]
    buf = np.empty(sum(map(sum, sizes)) + 64, np.uint8)
    off = -buf.ctypes.data % 64
    for ad, sz in zip(loras, sizes):
        nat = list(ad._native)
        for i in (0, 1):
            a = nat[i]
            nat[i] = buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
            nat[i][...] = a
            nat[i].flags.writeable = False
            off += sz[i]
        if ad.storage == "float32":  # A and Bp are the operands themselves: no second copy
            ad.__dict__.update(A=nat[0], Bp=nat[1])
        ad.__dict__["_native"] = tuple(nat)


def _dtype_name(a):
    if hasattr(a, "dtype") and hasattr(a, "detach"):  # torch
        return {"torch.float16": "float16", "torch.bfloat16": "bfloat16"}.get(str(a.dtype), "float32")
    dt = getattr(a, "dtype", None)
    if dt is None:
        return "float32"
    if dt == np.float16:
        return "float16"
    if dt.name == "bfloat16" or dt == np.uint16:
        return "bfloat16"
    return "float32"


def _storage_dtype(A, B, storage):
    """storage="auto": keep fp16 / bf16 when A and B both arrive in it (PEFT files mostly do),
    halving the bytes the fused kernels read; else float32. Or force "float32", "float16",
    "bfloat16" (rounding A and B to nearest, once)."""
    if storage == "auto":
        a, b = _dtype_name(A), _dtype_name(B)
        return a if a == b else "float32"
    if storage not in _DTYPE_ID:
        raise ValueError(f"storage must be 'auto', 'float32', 'float16' or 'bfloat16', got {storage!r}")
    return storage


def _round_to(a, store):
    """float32 array rounded to the storage dtype and widened back (exactly representable)."""
    if store == "float16":
        with np.errstate(over="ignore"):
            h = a.astype(np.float16)
        if not np.isfinite(h).all():
            raise ValueError("A or B overflows float16; use storage='float32' or 'bfloat16'")
        return h.astype(np.float32)
    bits = a.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)) << np.uint32(16)
    return rounded.astype(np.uint32).view(np.float32)  # round to nearest even bf16


def _to_storage(a, store):
    if store == "float32":
        return np.require(a, np.float32, ["C", "A"])
    if store == "float16":
        return np.ascontiguousarray(a.astype(np.float16))
    return np.ascontiguousarray((np.ascontiguousarray(a, np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16))


def _row_bytes_slice(qt, r0, r1):
    """Canonical bytes of rows [r0, r1) of qt (formats whose sections are row-major)."""
    q, s, z = qt.sections()
    parts = [q[r0:r1].ravel()]
    if s.shape[1]:
        parts.append(s[r0:r1].ravel())
    if z.shape[1]:
        parts.append(z[r0:r1].ravel())
    return np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0])
