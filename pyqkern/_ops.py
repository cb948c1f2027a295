"""quantize / dequantize on the three backends ("native", "numba", "reference")."""
from __future__ import annotations

import warnings

import numpy as np

from . import _formats, _qtensor, reference
from ._qtensor import QTensor

BACKENDS = ("native", "numba", "reference")

try:
    import ml_dtypes as _ml_dtypes

    _BF16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # ml_dtypes is optional: bf16 may also come as raw uint16
    _BF16 = None


_NATIVE = None


def _native():
    """The compiled extension, imported on first use (an import statement costs ~0.5 us per call)."""
    global _NATIVE
    if _NATIVE is None:
        from . import _native as n

        _NATIVE = n
    return _NATIVE


def isa_id(isa) -> int:
    """'avx2' -> its id; None -> -1 (the active variant)."""
    if isa is None:
        return -1
    nat = _native()
    names = nat.isa_names()
    if isa not in names:
        raise ValueError(f"unknown variant {isa!r}; variants are named {names}")
    i = names.index(isa)
    if not nat.isa_compiled(i):  # a known name this build leaves out (neon on x86): the same error type
        raise ValueError(f"variant {isa!r} is not compiled into this build (compiled: "
                         f"{[v for j, v in enumerate(names) if nat.isa_compiled(j)]})")
    return i


def as_float32_2d(w, what="w", bf16_uint16=True, allow_empty=False) -> np.ndarray:
    """float32/float16/bfloat16 (ml_dtypes, or uint16 holding bf16 bits) 2-D -> float32 2-D.
    Keeps a row-strided float32 array as it is (the kernels take a row stride). allow_empty:
    zero rows are fine (activations); an empty weight is an error."""
    if hasattr(w, "detach") and hasattr(w, "numpy"):  # a torch tensor on the CPU
        import torch  # noqa: F401 - only reached when torch is present

        if w.dtype == torch.bfloat16:
            w = w.detach().contiguous().view(torch.int16).numpy().view(np.uint16)
        else:
            w = w.detach().numpy()
    if not isinstance(w, np.ndarray):
        raise TypeError(f"{what} must be a numpy array (float32, float16 or bfloat16), got {type(w).__name__}")
    if w.ndim != 2:
        raise ValueError(f"{what} must be 2-D [N, K], got shape {w.shape}")
    if w.shape[1] == 0 or (w.shape[0] == 0 and not allow_empty):
        raise ValueError(f"{what} is empty (shape {w.shape})")
    dt = w.dtype
    if dt == np.float32:
        if w.shape[0] and (w.strides[1] != 4 or w.strides[0] % 4 or w.strides[0] < 4 * w.shape[1]
                           or not w.flags.aligned):  # an odd address (a view into bytes): copied
            w = np.array(w, order="C")
        return w
    if dt == np.float64:
        raise TypeError(f"{what} is float64; pass float32, float16 or bfloat16 (convert explicitly)")
    if dt == np.float16:
        return np.ascontiguousarray(w, dtype=np.float32)  # astype would keep a transposed layout
    if (_BF16 is not None and dt == _BF16) or (bf16_uint16 and dt == np.uint16):
        bits = np.ascontiguousarray(w).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    raise TypeError(f"{what} has dtype {dt}; expected float32, float16 or bfloat16")


def _check_finite_weights(x, fmt):
    """ValueError naming the first row with NaN/Inf (the native kernels check the same per row)."""
    if not np.isfinite(x).all():
        bad = int(np.argmax(~np.isfinite(x).all(axis=1)))
        raise ValueError(f"{fmt}: weights contain NaN or Inf (row {bad})")


# byte offsets of the fp16 fields (d, and dmin / m) in the ggml formats' blocks
_F16_FIELDS = {"q4_0": (0,), "q4_1": (0, 2), "q8_0": (0,), "iq4_nl": (0,), "q4_k": (0, 2), "q6_k": (208,)}


def _check_scale_range(qt: QTensor, x, stacklevel=4) -> None:
    """UserWarning naming the first row whose finite weights overflowed the format's fp16 scales
    (scale_range_rows)."""
    bad = scale_range_rows(qt, x)
    if bad.any():
        r = int(np.argmax(bad))
        warn_scale_range(qt.format, r, int(bad.sum()), float(np.abs(x[r]).max()), stacklevel)


def warn_scale_range(fmt, row, count, amax, stacklevel):
    # the first such row, and how many there are (a review: "row 3 (of 1)" read as a row count)
    rows = f"{count} row{'s' if count != 1 else ''} in all"
    warnings.warn(f"{fmt}: row {row} ({rows}): weights too large for the format's fp16 scales (|w| up to "
                  f"{amax:.4g}): stored as the format's origin stores them, which does not hold them "
                  "(dequantize: Inf / NaN or far off); scale them down, or use nf4, fp4 or int8 (fp32 scales)",
                  UserWarning, stacklevel=stacklevel)


def scale_range_rows(qt: QTensor, x) -> np.ndarray:
    """bool [N]: the rows whose finite weights x overflowed the format's fp16 scales:
    ggml's quantizers store Inf there (dequantize: Inf / NaN), or for q6_k / q4_k beyond ~2^64
    (their fp32 sums of squares overflow) all-zero fields; the GPTQ-style int2/3/4 quantizer
    clamps the scale to 65504 (weights off by up to their whole size). The bytes stay those the
    origin's quantizer writes (bit-exact); the warning says they do not hold these weights.
    nf4 / fp4 / int8 keep fp32 scales."""
    fmt, (n, k) = qt.format, qt.shape
    q, s, _ = qt.sections()
    bad = np.zeros(n, bool)
    if fmt in _F16_FIELDS:
        # the fp16 fields as strided uint16 views of the blocks (no copies: this runs on every
        # quantize), their magnitude bits, one max per row for Inf (0x7C00 and up)
        offs, per = _F16_FIELDS[fmt], _formats.FORMATS[fmt].block
        b = np.ascontiguousarray(q).reshape(n, k // per, -1)  # [rows, blocks, block bytes]
        mags = [b[:, :, o:o + 2].view(np.uint16)[:, :, 0] & np.uint16(0x7FFF) for o in offs]
        for mg in mags:
            bad |= mg.max(axis=1) >= 0x7C00
        # blocks stored as all zero: fine for zero (or tiny) weights, not for weights beyond fp16
        if min(int(mg.min()) for mg in mags) == 0:
            zero = mags[0] == 0
            for mg in mags[1:]:
                zero &= mg == 0
            rows, blks = np.nonzero(zero)
            if rows.size:
                big = np.abs(x.reshape(n, -1, per)[rows, blks]).max(axis=1) > 65504
                bad[rows[big]] = True
    elif fmt in _formats.INTN_BITS:
        # a stored 65504 may be the clamp: the fp32 scale (max - min) / maxq of those rows'
        # groups (0 inside the range, as the quantizer takes it) must round below fp16's Inf
        h = np.ascontiguousarray(s).view(np.uint16).reshape(n, -1)
        for r in np.flatnonzero(((h & 0x7FFF) == 0x7BFF).any(axis=1)):
            gs = k if qt.params["group"] == -1 else qt.params["group"]
            g = x[r].reshape(-1, gs)
            mn, mx = np.minimum(g.min(axis=1), 0), np.maximum(g.max(axis=1), 0)
            if qt.params["sym"]:
                mx = np.maximum(-mn, mx)
                mn = -mx
            maxq = (1 << _formats.INTN_BITS[fmt]) - 1
            with np.errstate(over="ignore"):  # mx - mn beyond float32: Inf, refused as it should be
                bad[r] = bool((((mx - mn) / np.float32(maxq)).astype(np.float32) >= 65520).any())
    return bad


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _backend_module(backend):
    if backend == "reference":
        return reference
    from . import numba_kernels

    return numba_kernels


def quantize(w, fmt: str, *, group=None, sym=None, double_quant=False, backend="native", isa=None,
             search=None, _range_check=True) -> QTensor:
    """Quantize a float weight [N, K] (rows = output channels) into ``fmt``.

    NaN or Inf in ``w`` raises ValueError (no format can carry it). ``isa`` picks one native
    variant by name (tests, benchmarks); default: the best one this CPU runs.

    ``search="mse"``: per block/group, try the format's scale (and range) shrunk by factors
    1, 0.99, ..., 0.21 and keep the one with the smallest sum |error|^2.4 (the GPTQ reference's
    ``mse`` option; :mod:`pyqkern._grid`). Formats int2/int3/int4/int8, q4_0, q4_1, q8_0,
    iq4_nl (its scale rule is a search already), nf4, fp4 (without double quantization); NumPy,
    about 80 passes over the weight."""
    _check_backend(backend)
    if not isinstance(fmt, str):
        raise TypeError(f"format must be a string, got {type(fmt).__name__}")
    x = as_float32_2d(w)
    n, k = x.shape
    params = _formats.resolve_params(fmt, k, group, sym, double_quant)
    if search is not None:
        if search != "mse":
            raise ValueError(f"search must be None or 'mse', got {search!r}")
        if double_quant:
            raise ValueError("search='mse' does not combine with double_quant")
        _check_finite_weights(x, fmt)
        if isa is not None or backend != "native":
            raise ValueError("search='mse' runs in NumPy: isa / backend do not apply")
        from . import _grid

        qt = _grid.quantize_search(x, fmt, params.get("group"), bool(params.get("sym")))
        if _range_check:  # (callers that quantize pieces check the whole themselves)
            _check_scale_range(qt, x)
        return qt
    if backend == "native":
        rq, rs, rz = _formats.row_bytes(fmt, k, params)
        dq = fmt in _formats.BNB4 and params.get("double_quant")
        data = np.empty(n * (rq + rs + rz), dtype=np.uint8)
        q = data[: n * rq].reshape(n, rq)
        s = data[n * rq: n * (rq + rs)].reshape(n, rs) if rs else None
        z = data[n * (rq + rs):].reshape(n, rz) if rz else None
        _native().quantize(isa_id(isa), _formats.FORMAT_IDS[fmt], x, params["group"], params["sym"], q, s, z)
        qt = QTensor(fmt, (n, k), data, params) if not dq else _qtensor.assemble(fmt, n, k, params, q, s, z)
        if _range_check:
            _check_scale_range(qt, x)
        return qt
    if isa is not None:
        raise ValueError("isa= applies to the native backend only")
    _check_finite_weights(x, fmt)
    mod = _backend_module(backend)
    fn = mod.QUANTIZE.get(fmt)
    if fn is None:
        raise NotImplementedError(f"{fmt}: quantize not available in the {backend} backend")
    q, s, z = fn(np.ascontiguousarray(x), params["group"], params["sym"])
    qt = _qtensor.assemble(fmt, n, k, params, q, s, z)
    if _range_check:
        _check_scale_range(qt, x)
    return qt


def dequantize(qt: QTensor, *, backend="native", isa=None) -> np.ndarray:
    """QTensor -> float32 [N, K]."""
    _check_backend(backend)
    if not isinstance(qt, QTensor):
        raise TypeError(f"expected a QTensor, got {type(qt).__name__}")
    n, k = qt.shape
    q, s, z = qt.sections()
    if backend == "native":
        y = np.empty((n, k), dtype=np.float32)
        _native().dequantize(isa_id(isa), _formats.FORMAT_IDS[qt.format], np.ascontiguousarray(q),
                             np.ascontiguousarray(s) if s.size else None, np.ascontiguousarray(z) if z.size else None,
                             n, k, qt.params["group"], qt.params["sym"], y)
        return _unpermute(y, qt.perm)
    if isa is not None:
        raise ValueError("isa= applies to the native backend only")
    fn = _backend_module(backend).DEQUANTIZE.get(qt.format)
    if fn is None:
        raise NotImplementedError(f"{qt.format}: dequantize not available in the {backend} backend")
    return _unpermute(fn(q, s, z, k, qt.params["group"], qt.params["sym"]), qt.perm)


def _unpermute(y, perm):
    """Columns of the stored (permuted) weight back to the original input-channel order."""
    if perm is None:
        return y
    out = np.empty_like(y)
    out[:, perm] = y
    return out
