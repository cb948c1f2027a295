"""pyqkern's own safetensors layout for QTensors of any format (``pyqkern.io.save`` / ``load``).

A QTensor named ``w`` is stored as one U8 tensor ``w`` holding its canonical bytes (see
:mod:`pyqkern._formats`); an input permutation, if set, as an I64 tensor ``w.__pyqkern_perm__``.
The file's ``__metadata__`` carries one key, ``"pyqkern.qtensors"``, a JSON object

    {"version": 1, "tensors": {"w": {"format": "int4", "shape": [N, K],
                                     "params": {"group": 128, "sym": 0}, "perm": "w.__pyqkern_perm__"}}}

Any other ``__metadata__`` key is the caller's metadata (str -> str) and round-trips. Tensors
not listed there are plain arrays and pass through. Loading validates the JSON and rebuilds
each QTensor with ``QTensor.from_bytes`` (which checks the byte length against format, shape
and params); the bytes are zero-copy views of the memory-mapped file. Any problem raises
ValueError naming the file.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .._formats import FORMATS
from .._qtensor import QTensor
from . import safetensors as _st

__all__ = ["save", "load", "META_KEY", "PERM_SUFFIX", "describe"]

META_KEY = "pyqkern.qtensors"
PERM_SUFFIX = ".__pyqkern_perm__"
_VERSION = 1
_PARAM_KEYS = {"group", "sym", "double_quant"}


def save(path, tensors: dict, metadata: dict | None = None, *, bf16=()):
    """Write QTensors (any format) and plain ndarrays to ``path`` in pyqkern's safetensors layout.
    ``bf16``: names of uint16 arrays holding bf16 bits (as in :func:`pyqkern.io.safetensors.save`)."""
    if not isinstance(tensors, dict):
        raise TypeError("tensors must be a dict name -> QTensor | ndarray")
    meta = dict(metadata or {})
    if META_KEY in meta:
        raise ValueError(f"metadata key {META_KEY!r} is reserved")
    flat, desc = {}, {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
        if name.endswith(PERM_SUFFIX):
            raise ValueError(f"tensor name {name!r}: the suffix {PERM_SUFFIX!r} is reserved")
        if isinstance(t, QTensor):
            d = {"format": t.format, "shape": list(t.shape), "params": dict(t.params)}
            flat[name] = np.ascontiguousarray(t.data).reshape(-1)
            if t.perm is not None:
                d["perm"] = name + PERM_SUFFIX
                flat[name + PERM_SUFFIX] = np.ascontiguousarray(t.perm, dtype=np.int64)
            desc[name] = d
        else:
            flat[name] = t
    if desc:
        meta[META_KEY] = json.dumps({"version": _VERSION, "tensors": desc}, separators=(",", ":"), sort_keys=True)
    _st.save(path, flat, meta or None, bf16=bf16)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _parse(path, raw):
    """{name: (format, (n, k), params, perm name or None)} from the JSON; raises ValueError."""
    _st.check_json_items(raw, f"{path}: {META_KEY}", arrays_per_object=1)  # an entry's shape; params is an object
    try:  # two equal keys: refused, as in the safetensors header (json keeps the last)
        doc = json.loads(raw, object_pairs_hook=_st.no_dup_keys)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: {META_KEY} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or type(doc.get("version")) is not int or doc.get("version") != _VERSION \
            or not isinstance(doc.get("tensors"), dict):
        raise ValueError(f"{path}: {META_KEY} must be an object with version {_VERSION} and a 'tensors' object")
    out = {}
    for name, d in doc["tensors"].items():
        where = f"{path}: QTensor {name!r}"
        if not isinstance(d, dict) or not {"format", "shape", "params"} <= set(d) or set(d) - {
                "format", "shape", "params", "perm"}:
            raise ValueError(f"{where}: entry needs format, shape, params (and optionally perm)")
        fmt, shape, params = d["format"], d["shape"], d["params"]
        if not isinstance(fmt, str) or fmt not in FORMATS:
            raise ValueError(f"{where}: unknown format {fmt!r}")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(v) and v > 0 for v in shape)):
            raise ValueError(f"{where}: shape must be [N, K] positive integers, got {shape!r}")
        if not isinstance(params, dict) or set(params) - _PARAM_KEYS or not all(
                isinstance(v, (int, bool)) for v in params.values()):
            raise ValueError(f"{where}: params must be an object with integer group/sym/double_quant, got {params!r}")
        perm = d.get("perm")
        if perm is not None and perm != name + PERM_SUFFIX:
            raise ValueError(f"{where}: perm must name {name + PERM_SUFFIX!r}, got {perm!r}")
        out[name] = (fmt, tuple(shape), params, perm)
    return out


def describe(meta: dict, path="<file>"):
    """The parsed QTensor entries of a pyqkern safetensors metadata dict ({} if none)."""
    raw = meta.get(META_KEY)
    return {} if raw is None else _parse(path, raw)


def load(path):
    """Read a file written by :func:`save` -> (dict name -> QTensor | ndarray, metadata).

    Plain safetensors files (no pyqkern metadata) load as ndarrays. Raises ValueError for any
    malformed file."""
    path = os.fspath(path)
    arrays, meta = _st.load(path)
    meta = dict(meta)
    desc = describe(meta, path)
    meta.pop(META_KEY, None)
    out = {}
    perms = set()
    for name, (fmt, shape, params, perm) in desc.items():
        where = f"{path}: QTensor {name!r}"
        buf = arrays.get(name)
        if buf is None or buf.dtype != np.uint8 or buf.ndim != 1:
            raise ValueError(f"{where}: needs a 1-D U8 tensor of that name")
        try:
            qt = QTensor.from_bytes(fmt, shape, buf, group=params.get("group"), sym=params.get("sym"),
                                    double_quant=bool(params.get("double_quant", False)))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if qt.params != params:
            raise ValueError(f"{where}: params {params!r} are not canonical for {fmt} (expected {qt.params!r})")
        if perm is not None:
            p = arrays.get(perm)
            if p is None or p.dtype != np.int64:
                raise ValueError(f"{where}: perm tensor {perm!r} missing or not I64")
            try:
                qt = qt.with_perm(p)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if qt.perm is None:
                raise ValueError(f"{where}: stored perm is the identity (save never writes one)")
            perms.add(perm)
        out[name] = qt
    for name, arr in arrays.items():
        if name in out or name in perms:
            continue
        if name.endswith(PERM_SUFFIX):
            raise ValueError(f"{path}: tensor {name!r} uses the reserved suffix but no QTensor refers to it")
        out[name] = arr
    return out, meta
