"""bitsandbytes NF4 / FP4 (Linear4bit / Params4bit) <-> pyqkern nf4 / fp4 QTensor.

bitsandbytes flattens the [out, in] weight row-major, quantizes blocks of
``blocksize`` consecutive elements (fp32 absmax per block) and packs two codes per byte, first
element in the HIGH nibble: uint8 [(numel + 1) // 2, 1]. With double quantization
(compress_statistics) the absmax vector is stored as uint8 codes of the 8-bit dynamic map in
blocks of 256 (nested_absmax fp32 per 256, nested_quant_map, nested_offset = mean).

NF4 and FP4 differ only in the 16-entry code book (quant_map): NF4's is sorted, FP4's is in
bit-pattern order (bit 3 = sign, magnitudes {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12). pyqkern nf4 / fp4
use exactly these bytes when K (= in) is a multiple of the blocksize: the blocks then never cross
rows and both the code bytes and the (nested) statistics are identical, so conversion is lossless
both ways. K not a multiple of the blocksize (blocks crossing rows), a nested blocksize other than
256 or a quant_map other than the standard table cannot be represented -> ValueError.

Quant-state keys (QuantState.as_dict): absmax, quant_map, blocksize, quant_type, dtype, shape
and, nested, nested_absmax, nested_quant_map, nested_blocksize, nested_dtype, nested_offset. The
serialized form packs the non-tensor items as JSON bytes under ``quant_state.bitsandbytes__nf4``
(``__fp4`` for FP4); both forms are accepted (keys may carry a "<module>.weight." prefix).

API: :func:`from_bnb` / :func:`to_bnb` handle both quant types; :func:`from_bnb_nf4` /
:func:`to_bnb_nf4` are the NF4-only forms (they reject FP4).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np

from .. import _formats
from .. import _nf4_double
from .._qtensor import QTensor
from ..reference import FP4_CODE, NF4_CODE
from ._convert_common import check_finite_scales

__all__ = ["from_bnb", "to_bnb", "from_bnb_nf4", "to_bnb_nf4"]

_PACKED_PREFIX = "quant_state.bitsandbytes__"
_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
_KNOWN = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "blocksize", "quant_type", "dtype",
          "shape", "nested_blocksize", "nested_dtype", "nested_offset")


def _normalize_state(qs: dict) -> dict:
    if not isinstance(qs, Mapping):
        raise TypeError(f"quant_state must be a dict (bitsandbytes' QuantState.as_dict(packed=...) or the "
                        f"'<module>.weight.*' entries of a state dict), got {type(qs).__name__}")
    qs = dict(qs)
    out, prefix_of = {}, {}
    packed_type = None
    for key, v in qs.items():
        if not isinstance(key, str):
            raise TypeError(f"quant_state keys must be strings, got {type(key).__name__} {key!r}")
        qtype = next((t for t in _CODES if key.endswith(_PACKED_PREFIX + t)), None)
        if qtype is not None:
            if packed_type is not None:
                raise ValueError("quant state holds more than one packed 'quant_state.bitsandbytes__*' entry")
            packed_type = qtype
            try:
                raw = np.asarray(v, dtype=np.uint8).tobytes()
            except (TypeError, ValueError, OverflowError) as e:
                raise ValueError(f"{key}: the packed quant state must be uint8 bytes: {e}") from None
            try:
                meta = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{key}: not a JSON-packed bitsandbytes quant state: {type(e).__name__}: "
                                 f"{str(e)[:200]}") from None
            if not isinstance(meta, dict):
                raise ValueError(f"{key}: the packed quant state is not a JSON object")
            if str(meta.get("quant_type", qtype)) != qtype:
                raise ValueError(f"{key} says quant_type {meta.get('quant_type')!r}")
            out.update(meta)
            out["quant_type"] = qtype
            continue
        if _PACKED_PREFIX in key:
            raise ValueError(f"{key}: unknown bitsandbytes quant type (nf4 and fp4 are supported)")
        short = key
        for name in sorted(_KNOWN, key=len, reverse=True):
            if key == name or key.endswith("." + name):
                short = name
                break
        # one module's state: the same entry under two prefixes (two modules' states merged)
        # would otherwise let the later silently replace the earlier
        if short in out:
            raise ValueError(f"quant_state holds {short!r} twice ({prefix_of[short]!r} and {key!r}): pass one "
                             "module's state")
        prefix_of[short] = key
        out[short] = v
    return out


def _quant_type(qs: dict) -> str:
    """quant_type of a normalized state; without one, the quant_map tells (else ValueError)."""
    if "quant_type" in qs:
        qtype = str(qs["quant_type"])
        if qtype not in _CODES:
            raise ValueError(f"bitsandbytes quant_type {qtype!r} is not supported (nf4 and fp4 are)")
        return qtype
    qmap = qs.get("quant_map")
    if qmap is not None:
        m = np.asarray(qmap, np.float32).reshape(-1)
        for t, code in _CODES.items():
            if np.array_equal(m, code):
                return t
    raise ValueError("the quant state has no quant_type and no standard NF4/FP4 quant_map: cannot tell "
                     "whether it is nf4 or fp4")


def from_bnb(weight_uint8, quant_state: dict, shape=None) -> QTensor:
    """bitsandbytes NF4 or FP4 weight + quant state -> nf4 / fp4 QTensor [N, K] (lossless).

    quant_state: QuantState.as_dict() (packed or not; keys may carry a module prefix). The format
    comes from its quant_type (or the packed key's __nf4 / __fp4 suffix, or the quant_map).
    shape: (out, in); defaults to the quant state's "shape"."""
    qs = _normalize_state(quant_state)
    return _from_state(weight_uint8, qs, _quant_type(qs), shape)


def from_bnb_nf4(weight_uint8, quant_state: dict, shape=None) -> QTensor:
    """bitsandbytes NF4 weight + quant state -> nf4 QTensor [N, K] (lossless). Rejects FP4 states
    (ValueError; :func:`from_bnb` reads both). A state without quant_type is taken as NF4."""
    qs = _normalize_state(quant_state)
    qtype = str(qs.get("quant_type", "nf4"))
    if qtype != "nf4":
        raise ValueError(f"bitsandbytes quant_type {qtype!r}: from_bnb_nf4 reads nf4 only (use from_bnb)")
    return _from_state(weight_uint8, qs, "nf4", shape)


def _pos_ints(v, what, count):
    """count positive integers from a quant-state entry (a number, list or array), else ValueError."""
    a = np.asarray(v)
    bad = ValueError(f"{what} must be {count} positive integer{'s' if count > 1 else ''}, got {v!r}")
    if a.dtype.kind not in "iuf" or a.size != count:
        raise bad
    out = []
    for x in a.reshape(-1).tolist():  # Python ints and floats: exact (no float64 detour for ints >= 2^53)
        if isinstance(x, float):
            if not (math.isfinite(x) and x == int(x)):
                raise bad
            x = int(x)
        if not 1 <= x < 2 ** 62:
            raise bad
        out.append(x)
    return tuple(out)


def _from_state(weight_uint8, qs, fmt, shape) -> QTensor:
    code = _CODES[fmt]
    own = qs.get("shape")
    if own is not None:  # the quantized tensor's shape, any rank (quantize_4bit flattens it): as 2-D [rows, last]
        dims = _pos_ints(own, "the quant state's shape", max(1, np.asarray(own).size))
        own = (math.prod(dims[:-1]), dims[-1])  # Python ints: an int64 product wrapped (2^64 + 40 -> 40)
    if shape is None:
        if own is None:
            raise ValueError("shape not given and not in the quant state")
        shape = own
    shape = _pos_ints(shape, "shape (out, in)", 2)
    if own is not None and own != shape:
        raise ValueError(f"shape {shape} contradicts the quant state's shape (as 2-D: {own})")
    n, k = shape
    if "blocksize" not in qs:
        raise ValueError("quant state lacks 'blocksize'")
    bs, = _pos_ints(qs["blocksize"], "blocksize", 1)
    if k % bs:
        raise ValueError(f"in_features K={k} is not a multiple of the blocksize {bs}: bitsandbytes' flattened "
                         f"blocks cross rows, which pyqkern {fmt} (per-row blocks) cannot represent losslessly")
    w = np.asarray(weight_uint8)
    if w.dtype != np.uint8:
        raise ValueError(f"weight must be uint8 packed {fmt.upper()} codes, got {w.dtype} (quant_storage other "
                         "than uint8: view it as uint8 first)")
    if w.size != (n * k + 1) // 2:
        raise ValueError(f"weight has {w.size} bytes, expected {(n * k + 1) // 2} for shape {shape}")
    qmap = qs.get("quant_map")
    if qmap is not None and not np.array_equal(np.asarray(qmap, np.float32).reshape(-1), code):
        raise ValueError(f"quant_map is not the standard {fmt.upper()} code table")
    nested = "nested_absmax" in qs
    dq = bool(nested)
    params = _formats.resolve_params(fmt, k, bs, None, dq)
    nblk = n * k // bs
    absmax = np.asarray(qs.get("absmax"))
    if qs.get("absmax") is None:
        raise ValueError("quant state lacks 'absmax'")
    if absmax.size != nblk:
        raise ValueError(f"absmax has {absmax.size} entries, expected {nblk}")
    q = np.ascontiguousarray(w).reshape(-1)
    if not nested:
        if absmax.dtype != np.float32:
            raise ValueError(f"absmax must be float32, got {absmax.dtype}" + (
                " (uint8 absmax codes are double quantization, whose 'nested_absmax' the state lacks)"
                if absmax.dtype == np.uint8 else ""))
        check_finite_scales(absmax, "absmax")
        data = np.concatenate([q, np.ascontiguousarray(absmax).reshape(-1).view(np.uint8)])
        return QTensor(fmt, (n, k), data, params)
    if absmax.dtype != np.uint8:
        raise ValueError(f"double-quantized absmax must be uint8 codes, got {absmax.dtype}")
    nbs, = _pos_ints(qs.get("nested_blocksize", _nf4_double.NESTED_BLOCK), "nested_blocksize", 1)
    if nbs != _nf4_double.NESTED_BLOCK:
        raise ValueError(f"nested_blocksize {nbs} is not supported (only {_nf4_double.NESTED_BLOCK})")
    nested_absmax = np.asarray(qs["nested_absmax"])
    nn = -(-nblk // nbs)
    if nested_absmax.dtype != np.float32 or nested_absmax.size != nn:
        raise ValueError(f"nested_absmax must be float32 with {nn} entries, got {nested_absmax.dtype} "
                         f"{nested_absmax.shape}")
    if "nested_quant_map" not in qs or "nested_offset" not in qs:
        raise ValueError("double-quantized state needs nested_quant_map and nested_offset")
    cmap = np.asarray(qs["nested_quant_map"])
    if cmap.dtype != np.float32 or cmap.size != 256:
        raise ValueError(f"nested_quant_map must be float32 [256], got {cmap.dtype} {cmap.shape}")
    off = np.asarray(qs["nested_offset"])
    if off.dtype.kind not in "iuf" or off.size != 1:
        raise ValueError(f"nested_offset must be one number, got {qs['nested_offset']!r}")
    offset = np.float32(off.reshape(-1)[0])
    for what, v in (("nested_absmax", nested_absmax), ("nested_quant_map", cmap), ("nested_offset", offset)):
        check_finite_scales(v, what)
    data = np.concatenate([q, np.ascontiguousarray(absmax).reshape(-1), nested_absmax.reshape(-1).view(np.uint8),
                           np.array([offset], np.float32).view(np.uint8),
                           np.ascontiguousarray(cmap).reshape(-1).view(np.uint8)])
    return QTensor(fmt, (n, k), data, params)


def to_bnb(qt: QTensor, *, packed=False, dtype="float32"):
    """nf4 or fp4 QTensor -> (weight uint8 [(N*K+1)//2, 1], quant state dict), lossless.

    packed=False: QuantState.as_dict()-style dict (numpy arrays and plain values).
    packed=True: the safetensors form (tensors only; non-tensor items JSON-packed under
    "quant_state.bitsandbytes__nf4" / "__fp4"). dtype: the original weight dtype name bitsandbytes
    records. A QTensor with an input permutation raises ValueError (bitsandbytes has none)."""
    if not isinstance(qt, QTensor) or qt.format not in _CODES:
        raise ValueError(f"expected an nf4 or fp4 QTensor, got {qt!r}")
    return _to_state(qt, packed, dtype)


def to_bnb_nf4(qt: QTensor, *, packed=False, dtype="float32"):
    """nf4 QTensor -> (weight, quant state) as :func:`to_bnb`; any other format raises ValueError."""
    if not isinstance(qt, QTensor) or qt.format != "nf4":
        raise ValueError(f"expected an nf4 QTensor, got {qt!r}")
    return _to_state(qt, packed, dtype)


def _to_state(qt: QTensor, packed, dtype):
    if qt.perm is not None:
        raise ValueError("the QTensor has an input permutation, which bitsandbytes cannot store")
    fmt = qt.format
    n, k = qt.shape
    sec = qt._sections
    weight = np.ascontiguousarray(sec["q"]).reshape(-1, 1).copy()
    state = {"quant_type": fmt, "blocksize": int(qt.group), "quant_map": _CODES[fmt].copy(),
             "dtype": str(dtype), "shape": (n, k)}
    if qt.params.get("double_quant"):
        state["absmax"] = np.ascontiguousarray(sec["absmax_codes"]).copy()
        state["nested_absmax"] = np.asarray(sec["nested_absmax"], np.float32).copy()
        state["nested_quant_map"] = np.asarray(sec["code_map"], np.float32).copy()
        state["nested_blocksize"] = _nf4_double.NESTED_BLOCK
        state["nested_dtype"] = "float32"
        state["nested_offset"] = float(sec["offset"][0])
    else:
        state["absmax"] = np.ascontiguousarray(sec["s"]).view(np.float32).reshape(-1).copy()
    if not packed:
        return weight, state
    tensors = {key: v for key, v in state.items() if isinstance(v, np.ndarray)}
    meta = {key: (list(v) if isinstance(v, tuple) else v) for key, v in state.items() if not isinstance(v, np.ndarray)}
    tensors[_PACKED_PREFIX + fmt] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8).copy()
    return weight, tensors
