"""LoRA / DoRA adapters on quantized weights: merge into the packed weight, exact unmerge, and the
QLoRA backward pass.

    import pyqkern as pq
    ad = pq.LoRA(A, B, alpha=16)                   # A [r, K], B [N, r] (PEFT layout)
    merged, rep = pq.lora.merge(qt, ad)            # requantized in qt's format and parameters
    rep.retained                                    # fraction of the adapter's change that survived
    base = pq.lora.unmerge(merged, rep)            # the original bytes, exactly
    dx, dA, dB = pq.lora.backward(x, dy, qt, ad)   # gradients of y = x@W.T + s*(x@A.T)@B.T

Merging into a quantized weight is lossy: ``merge`` dequantizes, adds the delta, and requantizes
with the same format and parameters, so small deltas can round away completely (PEFT's bnb merge
has the same problem). The ``MergeReport`` says how much survived and warns below ``warn_below``.
Requantized weights cannot be inverted; ``unmerge`` is exact only because the report keeps a
reference to the original QTensor (its bytes are checked, not recomputed).

Everything works in row chunks, so the whole dequantized [N, K] weight is never materialised.
"""
from __future__ import annotations

import hashlib
import numbers
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import _formats, _ops, _qtensor
from ._formats import GROUPED, INTN_BITS
from ._lora import LoRA
from ._matmul import _x_rows
from ._ops import dequantize, quantize
from ._qtensor import QTensor

__all__ = ["LoRA", "MergeReport", "merge", "unmerge", "delta", "merge_target", "backward", "backward_base"]

_CHUNK_ELEMS = 1 << 21  # default merge chunk: ~2M weights (16 MB as float64) at a time


# --------------------------------------------------------------------------- row chunks of a QTensor
class _Rows:
    """Dequantize rows [r0, r1) of a QTensor from its canonical bytes (sections read once)."""

    def __init__(self, qt: QTensor, backend="native"):
        self.qt = qt
        self.backend = backend
        self.q, self.s, self.z = qt.sections()  # nf4 double-quant: absmax decompressed once here
        fmt = qt.format
        self.group = (qt.params.get("group") or None) if fmt in GROUPED else None
        self.sym = qt.sym if fmt in INTN_BITS else None

    def block(self, r0, r1) -> QTensor:
        parts = [self.q[r0:r1].ravel()] + [a[r0:r1].ravel() for a in (self.s, self.z) if a.shape[1]]
        buf = np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0])
        return QTensor.from_bytes(self.qt.format, (r1 - r0, self.qt.shape[1]), buf, group=self.group, sym=self.sym)

    def dequantize(self, r0, r1) -> np.ndarray:
        return dequantize(self.block(r0, r1), backend=self.backend)


def _check_chunk(chunk_rows, default):
    if chunk_rows is None:
        return default
    if not isinstance(chunk_rows, numbers.Integral) or isinstance(chunk_rows, bool) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    return int(chunk_rows)


def _check_pair(qt, ad):
    if not isinstance(qt, QTensor):
        raise TypeError(f"expected a QTensor, got {type(qt).__name__}")
    if not isinstance(ad, LoRA):
        raise TypeError(f"expected a pyqkern LoRA adapter, got {type(ad).__name__}")
    ad.check_base(qt.shape)


def _digest(qt: QTensor) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(qt.data).data, digest_size=32).digest()


# --------------------------------------------------------------------------- delta and merge target
def delta(ad: LoRA, r0: int = 0, r1: int | None = None) -> np.ndarray:
    """Rows [r0, r1) of scale * B @ A as float32, the exact delta ``merge`` adds.

    The rank-r sum is accumulated in float64 in a fixed order (each product is exact in float64)
    and rounded once to float32, so the result does not depend on the BLAS or on the row chunking.
    It agrees with ``ad.delta()`` (a float32 BLAS product) to float32 rounding."""
    if not isinstance(ad, LoRA):
        raise TypeError(f"expected a pyqkern LoRA adapter, got {type(ad).__name__}")
    r1 = ad.out_features if r1 is None else r1
    if not 0 <= r0 <= r1 <= ad.out_features:
        raise ValueError(f"rows [{r0}, {r1}) outside [0, {ad.out_features})")
    b = ad.B[r0:r1].astype(np.float64)
    a = ad.A.astype(np.float64)
    acc = np.zeros((r1 - r0, ad.in_features), np.float64)
    for j in range(ad.rank):
        acc += b[:, j, None] * a[j]
    acc *= ad.scale
    return acc.astype(np.float32)


def _target(w, d32, factor):
    """(float32 weight to requantize, float64 intended change) for one chunk."""
    if factor is None:  # LoRA: W + delta, one float32 addition
        return w + d32, d32.astype(np.float64)
    s = w.astype(np.float64) + d32  # DoRA (PEFT): m / ||W + dW||_row * (W + dW)
    s *= factor.astype(np.float64)[:, None]
    return s.astype(np.float32), s - w


def _no_perm(qt, what):
    if getattr(qt, "perm", None) is not None:
        raise NotImplementedError(f"{what} of a weight with an input permutation (GPTQ act-order) is not "
                                  "supported yet; pq.matmul(x, qt, lora=...) is")


def merge_target(qt: QTensor, ad: LoRA, *, backend="native") -> np.ndarray:
    """The float32 [N, K] weight that ``merge`` requantizes (materialises the whole weight: for
    checks and small layers). LoRA: deq(W) + delta(ad) in float32. DoRA (PEFT's definition):
    float32(f * (deq(W) + delta(ad))) in float64 with f = ad.dora_factor(qt) = m / ||W + dW||_row."""
    _no_perm(qt, "pyqkern.lora.merge_target")
    _check_pair(qt, ad)
    w = dequantize(qt, backend=backend)
    factor = ad.dora_factor(qt) if ad.is_dora else None
    return _target(w, delta(ad), factor)[0]


# --------------------------------------------------------------------------- report
@dataclass(frozen=True, eq=False)
class MergeReport:
    """How much of the adapter survived requantization (all norms Frobenius, in float64).

    intended = the change the adapter asks for: scale*B@A (LoRA; ``delta_norm`` is its norm), or
               f*(W + scale*B@A) - W (DoRA). applied = deq(merged) - deq(base).
    retained  = <applied, intended> / ||intended||^2: 1 = all of it, 0 = none (NaN if intended = 0,
                or if the merged weights overflowed the format's range: then rel_error is Inf).
    rel_error = ||applied - intended|| / ||intended||.
    row_retained / row_rel_error: the same per output row (NaN for rows with no intended change);
    worst_row is the row with the largest rel error (-1 if none).
    base keeps the original QTensor, which is what makes ``unmerge`` exact."""

    format: str
    dora: bool
    delta_norm: float
    applied_norm: float
    retained: float
    rel_error: float
    worst_row: int
    worst_row_retained: float
    worst_row_rel_error: float
    row_retained: np.ndarray = field(repr=False)
    row_rel_error: np.ndarray = field(repr=False)
    base: QTensor = field(repr=False)
    _base_digest: bytes = field(repr=False)
    _merged_digest: bytes = field(repr=False)


class _Stats:
    def __init__(self, n):
        self.dot = self.ii = self.aa = self.ee = 0.0
        self.row_dot = np.zeros(n)
        self.row_ii = np.zeros(n)
        self.row_ee = np.zeros(n)

    def add(self, r0, r1, applied, intended):
        err = applied - intended
        rd = np.einsum("ij,ij->i", applied, intended)
        ri = np.einsum("ij,ij->i", intended, intended)
        re_ = np.einsum("ij,ij->i", err, err)
        self.row_dot[r0:r1], self.row_ii[r0:r1], self.row_ee[r0:r1] = rd, ri, re_
        self.dot += float(rd.sum())
        self.ii += float(ri.sum())
        self.ee += float(re_.sum())
        self.aa += float(np.einsum("ij,ij->", applied, applied))

    def report(self, fmt, dora, base, merged):
        dn, an = float(np.sqrt(self.ii)), float(np.sqrt(self.aa))
        if self.ii > 0 and not (np.isfinite(self.dot) and np.isfinite(self.ee)):
            retained, rel = float("nan"), float("inf")  # merged weights overflowed: no fraction survived to speak of
        elif self.ii > 0:
            retained, rel = self.dot / self.ii, float(np.sqrt(self.ee)) / dn
        else:
            retained, rel = float("nan"), (0.0 if self.aa == 0 else float("inf"))
        with np.errstate(divide="ignore", invalid="ignore"):
            live = self.row_ii > 0
            row_ret = np.where(live, self.row_dot / np.where(live, self.row_ii, 1), np.nan)
            row_ret[~np.isfinite(row_ret)] = np.nan  # an overflowed row (its error is Inf / NaN)
            row_rel = np.where(live, np.sqrt(self.row_ee) / np.sqrt(np.where(live, self.row_ii, 1)), np.nan)
        if live.any():  # a NaN error (weights that overflowed) is the worst
            worst = int(np.argmax(np.where(live, np.nan_to_num(row_rel, nan=np.inf), -np.inf)))
            wr, we = float(row_ret[worst]), float(row_rel[worst])
        else:
            worst, wr, we = -1, float("nan"), float("nan")
        return MergeReport(fmt, dora, dn, an, float(retained), float(rel), worst, wr, we,
                           row_ret.astype(np.float32), row_rel.astype(np.float32), base, _digest(base),
                           _digest(merged))


# --------------------------------------------------------------------------- merge / unmerge
def merge(qt: QTensor, ad: LoRA, *, warn_below: float | None = 0.5, chunk_rows: int | None = None,
          backend="native"):
    """Merge ``ad`` into ``qt`` -> (merged QTensor, MergeReport).

    merged = quantize(merge_target(qt, ad)) in qt's format with qt's parameters (group, sym,
    double_quant), computed ``chunk_rows`` rows at a time (default: about 2M weights per chunk);
    the bytes are identical to quantizing the whole target at once. ``qt`` is not modified.

    Warns (UserWarning) when report.retained < warn_below, or when report.rel_error > 1 / warn_below
    (None: never). The second case catches formats whose requantization is not idempotent
    (quantize(dequantize(W)) != W, e.g. iq4_nl's scale search or symmetric int4): there the weights
    move by more than the adapter's change even for a zero delta, whatever ``retained`` says."""
    _no_perm(qt, "pyqkern.lora.merge")
    _check_pair(qt, ad)
    n, k = qt.shape
    fmt, params = qt.format, dict(qt.params)
    step = _check_chunk(chunk_rows, max(1, _CHUNK_ELEMS // k))
    rows = _Rows(qt, backend)
    factor = ad.dora_factor(qt) if ad.is_dora else None
    dq = fmt in _formats.BNB4 and bool(params.get("double_quant"))
    rq, rs, rz = _formats.row_bytes(fmt, k, params)
    data = np.empty(n * (rq + rs + rz), np.uint8)
    secs = [data[: n * rq].reshape(n, rq), data[n * rq: n * (rq + rs)].reshape(n, rs),
            data[n * (rq + rs):].reshape(n, rz)]
    stats = _Stats(n)
    over, n_over = None, 0  # the first row whose merged weights overflow the format's fp16 scales
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        w = rows.dequantize(r0, r1)
        tgt, intended = _target(w, delta(ad, r0, r1), None if factor is None else factor[r0:r1])
        part = quantize(tgt, fmt, group=rows.group, sym=rows.sym, backend=backend,  # row-local: no double quant
                        _range_check=False)
        big = _ops.scale_range_rows(part, tgt)  # checked here to name the row of the whole weight
        if big.any():
            i = int(np.argmax(big))
            over = over or (r0 + i, float(np.abs(tgt[i]).max()))
            n_over += int(big.sum())
        for dst, src in zip(secs, part.sections()):
            if dst.shape[1]:
                dst[r0:r1] = src
        if not dq:  # the chunk dequantizes exactly as the final rows do
            stats.add(r0, r1, dequantize(part, backend=backend).astype(np.float64) - w, intended)
    if not dq:
        merged = QTensor(fmt, (n, k), data, params)
    else:  # double quantization compresses the absmax of the whole tensor: do it once, then measure
        merged = _qtensor.assemble(fmt, n, k, params, secs[0], secs[1], None)
        mrows = _Rows(merged, backend)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            w = rows.dequantize(r0, r1)
            _, intended = _target(w, delta(ad, r0, r1), None if factor is None else factor[r0:r1])
            stats.add(r0, r1, mrows.dequantize(r0, r1).astype(np.float64) - w, intended)
    if over is not None:
        _ops.warn_scale_range(fmt, over[0], n_over, over[1], stacklevel=3)
    rep = stats.report(fmt, ad.is_dora, qt, merged)
    if warn_below is not None and rep.delta_norm == 0 and rep.applied_norm > 0:
        warnings.warn(f"the adapter asks for no change, but requantization to {fmt} moved the weights (norm "
                      f"{rep.applied_norm:.3g}): quantize(dequantize(W)) is not W in this format; keep the "
                      "base as it is", UserWarning, stacklevel=2)
    elif warn_below is not None and rep.delta_norm > 0 and (rep.retained < warn_below
                                                            or rep.rel_error * warn_below > 1):
        kept = "none" if np.isnan(rep.retained) else f"{rep.retained:.1%}"  # NaN: the merged weights overflowed
        warnings.warn(f"merging destroyed most of the fine-tune: retained {kept} of the adapter's "
                      f"change after requantization to {fmt}, relative error {rep.rel_error:.3g}; keep the "
                      "adapter separate (pq.matmul(..., lora=...)) or merge into a higher-precision format",
                      UserWarning, stacklevel=2)
    return merged, rep


def unmerge(qt_merged: QTensor, report: MergeReport) -> QTensor:
    """The original QTensor of ``merge`` (the same object, bytes verified), given the merged one.

    Exact because the report kept the original: requantized weights cannot be inverted.
    ValueError if ``qt_merged`` is not the tensor this report's merge produced, or if the original's
    bytes were modified since."""
    if not isinstance(report, MergeReport):
        raise TypeError(f"expected a MergeReport, got {type(report).__name__}")
    if not isinstance(qt_merged, QTensor):
        raise TypeError(f"expected a QTensor, got {type(qt_merged).__name__}")
    base = report.base
    if (qt_merged.format != base.format or qt_merged.shape != base.shape or qt_merged.params != base.params
            or _digest(qt_merged) != report._merged_digest):
        raise ValueError("this QTensor is not the one this report's merge produced (format, shape, parameters "
                         "or bytes differ)")
    if _digest(base) != report._base_digest:
        raise ValueError("the original QTensor's bytes were modified after the merge; cannot restore them")
    return base


# --------------------------------------------------------------------------- backward
def _act(a, what):
    """x / dy as matmul takes x (numpy or a CPU torch tensor, float32, float16 or bfloat16) ->
    float32 of the same shape."""
    a2, lead = _x_rows(a, None, what)
    return a2.reshape(*lead, a2.shape[1])


def _dy_w(d2, rows, n, k, step):
    dx = np.zeros((d2.shape[0], k), np.float32)
    for r0 in range(0, n, step):  # fixed order: deterministic
        r1 = min(n, r0 + step)
        dx += d2[:, r0:r1] @ rows.dequantize(r0, r1)
    return dx


def backward_base(dy, qt: QTensor, *, chunk_rows: int = 256, backend="native") -> np.ndarray:
    """dy @ W for the frozen quantized W [N, K]: dy [..., N] -> [..., K] float32.

    W is dequantized ``chunk_rows`` rows at a time and the partial products are accumulated in
    float32 in row order; the whole dequantized W is never held."""
    if not isinstance(qt, QTensor):
        raise TypeError(f"expected a QTensor, got {type(qt).__name__}")
    _no_perm(qt, "pyqkern.lora.backward_base")
    step = _check_chunk(chunk_rows, 256)
    n, k = qt.shape
    dy = _act(dy, "dy")
    if dy.shape[-1] != n:
        raise ValueError(f"dy has last dimension {dy.shape[-1]} but the weight has N={n} output rows")
    lead = dy.shape[:-1]
    return _dy_w(dy.reshape(-1, n), _Rows(qt, backend), n, k, step).reshape(*lead, k)


def backward(x, dy, qt: QTensor, ad: LoRA, *, chunk_rows: int = 256, backend="native"):
    """Gradients of y = x @ W.T + s * (x @ A.T) @ B.T (W frozen, quantized) -> (dx, dA, dB).

    x [..., K], dy [..., N] (same leading dims; float32, float16 or bfloat16), all results float32:
        t = x@A.T;  dB = s * dy.T @ t;  dt = s * dy @ B;  dA = dt.T @ x;  dx = dy @ W + dt @ A
    with dy @ W computed as in ``backward_base`` (row chunks of W, never the whole dequantized W).
    DoRA adapters raise NotImplementedError."""
    _no_perm(qt, "pyqkern.lora.backward")
    _check_pair(qt, ad)
    if ad.is_dora:
        raise NotImplementedError("DoRA backward (magnitude gradient and the per-row norm rescale) is not "
                                  "implemented; pyqkern.lora.backward handles plain LoRA adapters")
    step = _check_chunk(chunk_rows, 256)
    n, k = qt.shape
    x = _act(x, "x")
    dy = _act(dy, "dy")
    if x.shape[-1] != k:
        raise ValueError(f"x has last dimension {x.shape[-1]} but the weight has K={k} input features")
    if dy.shape[-1] != n:
        raise ValueError(f"dy has last dimension {dy.shape[-1]} but the weight has N={n} output rows")
    if x.shape[:-1] != dy.shape[:-1]:
        raise ValueError(f"x {x.shape} and dy {dy.shape} must have the same leading dimensions")
    lead = x.shape[:-1]
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    s = np.float32(ad.scale)
    t = x2 @ ad.A.T                      # [M, r]
    dB = (dy2.T @ t) * s                 # [N, r]
    dt = (dy2 @ ad.B) * s                # [M, r]
    dA = dt.T @ x2                       # [r, K]
    dx = _dy_w(dy2, _Rows(qt, backend), n, k, step)
    dx += dt @ ad.A
    return dx.reshape(*lead, k), np.ascontiguousarray(dA, np.float32), np.ascontiguousarray(dB, np.float32)
