"""bitsandbytes NF4 (Linear4bit / Params4bit) <-> pyqkern nf4 QTensor.

bitsandbytes (formats.md section 2) flattens the [out, in] weight row-major, quantizes blocks of
``blocksize`` consecutive elements (fp32 absmax per block) and packs two codes per byte, first
element in the HIGH nibble: uint8 [(numel + 1) // 2, 1]. With double quantization
(compress_statistics) the absmax vector is stored as uint8 codes of the 8-bit dynamic map in
blocks of 256 (nested_absmax fp32 per 256, nested_quant_map, nested_offset = mean).

pyqkern nf4 uses exactly these bytes when K (= in) is a multiple of the blocksize: the blocks
then never cross rows and both the code bytes and the (nested) statistics are identical, so
conversion is lossless both ways. K not a multiple of the blocksize (blocks crossing rows) or a
nested blocksize other than 256 cannot be represented -> ValueError. FP4 is not supported.

Quant-state keys (QuantState.as_dict): absmax, quant_map, blocksize, quant_type, dtype, shape
and, nested, nested_absmax, nested_quant_map, nested_blocksize, nested_dtype, nested_offset. The
serialized form packs the non-tensor items as JSON bytes under ``quant_state.bitsandbytes__nf4``;
both forms are accepted (keys may carry a "<module>.weight." prefix).
"""
from __future__ import annotations

import json

import numpy as np

from .. import _formats
from .. import _nf4_double
from .._qtensor import QTensor
from ..reference import NF4_CODE

__all__ = ["from_bnb_nf4", "to_bnb_nf4"]

_PACKED_KEY = "quant_state.bitsandbytes__nf4"
_KNOWN = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "blocksize", "quant_type", "dtype",
          "shape", "nested_blocksize", "nested_dtype", "nested_offset")


def _normalize_state(qs: dict) -> dict:
    out = {}
    for key, v in qs.items():
        if key.endswith("quant_state.bitsandbytes__fp4"):
            raise NotImplementedError("bitsandbytes FP4 is not supported (NF4 only)")
        if key.endswith(_PACKED_KEY):
            raw = np.asarray(v, dtype=np.uint8).tobytes()
            try:
                out.update(json.loads(raw.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{key}: not a JSON-packed bitsandbytes quant state: {e}") from None
            out.setdefault("quant_type", "nf4")
            continue
        short = key
        for name in sorted(_KNOWN, key=len, reverse=True):
            if key == name or key.endswith("." + name):
                short = name
                break
        out[short] = v
    return out


def from_bnb_nf4(weight_uint8, quant_state: dict, shape=None) -> QTensor:
    """bitsandbytes NF4 weight + quant state -> nf4 QTensor [N, K] (lossless).

    shape: (out, in); defaults to the quant state's "shape"."""
    qs = _normalize_state(dict(quant_state))
    qtype = str(qs.get("quant_type", "nf4"))
    if qtype != "nf4":
        raise NotImplementedError(f"bitsandbytes quant_type {qtype!r}: only nf4 is supported")
    if shape is None:
        shape = qs.get("shape")
        if shape is None:
            raise ValueError("shape not given and not in the quant state")
    shape = tuple(int(v) for v in np.asarray(shape).reshape(-1))
    if len(shape) != 2:
        raise ValueError(f"shape must be (out, in), got {shape}")
    n, k = shape
    if "blocksize" not in qs:
        raise ValueError("quant state lacks 'blocksize'")
    bs = int(np.asarray(qs["blocksize"]).reshape(-1)[0])
    if k % bs:
        raise ValueError(f"in_features K={k} is not a multiple of the blocksize {bs}: bitsandbytes' flattened "
                         "blocks cross rows, which pyqkern nf4 (per-row blocks) cannot represent losslessly")
    w = np.asarray(weight_uint8)
    if w.dtype != np.uint8:
        raise ValueError(f"weight must be uint8 packed NF4 codes, got {w.dtype} (quant_storage other than "
                         "uint8: view it as uint8 first)")
    if w.size != (n * k + 1) // 2:
        raise ValueError(f"weight has {w.size} bytes, expected {(n * k + 1) // 2} for shape {shape}")
    qmap = qs.get("quant_map")
    if qmap is not None and not np.array_equal(np.asarray(qmap, np.float32).reshape(-1), NF4_CODE):
        raise ValueError("quant_map is not the standard NF4 code table")
    nested = "nested_absmax" in qs
    dq = bool(nested)
    params = _formats.resolve_params("nf4", k, bs, None, dq)
    nblk = n * k // bs
    absmax = np.asarray(qs.get("absmax"))
    if qs.get("absmax") is None:
        raise ValueError("quant state lacks 'absmax'")
    if absmax.size != nblk:
        raise ValueError(f"absmax has {absmax.size} entries, expected {nblk}")
    q = np.ascontiguousarray(w).reshape(-1)
    if not nested:
        if absmax.dtype != np.float32:
            raise ValueError(f"absmax must be float32, got {absmax.dtype}")
        data = np.concatenate([q, np.ascontiguousarray(absmax).reshape(-1).view(np.uint8)])
        return QTensor("nf4", (n, k), data, params)
    if absmax.dtype != np.uint8:
        raise ValueError(f"double-quantized absmax must be uint8 codes, got {absmax.dtype}")
    nbs = int(np.asarray(qs.get("nested_blocksize", _nf4_double.NESTED_BLOCK)).reshape(-1)[0])
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
    offset = np.float32(np.asarray(qs["nested_offset"], dtype=np.float64).reshape(-1)[0])
    data = np.concatenate([q, np.ascontiguousarray(absmax).reshape(-1), nested_absmax.reshape(-1).view(np.uint8),
                           np.array([offset], np.float32).view(np.uint8),
                           np.ascontiguousarray(cmap).reshape(-1).view(np.uint8)])
    return QTensor("nf4", (n, k), data, params)


def to_bnb_nf4(qt: QTensor, *, packed=False, dtype="float32"):
    """nf4 QTensor -> (weight uint8 [(N*K+1)//2, 1], quant state dict), lossless.

    packed=False: QuantState.as_dict()-style dict (numpy arrays and plain values).
    packed=True: the safetensors form (tensors only; non-tensor items JSON-packed under
    "quant_state.bitsandbytes__nf4"). dtype: the original weight dtype name bitsandbytes records."""
    if not isinstance(qt, QTensor) or qt.format != "nf4":
        raise ValueError(f"expected an nf4 QTensor, got {qt!r}")
    n, k = qt.shape
    sec = qt._sections
    weight = np.ascontiguousarray(sec["q"]).reshape(-1, 1).copy()
    state = {"quant_type": "nf4", "blocksize": int(qt.group), "quant_map": NF4_CODE.copy(),
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
    tensors[_PACKED_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8).copy()
    return weight, tensors
