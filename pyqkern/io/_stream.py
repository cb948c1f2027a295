"""Tensor-at-a-time file access for ``pyqkern quantize`` (peak memory ~ one tensor, not the model).

* :class:`ShardReader` reads one tensor of a safetensors file into a fresh array with a plain
  ``readinto`` (no memory map: mapped pages would count towards the process's resident memory
  until the map is dropped). The header is validated by :func:`pyqkern.io.safetensors.read_header`
  before anything is read. BF16 tensors come back as their uint16 bits.
* :class:`QSaveStreamWriter` writes pyqkern's QTensor safetensors layout (:mod:`pyqkern.io.qsave`)
  tensor by tensor: every tensor's byte size is known from its format, shape and parameters, so
  the header (the same bytes :func:`pyqkern.io.qsave.save` would write) goes out first.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from .. import _qtensor
from . import qsave, safetensors as _st

__all__ = ["ShardReader", "QSaveStreamWriter"]


class ShardReader:
    """One safetensors file, read a tensor at a time. ``entries``: the validated header
    {name: {"dtype", "shape", "data_offsets"}}; ``metadata``: its ``__metadata__``."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.entries, self.metadata = _st.read_header(self.path)
        self._f = open(self.path, "rb", buffering=0)  # reads go straight into the arrays
        try:
            (n,) = struct.unpack("<Q", self._f.read(8))
        except BaseException:
            self._f.close()
            raise
        self._base = 8 + n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None

    def read(self, name) -> np.ndarray:
        """The tensor as a fresh, writable array of its dtype (BF16: uint16 bits)."""
        e = self.entries[name]
        b, end = e["data_offsets"]
        dt = _st.DTYPES[e["dtype"]]
        buf = np.empty(end - b, np.uint8)
        self._f.seek(self._base + b)
        mv, got = memoryview(buf), 0
        while got < buf.size:
            r = self._f.readinto(mv[got:])
            if not r:
                raise ValueError(f"{self.path}: tensor {name!r}: file ends after {got} of its {buf.size} bytes")
            got += r
        arr = buf.view(dt).reshape(e["shape"])
        if e["dtype"] == "BOOL" and buf.size and int(buf.max()) > 1:
            raise ValueError(f"{self.path}: tensor {name!r}: BOOL data holds bytes other than 0 and 1")
        return arr


class QSaveStreamWriter:
    """Stream a pyqkern-layout safetensors file (QTensors + plain arrays).

    ``plan``: in any order, entries ``("q", name, fmt, (N, K), params, perm)`` for QTensors (``params``
    as :func:`pyqkern._formats.resolve_params` returns them, ``perm`` True if the tensor may carry an
    input permutation) and ``("a", name, dtype name, shape)`` for plain arrays. ``metadata``: the
    caller's str -> str metadata. ``bf16`` arrays are declared with dtype name "BF16" and written as
    uint16 bits. A planned permutation that turns out to be absent (e.g. GPTQ act-order found the
    identity order) is dropped at :meth:`finish`, which then rewrites the file once."""

    def __init__(self, path, plan, metadata=None):
        meta = dict(metadata or {})
        if qsave.META_KEY in meta:
            raise ValueError(f"metadata key {qsave.META_KEY!r} is reserved")
        self._user_meta = meta
        specs, self._desc, self._q = [], {}, {}
        for entry in plan:
            kind, name = entry[0], entry[1]
            if not isinstance(name, str) or not name:
                raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
            if name.endswith(qsave.PERM_SUFFIX):
                raise ValueError(f"tensor name {name!r}: the suffix {qsave.PERM_SUFFIX!r} is reserved")
            if kind == "q":
                _, _, fmt, shape, params, perm = entry
                n, k = (int(v) for v in shape)
                nbytes = _qtensor.total_bytes(fmt, n, k, params)
                specs.append((name, "U8", (nbytes,)))
                d = {"format": fmt, "shape": [n, k], "params": dict(params)}
                if perm:
                    d["perm"] = name + qsave.PERM_SUFFIX
                    specs.append((name + qsave.PERM_SUFFIX, "I64", (k,)))
                self._desc[name] = d
                self._q[name] = (fmt, (n, k), dict(params), bool(perm))
            elif kind == "a":
                _, _, dtn, shape = entry
                specs.append((name, dtn, tuple(shape)))
            else:
                raise ValueError(f"unknown plan entry kind {kind!r}")
        self._w = _st.StreamWriter(path, specs, self._metadata())
        self.path = self._w.path

    def _metadata(self):
        meta = dict(self._user_meta)
        if self._desc:
            meta[qsave.META_KEY] = json.dumps({"version": qsave._VERSION, "tensors": self._desc},
                                              separators=(",", ":"), sort_keys=True)
        return meta or None

    def write_qtensor(self, name, qt) -> None:
        if name not in self._q:
            raise ValueError(f"tensor {name!r} was not planned as a QTensor")
        fmt, shape, params, perm = self._q[name]
        if (qt.format, tuple(qt.shape), dict(qt.params)) != (fmt, shape, params):
            raise ValueError(f"tensor {name!r}: planned {fmt} {list(shape)} {params}, got {qt.format} "
                             f"{list(qt.shape)} {qt.params}")
        if qt.perm is not None and not perm:
            raise ValueError(f"tensor {name!r} carries an input permutation that was not planned")
        self._w.write(name, np.ascontiguousarray(qt.data).reshape(-1))
        if perm:
            if qt.perm is None:
                self._w.drop(name + qsave.PERM_SUFFIX)
                del self._desc[name]["perm"]
            else:
                self._w.write(name + qsave.PERM_SUFFIX, np.ascontiguousarray(qt.perm, dtype=np.int64))

    def write_array(self, name, arr) -> None:
        if name in self._q:
            raise ValueError(f"tensor {name!r} was planned as a QTensor")
        self._w.write(name, arr)

    def finish(self) -> None:
        self._w.finish(metadata=self._metadata() or {})

    def abort(self) -> None:
        self._w.abort()

