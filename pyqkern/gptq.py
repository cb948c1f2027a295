"""GPTQ post-training quantization (Frantar et al. 2022, arXiv 2210.17323), CPU only.

    g = pq.gptq.GPTQ(W)                    # W float32 [N, K], rows = output channels
    for x in calibration_batches:          # x [tokens, K] (or [..., K]): the layer's inputs
        g.add_batch(x)
    qt = g.quantize(format="int4", group_size=128, sym=False, act_order=True)
    print(g.report(X))                     # relative output error of GPTQ and of round-to-nearest

    qt = pq.gptq.quantize(W, X=X)          # one shot (or H= a ready Hessian [K, K])

The algorithm follows the reference implementation (IST-DASLab ``gptq.py`` / AutoGPTQ):

- ``H = 2/n Σ x xᵀ`` accumulated in float64 as a running mean (``add_batch``).
- dead inputs (``H_ii == 0``): ``H_ii = 1`` and the weight column is zeroed.
- ``static_groups`` (int4): group parameters computed up front on the original column groups.
- ``act_order``: columns processed in order of descending ``diag(H)`` (stable sort).
- dampening ``damp · mean(diag H)`` on the diagonal; if a Cholesky factorization fails the
  dampening is multiplied by 10, up to 3 times, then ``ValueError``.
- ``U`` = upper Cholesky factor of ``H⁻¹`` (itself from the Cholesky factor of ``H``).
- columns in lazy blocks of ``blocksize``: inside a block each column is quantized,
  ``err = (w - q) / U_jj`` and the block's later columns get ``-= U[j, jj] · err``; after the
  block all later columns get ``-= U[block, later]ᵀ · Err`` (one GEMM).
- int4 group parameters are computed at each group boundary in processing order from the
  working weights *as they are at the start of the lazy block* holding the boundary (that is
  what the reference does: it reads the full matrix, whose current block is only written back
  after the block). They follow pyqkern's int4 rules (:func:`pyqkern.reference.int4_group_params`:
  ``xmin = min(0, ·)``, ``xmax = max(0, ·)``, fp16-rounded scale, ``zero = rint(-xmin/scale)``,
  round half to even), so the returned QTensor dequantizes exactly to the values GPTQ used
  in its error feedback.
- q4_0 / q8_0 targets: codes on ggml's 32-wide block grid (in processing order); each block's
  ggml scale is computed from the *current* (error-updated) working weights when the block's
  first column is reached, and every column of the block is coded with ggml's rule and that
  scale (fp16 d for the value). The bytes are ordinary ggml blocks.

With ``act_order`` (and not ``static_groups``) the result is ``qt.with_perm(perm)``: the stored
weight is the quantized ``W[:, perm]`` with its groups in processing order and, within a group,
the columns in original order (what a GPTQ checkpoint's ``g_idx`` implies, so
:func:`pyqkern.io.to_gptq` / :func:`pyqkern.io.from_gptq` round-trip the bytes); with a single
group there is no permutation. :func:`pyqkern.dequantize` returns the original column order.
With ``static_groups`` the groups are the original column groups, so the result needs no
permutation.

The inner column loop runs in Numba (:mod:`pyqkern.numba_kernels.gptq_loop`) when Numba is
installed, else in NumPy (``backend="numpy"`` forces the latter).
"""
from __future__ import annotations

import math

import numpy as np

from . import _formats, _grid
from . import _qtensor

__all__ = ["GPTQ", "quantize", "FORMATS"]

F32 = np.float32
F64 = np.float64
FORMATS = _grid.TARGETS  # int2 int3 int4 int8 q4_0 q4_1 q8_0 iq4_nl nf4 fp4
BITS = {"int2": 2, "int3": 3, "int4": 4, "int8": 8, "q4_0": 4, "q4_1": 4, "q8_0": 8, "iq4_nl": 4, "nf4": 4,
        "fp4": 4}
# parameters fixed up front from the weights as they are at the start of the lazy block holding
# the group boundary (the reference's rule); the others from the current working weights
_UPFRONT = ("int2", "int3", "int4", "int8")


# ---------------------------------------------------------------- linear algebra
def _chol_upper(a):
    """Upper Cholesky factor R (a = Rᵀ R); raises np.linalg.LinAlgError if not positive definite."""
    try:
        from scipy.linalg import lapack
    except ImportError:  # pragma: no cover - scipy is optional
        return np.linalg.cholesky(a).T.copy()
    r, info = lapack.dpotrf(a, lower=0, clean=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"dpotrf info={info}")
    return r


def _inverse_from_upper(r):
    """(RᵀR)⁻¹ from its upper Cholesky factor R (torch.cholesky_inverse). With scipy only the
    upper triangle is valid (all that the next upper factorization reads)."""
    try:
        from scipy.linalg import lapack
    except ImportError:  # pragma: no cover
        rinv = np.linalg.inv(r)
        return rinv @ rinv.T
    inv, info = lapack.dpotri(r, lower=0, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"dpotri info={info}")
    return inv


def hinv_upper(H, damp, overwrite=False):
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = damp · mean(diag H), retrying with 10x the
    dampening up to 3 times. Returns (U, damp actually used). overwrite: H may be modified."""
    H = H if overwrite else np.array(H, dtype=F64, copy=True)
    diag = np.diag_indices_from(H)
    h0 = H[diag].copy()
    mean = float(np.mean(h0))
    d = float(damp)
    last = None
    for _ in range(4):
        H[diag] = h0 + d * mean
        try:
            U = _chol_upper(_inverse_from_upper(_chol_upper(H)))
            if np.isfinite(np.diag(U)).all() and (np.diag(U) > 0).all():
                H[diag] = h0
                return U, d
            last = "non-finite factor"
        except np.linalg.LinAlgError as e:
            last = str(e)
        d = d * 10 if d > 0 else 0.01
    H[diag] = h0
    raise ValueError(f"GPTQ: the Hessian is not positive definite even with dampening {d / 10:g} "
                     f"· mean(diag H) ({last}); give more or better calibration data")


def _symmetric_from_upper(a, bs=256):
    """float64 C-order copy of a [K, K] whose lower triangle is the transpose of its upper one
    (BLAS syrk fills only the upper triangle). Block by block: two passes over the matrix
    instead of the temporaries of triu + triu.T; a Fortran-order input is copied as its
    transpose (a plain copy, whose lower triangle then holds the valid half)."""
    from_lower = a.flags.f_contiguous and not a.flags.c_contiguous
    out = np.array(a.T if from_lower else a, dtype=F64, order="C")
    k = out.shape[0]
    for i in range(0, k, bs):
        e = min(k, i + bs)
        d = out[i:e, i:e]
        if from_lower:
            d[np.triu_indices(e - i, 1)] = d.T[np.triu_indices(e - i, 1)]
            if e < k:
                out[i:e, e:] = out[e:, i:e].T
        else:
            d[np.tril_indices(e - i, -1)] = d.T[np.tril_indices(e - i, -1)]
            if e < k:
                out[e:, i:e] = out[i:e, e:].T
    return out


# ---------------------------------------------------------------- the column loop
def _block_columns_numpy(Wb, Ub, Err, C, Qv, colgrp, A, Bt, Z, M, T, qlo, qhi, j0, j1, mode):
    """NumPy twin of :func:`pyqkern.numba_kernels.gptq_loop.block_columns` (same arithmetic)."""
    for j in range(j0, j1):
        g = colgrp[j]
        P = {"a": A[g], "b": Bt[g], "m": M[g], "z": Z[g]}
        c, q = _grid.mode_codes_values(mode, Wb[j].astype(F32)[:, None], P, qlo, qhi, T)
        c, q = c[:, 0], q[:, 0]
        C[j] = c
        Qv[j] = q
        with np.errstate(invalid="ignore", over="ignore"):  # a non-finite q feeds back nothing (as numba)
            Err[j] = np.where(np.isfinite(q), (Wb[j] - q.astype(F64)) / Ub[j, j], 0.0)
        if j + 1 < Wb.shape[0]:
            Wb[j + 1:] -= np.outer(Ub[j, j + 1:], Err[j])


def _loop_fn(backend):
    if backend == "numpy":
        return _block_columns_numpy
    if backend not in ("auto", "numba"):
        raise ValueError(f"backend must be 'numba', 'numpy' or 'auto', got {backend!r}")
    try:
        from .numba_kernels.gptq_loop import block_columns
    except ImportError:
        if backend == "numba":
            raise
        return _block_columns_numpy
    return block_columns


def _grid_params(fmt, cols, sym, search):
    """cols [gs, N] (processing-order columns of one group or block) -> dict of [N] arrays."""
    b = np.ascontiguousarray(cols.T, dtype=F32)
    return _grid.search_params(fmt, b, sym) if search else _grid.params(fmt, b, sym)


def gptq_core(W, H, *, fmt="int4", group=128, sym=False, act_order=False, static_groups=False,
              damp=0.01, blocksize=128, backend="auto", search=False):
    """The algorithm without format checks (any group size dividing K for int2/int3/int4).

    Returns a dict: ``codes`` int32 [K, N] and ``values`` float32 [K, N] in processing order,
    ``perm`` (processing position -> original column, or None), ``colgrp`` int [K] (group of
    each processing position), parameter tables ``A``/``B``/``M``/``Z`` [G, N] (see
    :mod:`pyqkern._grid`), ``group`` (elements per parameter set), ``damp`` used."""
    W = np.array(W, dtype=F64, copy=True)
    H = np.array(H, dtype=F64, copy=True)
    n, k = W.shape
    mode = _grid.MODE[fmt]
    gs = _grid.block_size(fmt, k, group)
    if k % gs:
        raise ValueError(f"GPTQ: K={k} is not a multiple of the group size {gs}")
    ngroups = k // gs
    blocksize = int(blocksize)
    if blocksize <= 0:
        raise ValueError("GPTQ: blocksize must be positive")
    qlo, qhi = _grid.code_range(fmt) if mode == 0 else (0, 0)
    T = _grid.TABLES.get(fmt, np.zeros(2, F32))

    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    A = np.zeros((ngroups, n), F32)
    Bt = np.zeros((ngroups, n), F32)
    M = np.zeros((ngroups, n), F32)
    Z = np.zeros((ngroups, n), np.int32)

    def put(g, P):
        A[g], Bt[g], M[g], Z[g] = P["a"], P["b"], P["m"], P["z"]

    if static_groups:
        if fmt not in _UPFRONT:
            raise ValueError("GPTQ: static_groups applies to int2/int3/int4/int8 only")
        for g in range(ngroups):
            put(g, _grid_params(fmt, W[:, g * gs:(g + 1) * gs].T, sym, search))

    perm = None
    if act_order:
        perm = np.argsort(-np.diag(H), kind="stable")
        W = W[:, perm]
        H = H[perm][:, perm]

    U, damp_used = hinv_upper(H, damp, overwrite=True)
    del H

    WT = np.ascontiguousarray(W.T)  # [K, N], processing order
    del W
    pos = np.arange(k)
    if static_groups:
        colgrp = ((perm if perm is not None else pos) // gs).astype(np.int64)
    else:
        colgrp = (pos // gs).astype(np.int64)
    codes = np.empty((k, n), np.int32)
    values = np.empty((k, n), F32)
    loop = _loop_fn(backend)

    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        nb = i2 - i1
        Wb = WT[i1:i2].copy()
        Ub = np.ascontiguousarray(U[i1:i2, i1:i2])
        Err = np.empty((nb, n), F64)
        Cb = np.empty((nb, n), np.int32)
        Qb = np.empty((nb, n), F32)
        cg = np.ascontiguousarray(colgrp[i1:i2])
        if fmt in _UPFRONT:
            if not static_groups:
                # groups starting in this block: parameters from WT as of the block start
                for p in range(-(-i1 // gs) * gs, i2, gs):
                    put(p // gs, _grid_params(fmt, WT[p:p + gs], sym, search))
            loop(Wb, Ub, Err, Cb, Qb, cg, A, Bt, Z, M, T, qlo, qhi, 0, nb, mode)
        else:
            # blocks: parameters from the current (error-updated) working columns
            j = 0
            while j < nb:
                p = i1 + j
                j1 = min(nb, j + gs - (p % gs))
                if p % gs == 0:
                    cur = np.concatenate([Wb[j:nb], WT[i2:p + gs]]) if p + gs > i2 else Wb[j:j + gs]
                    put(p // gs, _grid_params(fmt, cur[:gs], sym, search))
                loop(Wb, Ub, Err, Cb, Qb, cg, A, Bt, Z, M, T, qlo, qhi, j, j1, mode)
                j = j1
        codes[i1:i2] = Cb
        values[i1:i2] = Qb
        if i2 < k:
            WT[i2:] -= U[i1:i2, i2:].T @ Err
    return {"codes": codes, "values": values, "perm": perm, "colgrp": colgrp, "A": A, "B": Bt, "M": M, "Z": Z,
            "group": gs, "damp": damp_used}


def _assemble(fmt, res, n, k, group, sym, static_groups):
    """QTensor from gptq_core's output (stored column order: processing order, or the original
    order with static groups)."""
    perm = res["perm"]
    c = res["codes"]  # [K, N] processing order
    if perm is not None and static_groups:
        stored = np.empty((n, k), np.int32)
        stored[:, perm] = c.T
        perm = None
    else:
        stored = np.ascontiguousarray(c.T)
        if perm is not None:
            # Within a group (one parameter set) the column order changes no value: keep each
            # group's columns in original order, the order a GPTQ checkpoint's g_idx implies (it
            # holds groups, not positions), so to_gptq -> from_gptq gives back these bytes and
            # the same int8-path results. With one group that is no permutation at all.
            order = np.lexsort((perm, np.arange(k) // _grid.block_size(fmt, k, group)))
            perm, stored = perm[order], np.ascontiguousarray(stored[:, order])
            if np.array_equal(perm, np.arange(k)):
                perm = None
    tables = {"a": res["A"], "b": res["B"], "m": res["M"], "z": res["Z"]}
    qt = _grid.encode(fmt, stored, tables, n, k, group, sym)
    return qt.with_perm(perm) if perm is not None else qt


def _check_finite(a, what):
    if not np.isfinite(a).all():
        raise ValueError(f"GPTQ: {what} contain NaN or Inf")


def _cast(a, dtype, what):
    """a as dtype (C order), finite: finite values beyond dtype's range are named as such, not as
    NaN / Inf (a review: W of 1e39 in float64 was said to hold NaN or Inf)"""
    a = np.asarray(a)
    if a.dtype.kind == "f" and a.dtype.itemsize > np.dtype(dtype).itemsize and np.isfinite(a).all() \
            and a.size and np.abs(a).max() > np.finfo(dtype).max:
        raise ValueError(f"GPTQ: {what} exceed the {np.dtype(dtype).name} range (|x| up to "
                         f"{float(np.abs(a).max()):.3g}): scale them down")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(a, dtype=dtype)
    _check_finite(out, what)
    return out


def _np(a, what="input"):
    """a as a numpy array; a torch tensor (a Parameter too, any device, bfloat16) detached to the
    CPU. Complex values and dtypes numpy cannot hold (torch float8) are TypeErrors."""
    if hasattr(a, "detach") and hasattr(a, "numpy"):
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":  # no numpy dtype; exact in float32
            a = a.float()
        try:
            a = a.numpy()
        except TypeError as e:  # float8 and the like
            raise TypeError(f"GPTQ: {what}: dtype {a.dtype} is not supported (convert to float32)") from e
    a = np.asarray(a)
    if a.dtype.kind == "c":  # numpy would drop the imaginary part with only a ComplexWarning
        raise TypeError(f"GPTQ: {what} must be real, got {a.dtype}")
    return a


def _floats(a, what):
    """_np(a) as floating point: uint16 is bfloat16 bit patterns, as pq.quantize and pq.matmul
    read it (a review: calibration inputs of bf16 bits were taken as integers, H off by ~1e9);
    any other integer or bool dtype is a TypeError."""
    a = _np(a, what)
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(F32)
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise TypeError(f"GPTQ: {what} must be floating point (uint16: bfloat16 bits), got {a.dtype}")
    return a


def _as_weight(W):
    W = _floats(W, "W")
    if W.ndim != 2 or W.shape[0] == 0 or W.shape[1] == 0:
        raise ValueError(f"GPTQ: W must be a non-empty 2-D [N, K] array, got shape {W.shape}")
    return _cast(W, F32, "the weights")


def _rel_err(X, W, What):
    X = _floats(X, "the calibration inputs").astype(F64).reshape(-1, W.shape[1])
    ref = X @ W.astype(F64).T
    num = np.linalg.norm(ref - X @ What.astype(F64).T)
    den = np.linalg.norm(ref)
    return float(num / den) if den > 0 else float(num)


class GPTQ:
    """GPTQ state for one linear layer with weight W [N, K] (rows = outputs)."""

    def __init__(self, W, hessian_dtype="float64"):
        """hessian_dtype: "float64" (default) or "float32" for the accumulation in add_batch
        (float32: BLAS ssyrk, about twice as fast, float32 rounding in the running sum, which
        depends on the BLAS library's thread count, and so may the codes; the factorisations
        always run in float64)."""
        self.W = _as_weight(W)
        k = self.W.shape[1]
        if hessian_dtype not in ("float64", "float32", np.float64, np.float32):
            raise ValueError(f"GPTQ: hessian_dtype must be 'float64' or 'float32', got {hessian_dtype!r}")
        self._hdt = np.dtype(hessian_dtype).type
        self._H = np.zeros((k, k), self._hdt, order="F")  # upper triangle valid (BLAS syrk)
        self._seen = np.zeros(k, bool)
        self.nsamples = 0
        self.qtensor = None
        self.values = None  # float32 [N, K]: the weights the last quantize chose (= dequantize(qtensor))
        self.damp_used = None
        self._opts = None

    @property
    def shape(self):
        return self.W.shape

    @property
    def inputs_all_zero(self) -> bool:
        """Every input column is dead (H's diagonal is all zero): quantize refuses, as GPTQ would
        zero the whole weight."""
        return not (np.diag(self._H) > 0).any()

    @property
    def H(self) -> np.ndarray:
        """The accumulated Hessian 2/n Σ x xᵀ, float64 [K, K] (a symmetric copy)."""
        return _symmetric_from_upper(self._H)

    def add_batch(self, x) -> None:
        """Accumulate ``H = 2/n Σ x xᵀ`` over x [tokens, K] (any leading dims), float64 (or the
        ``hessian_dtype`` given), as a running mean (H *= n_old / n_new; H += 2/n_new x xᵀ), with
        BLAS syrk (half the flops)."""
        k = self.W.shape[1]
        x = _floats(x, "the calibration inputs")
        if x.ndim == 0 or x.shape[-1] != k:
            raise ValueError(f"GPTQ: inputs must be [..., {k}], got shape {x.shape}")
        x = x.reshape(-1, k)
        t = x.shape[0]
        if t == 0:
            return
        x = _cast(x, self._hdt, "the calibration inputs")
        self._seen |= (x != 0).any(axis=0)  # inputs with a nonzero value: not dead, whatever H says
        old = self.nsamples
        self.nsamples += t
        beta = old / self.nsamples
        alpha = 2.0 / self.nsamples
        try:
            from scipy.linalg.blas import dsyrk, ssyrk
        except ImportError:  # pragma: no cover - scipy is optional
            self._H *= self._hdt(beta)
            self._H += self._hdt(alpha) * (x.T @ x)
            return
        syrk = dsyrk if self._hdt is F64 else ssyrk
        # x.T is a Fortran-order [K, t] view: C = alpha A Aᵀ + beta C on the upper triangle, in place
        out = syrk(alpha, x.T, beta=beta, c=self._H, trans=0, lower=0, overwrite_c=1)
        if out is not self._H and not np.shares_memory(out, self._H):  # pragma: no cover
            self._H = np.asfortranarray(out)

    def set_hessian(self, H, nsamples=1) -> None:
        """Use a ready Hessian H [K, K] (symmetric, finite) instead of add_batch. Only one
        triangle is read (H must be symmetric)."""
        k = self.W.shape[1]
        H = _np(H, "H").astype(F64)
        if H.shape != (k, k):
            raise ValueError(f"GPTQ: H must be [{k}, {k}], got {H.shape}")
        _check_finite(H, "the Hessian")
        # one triangle is read, which one depends on the layout: a triangle alone (np.triu(H))
        # lost every off-diagonal term without a word (a review). Row blocks: H - H.T whole would
        # be another K x K float64 array (~1 GB at K = 11008)
        asym = max(float(np.abs(H[i:i + 512] - H[:, i:i + 512].T).max()) for i in range(0, k, 512))
        if asym > 1e-5 * max(float(np.abs(H).max()), np.finfo(F64).tiny):
            raise ValueError(f"GPTQ: H must be symmetric (max |H - H.T| = {asym:.3g}); pass the whole matrix, "
                             "not one triangle")
        # symmetric: the Fortran-order copy of H.T is a plain copy of a C-order H
        if isinstance(nsamples, bool) or not isinstance(nsamples, (int, np.integer)) or nsamples < 1:
            raise ValueError(f"GPTQ: nsamples must be a positive integer (the samples H was averaged over), "
                             f"got {nsamples!r}")
        self._H = np.array(H.T if H.flags.c_contiguous else H, dtype=self._hdt, copy=True, order="F")
        self._seen = np.zeros(k, bool)  # a given H: its zero diagonal entries are dead inputs
        self.nsamples = int(nsamples)

    def quantize(self, format="int4", bits=None, group_size=None, sym=False, act_order=False,
                 static_groups=False, damp=0.01, blocksize=128, backend="auto", search=None) -> _qtensor.QTensor:
        """Run GPTQ; returns a QTensor (with ``perm`` set for act_order without static_groups).

        format: "int2"/"int3"/"int4" (group_size default 128, -1 = per channel, ``sym``),
        "int8" (per channel, symmetric), ggml grids "q4_0", "q4_1", "q8_0", "iq4_nl" (blocks of
        32: group_size and sym do not apply; q4_1 and iq4_nl scales come from the current
        working weights, iq4_nl's per block from a scale search or ggml's rule, whichever fits
        better), or "nf4" / "fp4" (bitsandbytes; group_size = block size, default 64; no double
        quantization). ``bits`` picks the width within the int family
        ("int4" with bits=3 is int3); for other formats it must be the format's own.
        ``search="mse"``: each group's / block's parameters from the MSE shrink search
        (:func:`pyqkern._grid.search_params`) instead of the plain min/max rule."""
        fmt = format
        if not isinstance(fmt, str) or fmt not in FORMATS:
            raise NotImplementedError(f"GPTQ: format {fmt!r} is not supported (supported: {', '.join(FORMATS)})")
        for name, v in (("bits", bits), ("group_size", group_size), ("blocksize", blocksize)):
            if (v is not None or name == "blocksize") and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
                raise ValueError(f"GPTQ: {name} must be an integer, got {v!r}")  # not 3.7 -> 3
        for name, v in (("sym", sym), ("act_order", act_order), ("static_groups", static_groups)):
            if isinstance(v, (str, bytes)) or v not in (False, True, 0, 1):  # "no" is not False
                raise ValueError(f"GPTQ: {name} must be True or False, got {v!r}")
        if bits is not None:
            b = int(bits)
            if fmt in _grid.INT_BITS:
                if b not in (2, 3, 4, 8):
                    raise ValueError(f"GPTQ: bits must be 2, 3, 4 or 8 for the int formats, got {bits}")
                fmt = f"int{b}"
            elif b != BITS[fmt]:
                raise ValueError(f"GPTQ: {fmt} is {BITS[fmt]}-bit; bits={bits} does not apply (use int2/int3/int4/int8)")
        if search not in (None, "mse"):
            raise ValueError(f"GPTQ: search must be None or 'mse', got {search!r}")
        try:  # a number: also a 0-d array, a torch scalar, a Fraction; not the string "0.1"
            d = float("nan") if isinstance(damp, (str, bytes)) else float(damp)
        except (TypeError, ValueError, OverflowError):
            d = float("nan")
        if not (math.isfinite(d) and d >= 0) or isinstance(damp, bool):
            raise ValueError(f"GPTQ: damp must be a finite number >= 0, got {damp!r}")
        if self.nsamples == 0:
            raise ValueError("GPTQ: no calibration data (call add_batch or set_hessian first)")
        n, k = self.W.shape
        if fmt in ("int2", "int3", "int4"):
            g = 128 if group_size in (None, 0) else int(group_size)  # 0: the default, as in pq.quantize
            if g != -1 and (g <= 0 or k % g):
                raise ValueError(f"GPTQ: K={k} is not a multiple of the group size {g}")
            _formats.resolve_params(fmt, k, g, sym)  # the format's own checks
        elif fmt in ("nf4", "fp4"):
            g = 64 if group_size is None else int(group_size)
            _formats.resolve_params(fmt, k, g)
            if sym:
                raise ValueError(f"GPTQ: sym does not apply to {fmt}")
        else:
            if fmt == "int8":
                if group_size not in (None, -1, 0):
                    raise ValueError("GPTQ: int8 is per channel (group_size=-1)")
                if sym not in (False, True):
                    raise ValueError("GPTQ: sym must be a bool")
            elif static_groups:
                raise ValueError("GPTQ: static_groups applies to int2/int3/int4/int8 only")
            blk = _formats.FORMATS[fmt].block
            if fmt != "int8" and (group_size not in (None, 0, blk) or sym):  # ggml formats: fixed blocks
                raise ValueError(f"GPTQ: {fmt} has fixed blocks of {blk} and its own offsets; group_size / sym "
                                 f"do not apply (as in pyqkern.quantize)")
            _formats.resolve_params(fmt, k)
            g = -1 if fmt == "int8" else 32
        H = self.H
        if not np.isfinite(H).all():
            raise ValueError("GPTQ: the Hessian holds NaN or Inf" + (
                " (finite calibration inputs whose squares overflow its dtype: scale them down; GPTQ does not "
                "depend on their scale)" if self._seen.any() else ""))
        # every input with nonzero values underflowed (its square is 0 in H): GPTQ would take them
        # all as dead and zero the whole weight. (Some such columns beside normal ones are dead
        # in effect: their products are below the others' rounding.)
        if self._seen.any() and not (self._seen & (np.diag(H) > 0)).any():
            raise ValueError(f"GPTQ: the calibration inputs are so small that their squares underflow "
                             f"{np.dtype(self._hdt).name} (H would be all zero): scale them up (GPTQ does not "
                             "depend on their scale)")
        if self.inputs_all_zero:  # every input dead: GPTQ would zero the whole weight
            raise ValueError("GPTQ: the calibration inputs are all zero" + (
                "" if np.dtype(self._hdt) == F64 else " (in float32: smaller values underflow to 0)")
                + ", so the Hessian is zero and GPTQ would zero the whole weight: calibrate on real inputs")
        sym_b = bool(sym) and fmt in ("int2", "int3", "int4")
        res = gptq_core(self.W, H, fmt=fmt, group=g, sym=sym_b, act_order=bool(act_order),
                        static_groups=bool(static_groups), damp=damp, blocksize=blocksize, backend=backend,
                        search=search == "mse")
        qt = _assemble(fmt, res, n, k, g, sym_b, bool(static_groups))
        from ._ops import _check_scale_range

        # as pq.quantize warns (the weights in stored column order)
        _check_scale_range(qt, self.W if qt.perm is None else self.W[:, qt.perm], stacklevel=4)
        vals = np.empty((n, k), F32)  # the weights GPTQ chose, original column order
        if res["perm"] is None:
            vals[:] = res["values"].T
        else:
            vals[:, res["perm"]] = res["values"].T
        self.values = vals
        self.qtensor = qt
        self.damp_used = res["damp"]
        self._opts = (fmt, g, sym_b)
        return qt

    def report(self, X, qt=None) -> dict:
        """Relative layer output error ||XWᵀ − XŴᵀ|| / ||XWᵀ|| of GPTQ (the last quantize, or qt)
        and of round-to-nearest (pq.quantize) in the same format."""
        from ._ops import dequantize, quantize as rtn_quantize

        qt = qt if qt is not None else self.qtensor
        if qt is None:
            raise ValueError("GPTQ: nothing quantized yet")
        X = _floats(X, "the calibration inputs")
        k = self.W.shape[1]
        if X.ndim < 1 or X.shape[-1] != k:
            raise ValueError(f"GPTQ: inputs must be [..., {k}], got shape {X.shape}")
        if not isinstance(qt, _qtensor.QTensor) or qt.shape != self.W.shape:
            raise ValueError(f"GPTQ: qt must be a QTensor of this layer's shape {self.W.shape}, got {qt!r}")
        _check_finite(X, "the inputs")
        fmt = qt.format
        if fmt in _formats.GROUPED:
            rtn = rtn_quantize(self.W, fmt, group=qt.params["group"], sym=bool(qt.params["sym"]) or None)
        else:
            rtn = rtn_quantize(self.W, fmt)
        return {"format": fmt, "group": qt.params.get("group", 0), "sym": bool(qt.params.get("sym", 0)),
                "gptq": _rel_err(X, self.W, dequantize(qt)), "rtn": _rel_err(X, self.W, dequantize(rtn))}


def quantize(W, X=None, H=None, *, report=False, **kw):
    """One shot: GPTQ of W [N, K] with calibration inputs X [tokens, K] or a Hessian H [K, K].
    Keyword arguments as :meth:`GPTQ.quantize`. With report=True (needs X) returns (qt, report)."""
    g = GPTQ(W)
    if (X is None) == (H is None):
        raise ValueError("GPTQ: give exactly one of X (calibration inputs) or H (Hessian)")
    if X is not None:
        g.add_batch(X)
    else:
        g.set_hessian(H)
    qt = g.quantize(**kw)
    if report:
        if X is None:
            raise ValueError("GPTQ: report=True needs X")
        return qt, g.report(X)
    return qt
