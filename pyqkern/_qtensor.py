"""QTensor: a quantized [N, K] weight (rows = output channels, K = input features)."""
from __future__ import annotations

import numpy as np

from . import _formats
from . import _nf4_double


class QTensor:
    """Quantized weight. ``data`` holds the canonical bytes (see :mod:`pyqkern._formats`);
    for ggml formats they are exactly the ggml block bytes, row after row."""

    __slots__ = ("format", "shape", "params", "data", "_sections", "_packed", "perm", "__weakref__")

    def __init__(self, fmt: str, shape, data: np.ndarray, params: dict):
        n, k = (int(shape[0]), int(shape[1]))
        if n <= 0 or k <= 0:  # every constructor path (converters too): an empty weight is an error
            raise ValueError(f"{fmt}: shape must be positive, got {(n, k)}")
        # the public constructor checks what from_bytes does (a review: too long data was taken and
        # misreported nbytes; too short, params={} or bytes failed inside NumPy)
        if not isinstance(fmt, str) or fmt not in _formats.FORMATS:
            raise ValueError(f"unknown format {fmt!r}; supported: {', '.join(_formats.FORMATS)}")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
            raise TypeError("QTensor data must be a 1-D uint8 NumPy array of the canonical bytes "
                            "(QTensor.from_bytes wraps other buffers)")
        if isinstance(params, dict):
            # the values from_bytes accepts (a review: group 48 was taken, and the Numba matmul read
            # it as 32; group 0 divided by zero)
            g = params.get("group")
            if fmt in _formats.GROUPED and g is not None and not isinstance(g, bool) and g == 0:
                raise ValueError(f"{fmt}: group 0 is not a group size (QTensor.from_bytes and pq.quantize "
                                 "fill in the default)")
            canon = _formats.resolve_params(fmt, k, g, params.get("sym"), params.get("double_quant", False))
            if params.get("group", canon["group"]) != canon["group"]:
                raise ValueError(f"{fmt}: group {params['group']!r} is not a group size (QTensor.from_bytes "
                                 "and pq.quantize fill in the default)")
        try:
            need = total_bytes(fmt, n, k, params)
        except (KeyError, TypeError):
            raise ValueError(f"{fmt}: params {params!r} lack the format's parameters; QTensor.from_bytes "
                             "and pq.quantize fill them in") from None
        if data.size != need:
            raise ValueError(f"{fmt} {n}x{k}: data has {data.size} bytes, expected {need}")
        if not data.flags.c_contiguous:  # a strided view (sections are reinterpreted in place)
            data = np.ascontiguousarray(data)
        self.format = fmt
        self.shape = (n, k)
        self.params = dict(params)
        self.data = data
        self._sections = _split(fmt, n, k, self.params, data)
        self._packed = None  # int8-kernel layout, made by the first matmul (see release_packed)
        # Optional input-channel permutation (GPTQ act-order): the stored weight is W[:, perm],
        # whose groups run in order; dequantize() returns W in the original column order and
        # matmul() reads x[..., perm]. None: the identity.
        self.perm = None

    # -- sizes
    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def bits_per_weight(self) -> float:
        n, k = self.shape
        return self.nbytes * 8.0 / (n * k)

    @property
    def group(self) -> int:
        return self.params.get("group", 0)

    @property
    def sym(self) -> bool:
        return bool(self.params.get("sym", 0))

    def with_perm(self, perm) -> "QTensor":
        """This weight with input-channel permutation perm (int [K], a permutation of 0..K-1): the
        stored columns are W[:, perm]. Returns a new QTensor sharing the bytes."""
        k = self.shape[1]
        p = np.asarray(perm)
        if p.dtype.kind not in "iu" or p.shape != (k,):
            raise ValueError(f"perm must be an integer array of shape ({k},)")
        # its own read-only copy, checked after copying: a caller changing its array later
        # changed the weight's columns unchecked (review)
        p = np.array(p, dtype=np.int64)
        if not np.array_equal(np.sort(p), np.arange(k)):
            raise ValueError("perm is not a permutation of 0..K-1")
        p.flags.writeable = False
        out = QTensor(self.format, self.shape, self.data, self.params)
        out.perm = None if np.array_equal(p, np.arange(k)) else p
        return out

    # pickle / deepcopy: the packed copy is a native object (not picklable; made again on first
    # use) and the sections are views of data (rebuilt, so they stay views of the copy's bytes)
    def __getstate__(self):
        return {"format": self.format, "shape": self.shape, "params": self.params, "data": self.data,
                "perm": self.perm}

    def __setstate__(self, state):
        # through the checks of the constructor and with_perm (a pickle is input too; a review: the
        # copy's perm was writeable, and an edit to it gave wrong products silently)
        qt = QTensor(state["format"], state["shape"], state["data"], state["params"])
        if state.get("perm") is not None:
            qt = qt.with_perm(state["perm"])
        for key in ("format", "shape", "params", "data", "_sections", "_packed", "perm"):
            object.__setattr__(self, key, getattr(qt, key))

    def release_packed(self) -> None:
        """Drop the cached int8-kernel layout that pyqkern.matmul made (QLinear keeps its own)."""
        self._packed = None

    def sections(self):
        """(q, s, z) uint8 arrays [N, rq], [N, rs], [N, rz] as the kernels take them.

        nf4 / fp4 with double quantization return a freshly decompressed fp32 absmax as ``s``."""
        q, s, z = self._sections["q"], self._sections.get("s"), self._sections.get("z")
        if self.format in _formats.BNB4 and self.params.get("double_quant"):
            d = self._sections
            absmax = _nf4_double.decompress(d["absmax_codes"], d["nested_absmax"], d["offset"][0], d["code_map"])
            s = absmax.reshape(self.shape[0], -1).view(np.uint8)
        n = self.shape[0]
        empty = np.zeros((n, 0), np.uint8)
        return q, (s if s is not None else empty), (z if z is not None else empty)

    @classmethod
    def from_bytes(cls, fmt: str, shape, buf, *, group=None, sym=None, double_quant=False) -> "QTensor":
        """Wrap canonical bytes (zero-copy for a contiguous buffer). Raises ValueError if the
        length does not match the format and shape. The bytes are taken as fixed: what is derived
        from them once (the int8 kernels' packed copy, DoRA row norms) is not redone if the buffer
        changes in place afterwards; wrap the changed bytes in a new QTensor."""
        try:
            if isinstance(shape, (str, bytes)) or len(shape) != 2 or not all(
                    isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in shape):
                raise TypeError  # 4.7 was taken as 4 and "42" as (4, 2)
            n, k = (int(v) for v in shape)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
            raise ValueError(f"shape must be (N, K) integers, got {shape!r}") from None
        if n <= 0 or k <= 0:
            raise ValueError(f"shape must be positive, got {(n, k)}")
        if not isinstance(fmt, str):
            raise TypeError(f"fmt must be a format name (str), got {type(fmt).__name__}")
        params = _formats.resolve_params(fmt, k, group, sym, double_quant)
        try:
            data = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
        except TypeError:
            raise TypeError(f"buf must be bytes-like or a NumPy array, got {type(buf).__name__}") from None
        if data.dtype.hasobject:
            raise TypeError(f"buf must hold bytes, got a NumPy array of dtype {data.dtype}")
        if data.dtype != np.uint8:
            data = data.view(np.uint8) if data.flags.c_contiguous else np.ascontiguousarray(data).view(np.uint8)
        data = np.ascontiguousarray(data.reshape(-1))  # a strided buffer copied (zero-copy otherwise)
        need = total_bytes(fmt, n, k, params)
        if data.size != need:
            raise ValueError(f"{fmt} {n}x{k}: buffer has {data.size} bytes, expected {need}")
        return cls(fmt, (n, k), data, params)

    def __repr__(self):
        extra = ""
        if self.format in _formats.GROUPED:
            extra = f", group={self.group}" + (", sym" if self.sym else "") + (
                ", double_quant" if self.params.get("double_quant") else "")
        if self.perm is not None:
            extra += ", input-permuted"
        return (f"QTensor({self.format}, shape={self.shape}{extra}, "
                f"{self.nbytes} bytes, {self.bits_per_weight:.3f} bits/weight)")

    def __eq__(self, other):
        if not isinstance(other, QTensor):
            return False
        if (self.perm is None) != (other.perm is None):
            return False
        if self.perm is not None and not np.array_equal(self.perm, other.perm):
            return False
        return (self.format == other.format and self.shape == other.shape and self.params == other.params
                and np.array_equal(self.data, other.data))

    __hash__ = None


def _layout(fmt, n, k, params):
    """[(name, nbytes, row_shape_or_None)] in storage order."""
    rq, rs, rz = _formats.row_bytes(fmt, k, params)
    out = [("q", n * rq, rq)]
    if fmt in _formats.BNB4 and params.get("double_quant"):
        nblk = n * k // params["group"]
        nested = -(-nblk // _nf4_double.NESTED_BLOCK)
        out += [("absmax_codes", nblk, None), ("nested_absmax", 4 * nested, None), ("offset", 4, None),
                ("code_map", 4 * 256, None)]
        return out
    if rs:
        out.append(("s", n * rs, rs))
    if rz:
        out.append(("z", n * rz, rz))
    return out


def total_bytes(fmt, n, k, params) -> int:
    return sum(b for _, b, _ in _layout(fmt, n, k, params))


_F32_SECTIONS = {"nested_absmax", "offset", "code_map"}


def _split(fmt, n, k, params, data):
    out, off = {}, 0
    for name, nb, row in _layout(fmt, n, k, params):
        part = data[off:off + nb]
        off += nb
        if row is not None:
            part = part.reshape(n, row)
        elif name in _F32_SECTIONS:
            part = part.view(np.float32) if part.ctypes.data % 4 == 0 else part.copy().view(np.float32)
        out[name] = part
    return out


def assemble(fmt, n, k, params, q, s, z) -> QTensor:
    """Build a QTensor from kernel outputs (q, s, z row arrays)."""
    if fmt in _formats.BNB4 and params.get("double_quant"):
        codes, nested, offset, cmap = _nf4_double.compress(np.ascontiguousarray(s).view(np.float32))
        parts = [q.ravel(), codes, nested.view(np.uint8), np.array([offset], np.float32).view(np.uint8),
                 cmap.view(np.uint8)]
    else:
        parts = [a.ravel() for a in (q, s, z) if a is not None and a.size]
    data = np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0]).ravel()
    return QTensor(fmt, (n, k), data, params)
