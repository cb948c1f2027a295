"""Read and write GGUF files (llama.cpp's model format) with the ``gguf`` package.

GGUF stores a tensor's dimensions ggml-style, fastest-varying first: ``ne0`` is the row length. A
pyqkern weight [N, K] (N rows of K inputs) is therefore listed in the file as dims (K, N); the
``gguf`` package reverses them to NumPy order (N, K) - :func:`load_gguf` and :func:`save_gguf`
do the same, so shapes round-trip as NumPy shapes.

``load_gguf(path)`` -> (tensors, metadata):

* ggml tensors of pyqkern's formats (Q4_0 Q4_1 Q8_0 Q4_K Q6_K IQ4_NL) with two dimensions become
  :class:`~pyqkern.QTensor` objects whose ``data`` is a zero-copy, read-only view of the memory map;
* F32 / F16 (and I8..I64, F64) become NumPy views; BF16 becomes a float32 copy (exact);
* anything else - other ggml types (Q5_K, IQ2_XXS, ...) and quantized tensors that are not 2-D -
  is governed by ``unsupported``: ``"warn"`` (default) returns the raw block bytes as a uint8
  array (shape [..., row bytes], as the ``gguf`` package's reader gives them) and emits one UserWarning naming the
  tensors and their types; ``"skip"`` leaves them out (with the warning); ``"raise"`` raises
  ValueError. Returning the raw bytes keeps a mixed-type file (e.g. a Q5_K_M model) loadable.
* metadata: the key/value fields as Python values (str, int, float, bool, lists); the
  ``GGUF.*`` pseudo-fields (version, counts) are not included.

Reading: the header is parsed here by a strict, bounds-checked parser, which also builds the
metadata values (the ``gguf`` package supplies the type tables and writes files). Its reader is
not used: it builds NumPy objects per array item (a llama-3-sized tokenizer: 7 s and 670 MB;
here 0.1 s and tens of MB), and it loops for ages on a forged array length or indexes past the
end. Every problem comes out as ValueError naming the file; headers of more than 2M keys,
tensors and array items in all are refused. Big-endian GGUF files are refused.
"""
from __future__ import annotations

import mmap
import os
import struct
import warnings

import numpy as np

from .._qtensor import QTensor

__all__ = ["load_gguf", "save_gguf", "GGML_TYPES", "read_gguf_info", "GGUFMetadata"]

#: pyqkern format -> ggml type name (GGMLQuantizationType member)
GGML_TYPES = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q8_0": "Q8_0", "q4_k": "Q4_K", "q6_k": "Q6_K", "iq4_nl": "IQ4_NL"}

_MAGIC = 0x46554747  # "GGUF" little-endian
# GGUF value types: id -> (struct code or None, size)
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<B", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_DEPTH = 4
# Keys, tensors and array items in all: every string item becomes a Python str (~60 bytes and
# up), so a few MB of hostile header must not become millions of objects. Real files stay well
# below: llama-3's tokenizer is ~0.54M items, Gemma 3's ~0.79M.
_MAX_ITEMS = 2_000_000
# tensors per file: the largest published GGUF models hold a few thousand; each loaded tensor costs
# ~1 KB of Python objects, so a small hostile file of a million one-byte tensors took ~1 GB (review)
_MAX_TENSORS = 1 << 17


class GGUFMetadata(dict):
    """The metadata dict load_gguf / read_gguf_info return: the values as Python objects, and
    ``types``: key -> (GGUF value type, item type for arrays else None) as the file stored them.
    save_gguf writes a key back with its recorded type while the value still fits it, so a file
    read and written again keeps u8 / i16 / u32 arrays / f64 where the plain rules (ints as UINT32
    or INT32, floats as FLOAT32) would change them."""

    def __init__(self, *a, types=None, **kw):
        super().__init__(*a, **kw)
        self.types = dict(types or {})


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency of the io extra
        raise ImportError("pyqkern.io GGUF support needs the 'gguf' package (pip install gguf)") from e
    return gguf


class _Where:
    """A place in the header for error messages (parent + suffix), spelled out only when an error
    is raised: building "value of 'key'[i]" for every array item copied the key each time, so a
    long key over many items took quadratic time (review: 1.6 MB of header, 7 s)."""
    __slots__ = ("parent", "suffix")

    def __init__(self, parent, suffix):
        self.parent, self.suffix = parent, suffix

    def __str__(self):
        return f"{self.parent}{self.suffix}"

    def __format__(self, spec):
        return format(str(self), spec)


class _Scan:
    """Strict walk over a GGUF header held in a buffer."""

    def __init__(self, buf, path):
        self.b, self.n, self.path, self.pos, self.items = buf, len(buf), path, 0, 0

    def count(self, n, what):
        self.items += n
        if self.items > _MAX_ITEMS:
            raise self.err(f"{what}: more than {_MAX_ITEMS} keys, tensors and array items in all (a GGUF "
                           "header this large is refused: reading it would take gigabytes of memory)")

    def err(self, msg):
        return ValueError(f"{self.path}: {msg}")

    def take(self, nbytes, what):
        if nbytes < 0 or self.pos + nbytes > self.n:
            raise self.err(f"truncated GGUF file: {what} at byte {self.pos} needs {nbytes} bytes, "
                           f"file has {self.n}")
        p = self.pos
        self.pos += nbytes
        return p

    def unpack(self, fmt, what):
        p = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.b, p)[0]

    def string(self, what):
        ln = self.unpack("<Q", _Where(what, " length"))
        p = self.take(ln, what)
        try:
            return bytes(self.b[p:p + ln]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.err(f"{what} at byte {p} is not valid UTF-8") from None

    def strings(self, count, what):
        """count strings (an array's items) as a list of str, without a Python call per item"""
        b, n, pos, out = self.b, self.n, self.pos, []
        for i in range(count):
            if pos + 8 > n:
                raise self.err(f"truncated GGUF file: {what}[{i}] length at byte {pos}, file has {n}")
            ln = struct.unpack_from("<Q", b, pos)[0]
            pos += 8
            if pos + ln > n:
                raise self.err(f"truncated GGUF file: {what}[{i}] at byte {pos} needs {ln} bytes, file has {n}")
            try:
                out.append(str(b[pos:pos + ln], "utf-8"))
            except UnicodeDecodeError:
                raise self.err(f"{what}[{i}] at byte {pos} is not valid UTF-8") from None
            pos += ln
        self.pos = pos
        return out

    def value(self, vtype, what, depth=0):
        """the value as Python objects: int / float / bool / str, lists for arrays (nested lists
        for arrays of arrays)"""
        if vtype in _SCALARS:
            fmt, _ = _SCALARS[vtype]
            v = self.unpack(fmt, what)
            if vtype == 7:
                if v > 1:
                    raise self.err(f"{what}: bool value {v}")
                return bool(v)
            return v
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth >= _MAX_DEPTH:
                raise self.err(f"{what}: arrays nested deeper than {_MAX_DEPTH}")
            itype = self.unpack("<I", _Where(what, " item type"))
            count = self.unpack("<Q", _Where(what, " item count"))
            self.count(count, what)
            if itype in _SCALARS:
                fmt, size = _SCALARS[itype]
                p = self.take(count * size, _Where(what, f" ({count} items)"))
                if itype == 7 and count and max(self.b[p:p + count]) > 1:
                    raise self.err(f"{what}: bool array holds values other than 0 and 1")
                dt = np.bool_ if itype == 7 else np.dtype(fmt)  # struct codes are NumPy dtype strings
                return np.frombuffer(self.b, dtype=dt, count=count, offset=p).tolist()
            if itype not in (_STRING, _ARRAY):
                raise self.err(f"{what}: unknown array item type {itype}")
            if count * 8 > self.n - self.pos:  # every item takes at least 8 bytes
                raise self.err(f"truncated GGUF file: {what} claims {count} items")
            if itype == _STRING:
                return self.strings(count, what)
            return [self.value(itype, _Where(what, f"[{i}]"), depth + 1) for i in range(count)]
        raise self.err(f"{what}: unknown value type {vtype}")


def _parse(path):
    """Validate and read the whole header of a GGUF file -> (metadata {key: value}, tensor infos
    [(name, ggml type id, dims fastest first, byte offset in the file, nbytes)]); ValueError."""
    gguf = _gguf()
    sizes = {t.value: v for t, v in gguf.GGML_QUANT_SIZES.items()}
    size = os.path.getsize(path)
    if size < 24:
        raise ValueError(f"{path}: {size} bytes is too short for a GGUF file (the fixed header is 24 bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        s = _Scan(memoryview(mm), path)
        try:
            if s.unpack("<I", "magic") != _MAGIC:
                raise s.err("not a GGUF file (bad magic)")
            version = s.unpack("<I", "version")
            if version not in (2, 3):
                if version & 0xFFFF == 0:
                    raise s.err("big-endian GGUF files are not supported")
                raise s.err(f"GGUF version {version} is not supported (2 and 3 are)")
            n_tensors = s.unpack("<Q", "tensor count")
            n_kv = s.unpack("<Q", "key/value count")
            if n_kv * 12 > size or n_tensors * 24 > size:
                raise s.err(f"truncated GGUF file: header claims {n_kv} key/values and {n_tensors} tensors")
            if n_tensors > _MAX_TENSORS:
                raise s.err(f"{n_tensors} tensors (more than {_MAX_TENSORS}): refused (loading them would take "
                            "about a kilobyte of memory each)")
            meta, types, alignment = {}, {}, 32
            s.count(n_kv + n_tensors, "header")
            for i in range(n_kv):
                key = s.string(f"key #{i}")
                if key in meta:
                    raise s.err(f"duplicate key {key!r}")
                vtype = s.unpack("<I", f"type of {key!r}")
                itype = None
                if vtype == _ARRAY and s.pos + 4 <= s.n:  # the item type, before value() reads it
                    itype = struct.unpack_from("<I", s.b, s.pos)[0]
                v = meta[key] = s.value(vtype, f"value of {key!r}")
                types[key] = (vtype, itype)
                if key == "general.alignment":
                    if vtype != 4 or v == 0 or v & (v - 1):
                        raise s.err(f"general.alignment must be a uint32 power of two, got {v!r}")
                    alignment = v
            infos, names = [], set()
            for i in range(n_tensors):
                name = s.string(f"tensor name #{i}")
                if name in names:
                    raise s.err(f"duplicate tensor name {name!r}")
                names.add(name)
                nd = s.unpack("<I", f"tensor {name!r} dimension count")
                if not 1 <= nd <= _MAX_DIMS:
                    raise s.err(f"tensor {name!r}: {nd} dimensions (1..{_MAX_DIMS} allowed)")
                dims = [s.unpack("<Q", f"tensor {name!r} dims") for _ in range(nd)]
                ttype = s.unpack("<I", f"tensor {name!r} type")
                off = s.unpack("<Q", f"tensor {name!r} offset")
                if ttype not in sizes:
                    raise s.err(f"tensor {name!r}: unknown ggml type {ttype}")
                if any(d == 0 for d in dims):
                    raise s.err(f"tensor {name!r}: zero dimension in {dims}")
                blk, tsz = sizes[ttype]
                if dims[0] % blk:
                    raise s.err(f"tensor {name!r}: row length {dims[0]} is not a multiple of the block size {blk}")
                nel = 1
                for d in dims:
                    nel *= d
                if nel >= 1 << 62:
                    raise s.err(f"tensor {name!r}: dims {dims} are too large")
                if off % alignment:
                    raise s.err(f"tensor {name!r}: offset {off} is not a multiple of the alignment {alignment}")
                infos.append((name, ttype, dims, off, nel // blk * tsz))
            start = s.pos + (-s.pos % alignment)
            for name, _, _, off, nb in infos:
                if start + off + nb > size:
                    raise s.err(f"truncated GGUF file: tensor {name!r} data [{off}, {off + nb}) runs past the end "
                                f"of the file (data area has {max(size - start, 0)} bytes)")
            # tensors share no bytes (ggml itself wants them back to back, in order; gaps are let be)
            by_off = sorted((off, nb, name) for name, _, _, off, nb in infos)
            for (o0, n0, a), (o1, _, b) in zip(by_off, by_off[1:]):
                if o0 + n0 > o1:
                    raise s.err(f"tensors {a!r} [{o0}, {o0 + n0}) and {b!r} (from {o1}) overlap")
        finally:
            s.b.release()
    meta = GGUFMetadata(meta, types=types)
    return meta, [(name, t, dims, start + off, nb) for name, t, dims, off, nb in infos]


def _open(path):
    """(metadata, tensor infos, the file as a read-only uint8 memory map or None)"""
    path = os.fspath(path)
    meta, infos = _parse(path)
    return meta, infos, (np.memmap(path, dtype=np.uint8, mode="r") if infos else None)


def _raw_shape(dims, ttype):
    """NumPy-order shape of a tensor's bytes: [..., bytes of one row]"""
    blk, tsz = _gguf().GGML_QUANT_SIZES[_gguf().GGMLQuantizationType(ttype)]
    return tuple(int(d) for d in reversed(dims[1:])) + (dims[0] // blk * tsz,)


def read_gguf_info(path):
    """[(name, ggml type name, NumPy-order shape, nbytes)] and the metadata, without building tensors."""
    meta, infos = _parse(os.fspath(path))
    T = _gguf().GGMLQuantizationType
    return [(name, T(t).name, tuple(int(d) for d in reversed(dims)), nb) for name, t, dims, _, nb in infos], meta


# ggml types NumPy holds as they are
_PLAIN = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}


def load_gguf(path, *, unsupported="warn"):
    """Read a GGUF file -> (dict name -> QTensor | ndarray, metadata dict). See the module docstring."""
    if unsupported not in ("warn", "skip", "raise"):
        raise ValueError(f"unsupported must be 'warn', 'skip' or 'raise', got {unsupported!r}")
    path = os.fspath(path)
    T = _gguf().GGMLQuantizationType
    ours = {getattr(T, v).value: k for k, v in GGML_TYPES.items()}
    meta, infos, mm = _open(path)
    out, odd = {}, []
    for name, t, dims, off, nb in infos:
        shape = tuple(int(d) for d in reversed(dims))
        data = mm[off:off + nb].view(np.ndarray)  # read-only, zero-copy
        tname = T(t).name
        try:
            if t in ours and len(shape) == 2:
                out[name] = QTensor.from_bytes(ours[t], shape, data)
            elif tname == "BF16":
                bits = data.view("<u2").astype(np.uint32) << 16
                out[name] = bits.view(np.float32).reshape(shape)
            elif tname in _PLAIN:
                out[name] = data.view(_PLAIN[tname]).reshape(shape)
            else:
                why = "not 2-D" if t in ours else "not a pyqkern format"
                odd.append(f"{name} ({tname}, {why})")
                if unsupported == "warn":
                    out[name] = data.reshape(_raw_shape(dims, t))
        except ValueError as e:
            raise ValueError(f"{path}: tensor {name!r}: {e}") from None
    if odd:
        msg = (f"{path}: {len(odd)} tensor(s) cannot be represented as QTensor/ndarray: "
               + ", ".join(odd[:8]) + (" ..." if len(odd) > 8 else ""))
        if unsupported == "raise":
            raise ValueError(msg)
        warnings.warn(msg + ("; returned as raw uint8 block bytes" if unsupported == "warn" else "; skipped"),
                      UserWarning, stacklevel=2)
    return out, meta


# ----------------------------------------------------------------------------------------- writing

def _ggml_type(qt):
    gguf = _gguf()
    if qt.format not in GGML_TYPES:
        raise ValueError(f"QTensor format {qt.format!r} is not a ggml format and cannot be stored in GGUF "
                         f"(GGUF holds {', '.join(GGML_TYPES)}); use pyqkern.io.save for pyqkern's safetensors layout")
    if qt.perm is not None:
        raise ValueError("a QTensor with an input permutation (perm) cannot be stored in GGUF; "
                         "use pyqkern.io.save")
    return getattr(gguf.GGMLQuantizationType, GGML_TYPES[qt.format])


# ggml's GGML_MAX_NAME, counting the terminating NUL: llama.cpp refuses a file with a longer name
_MAX_NAME_BYTES = 63


def _utf8(s, what):
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate
        raise ValueError(f"{what} {s[:80]!r} cannot be written as UTF-8: {e.reason}") from None


def _check_name(name):
    if not isinstance(name, str) or not name:
        raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
    nb = len(_utf8(name, "tensor name"))
    if nb > _MAX_NAME_BYTES:
        raise ValueError(f"tensor name {name!r} is {nb} bytes: GGUF readers (llama.cpp, "
                         f"ggml) accept at most {_MAX_NAME_BYTES}")


def _int_value(v):
    """An integer metadata value given as int or as a decimal string (safetensors metadata holds
    strings only), or None."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v)
    if isinstance(v, str) and v.strip().isdecimal():
        return int(v.strip())
    return None


def _tensor_plan(name, t):
    """(array to write, raw_dtype or None) for one tensor."""
    _check_name(name)
    if isinstance(t, QTensor):
        return np.ascontiguousarray(t.data).reshape(t.shape[0], -1), _ggml_type(t)
    if isinstance(t, np.ndarray):
        if t.dtype.kind == "f" and t.dtype.itemsize in (2, 4, 8) or t.dtype in (np.int8, np.int16, np.int32,
                                                                                 np.int64):
            if t.ndim == 0 or t.ndim > _MAX_DIMS:
                raise ValueError(f"tensor {name!r}: GGUF tensors have 1..{_MAX_DIMS} dimensions, got shape {t.shape}")
            if t.size == 0:
                raise ValueError(f"tensor {name!r} is empty")
            return np.ascontiguousarray(t, dtype=t.dtype.newbyteorder("=")), None
        raise TypeError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in GGUF "
                        "(float32, float16, float64, int8..int64 or a ggml QTensor)")
    raise TypeError(f"tensor {name!r} must be a QTensor or numpy array, got {type(t).__name__}")


def _fits_f32(v):
    """v is NaN, +-Inf or within float32's finite range (so f32 storage keeps its magnitude)."""
    return not np.isfinite(v) or abs(v) <= float(np.finfo(np.float32).max)


# integer GGUF value types (the scalar types but bool) -> (min, max), from their struct codes
_INT_RANGE = {t: (int(np.iinfo(f).min), int(np.iinfo(f).max))
              for t, (f, _) in _SCALARS.items() if t != 7 and np.dtype(f).kind in "iu"}


def _fits_type(t, v):
    """v can be stored as scalar GGUF type t exactly"""
    if t in _INT_RANGE:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and _INT_RANGE[t][0] <= v <= _INT_RANGE[t][1]
    if t == 6:  # FLOAT32: NaN, or a value f32 holds exactly (an integer too: rope.freq_base = 10000)
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return abs(v) <= 1 << 128 and _fits_f32(float(v)) and int(np.float32(v)) == v
        return isinstance(v, (float, np.floating)) and (v != v or (_fits_f32(float(v)) and float(np.float32(v)) == v))
    if t == 12:  # FLOAT64
        return isinstance(v, (float, np.floating, int)) and not isinstance(v, bool)
    if t == 7:
        return isinstance(v, bool)
    return t == _STRING and isinstance(v, str)


def _as_type(t, v):
    """v (for which _fits_type(t, v)) as the Python value the gguf writer packs as type t"""
    if t == _STRING:
        return v
    if t == 7:
        return bool(v)
    return int(v) if t in _INT_RANGE else float(v)


def _add_typed(w, key, v, typ):
    """True if v was written with the recorded type typ = (value type, item type) (v still fits it)"""
    V = _gguf().GGUFValueType
    vt, it = typ
    if vt == _ARRAY:
        if it is None or it == _ARRAY or not isinstance(v, (list, tuple)) or not v or \
                not all(_fits_type(it, x) for x in v):
            return False
        w.add_key_value(key, [_as_type(it, x) for x in v], V.ARRAY, V(it))
    elif _fits_type(vt, v):
        w.add_key_value(key, _as_type(vt, v), V(vt))
    else:
        return False
    return True


def _add_kv(w, key, v, typ=None):
    gguf = _gguf()
    V = gguf.GGUFValueType
    if not isinstance(key, str) or not key:
        raise TypeError(f"metadata keys must be non-empty strings, got {key!r}")
    _utf8(key, "metadata key")
    for x in (v if isinstance(v, (list, tuple)) else (v,)):  # the writer encodes strings only when it writes
        if isinstance(x, str):
            _utf8(x, f"metadata {key!r}: string")
    if typ is not None and _add_typed(w, key, v, typ):
        return
    if isinstance(v, bool):
        w.add_bool(key, v)
    elif isinstance(v, (int, np.integer)):
        v = int(v)
        if 0 <= v < 1 << 32:
            w.add_uint32(key, v)
        elif -(1 << 31) <= v < 0:
            w.add_int32(key, v)
        elif -(1 << 63) <= v < 1 << 63:
            w.add_int64(key, v)
        elif 0 <= v < 1 << 64:
            w.add_uint64(key, v)
        else:
            raise ValueError(f"metadata {key!r}: integer {v} does not fit 64 bits")
    elif isinstance(v, (float, np.floating)):
        v = float(v)
        if _fits_f32(v):
            w.add_float32(key, v)  # llama.cpp reads float hyperparameters as f32
        else:
            w.add_float64(key, v)  # beyond f32's range: f64 holds it (f32 would be Inf or fail)
    elif isinstance(v, str):
        w.add_key_value(key, v, V.STRING)  # not add_string: it skips an empty value
    elif isinstance(v, (list, tuple)):
        if not v:  # even with its item type recorded (a loaded file): the gguf writer refuses them
            raise ValueError(f"metadata {key!r}: an empty array cannot be written (the gguf package writes "
                             "no empty arrays); drop the key or give it items")
        kinds = {type(x) for x in v}
        if kinds <= {str}:
            w.add_array(key, list(v))
        elif kinds <= {bool}:
            w.add_key_value(key, list(v), V.ARRAY, V.BOOL)
        elif all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in v):
            lo, hi = int(min(v)), int(max(v))
            if -(1 << 31) <= lo and hi < 1 << 31:
                sub = V.INT32
            elif -(1 << 63) <= lo and hi < 1 << 63:
                sub = V.INT64
            elif 0 <= lo and hi < 1 << 64:
                sub = V.UINT64
            else:
                raise ValueError(f"metadata {key!r}: integers from {lo} to {hi} do not fit one 64-bit type")
            w.add_key_value(key, [int(x) for x in v], V.ARRAY, sub)
        elif all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool) for x in v):
            fl = [float(x) for x in v]
            w.add_key_value(key, fl, V.ARRAY, V.FLOAT32 if all(map(_fits_f32, fl)) else V.FLOAT64)
        else:
            raise TypeError(f"metadata {key!r}: arrays must hold only str, bool, int or float items")
    else:
        raise TypeError(f"metadata {key!r}: value of type {type(v).__name__} cannot be stored in GGUF")


class GGUFStreamWriter:
    """Write a GGUF file one tensor at a time: declare every tensor (name, shape, kind) first, then
    ``write(name, tensor)`` in the same order. Used by ``pyqkern quantize``."""

    def __init__(self, path, metadata=None, arch="pyqkern"):
        gguf = _gguf()
        self.path = os.fspath(path)
        types = getattr(metadata, "types", {})  # a GGUFMetadata from load_gguf: keep its value types
        meta = dict(metadata or {})
        arch = meta.pop("general.architecture", arch)
        if not isinstance(arch, str) or not arch:  # gguf-py drops an empty one: a file without the key
            raise ValueError(f"general.architecture must be a non-empty string, got {arch!r}")
        align = meta.pop("general.alignment", None)
        if align is not None:  # the tensor data alignment the file asks for (a power of two)
            a = _int_value(align)
            if a is None or not 1 <= a <= 2**31 or a & (a - 1):
                raise ValueError(f"general.alignment must be a power of two in [1, 2^31] (an integer or a "
                                 f"decimal string), got {align!r}")
            align = a
        qv = meta.get("general.quantization_version")
        if qv is not None:  # a uint32 in ggml's files, a string when it comes from safetensors metadata
            q = _int_value(qv)
            if q is None or q >= 2**32:
                raise ValueError(f"general.quantization_version must be an integer (or a decimal string) "
                                 f"below 2^32, got {qv!r}")
            meta["general.quantization_version"] = q
        self.tmp = f"{self.path}.tmp-{os.getpid()}"
        self.w = gguf.GGUFWriter(self.tmp, arch)
        if align is not None:
            self.w.add_custom_alignment(align)
        for k, v in meta.items():
            try:
                _add_kv(self.w, k, v, types.get(k))
            except (OverflowError, UnicodeEncodeError) as e:  # from the gguf writer's packing
                raise ValueError(f"metadata {str(k)[:80]!r}: cannot be written: {type(e).__name__}: {e}") from None
        self.has_qv = "general.quantization_version" in meta  # a loaded file's: not added twice
        self.order, self.quantized = [], False

    def declare(self, name, nbytes, shape, raw_dtype=None, dtype=np.uint8):
        """shape: NumPy-order element shape; raw_dtype: ggml type of a quantized tensor."""
        _check_name(name)
        if raw_dtype is not None:
            self.quantized = True
            self.w.add_tensor_info(name, list(shape), np.dtype(np.float32), nbytes, raw_dtype=raw_dtype)
        else:
            self.w.add_tensor_info(name, list(shape), np.dtype(dtype), nbytes)
        self.order.append(name)

    def begin(self):
        if self.quantized and not self.has_qv:
            self.w.add_quantization_version(_gguf().GGML_QUANT_VERSION)
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_ti_data_to_file()
        self._i = 0

    def write(self, name, arr):
        if self.order[self._i] != name:
            raise ValueError(f"tensor {name!r} written out of order (expected {self.order[self._i]!r})")
        self._i += 1
        arr = np.ascontiguousarray(arr)
        try:
            self.w.write_tensor_data(arr)
        except OSError as e:  # NumPy's tofile says only "N requested and M written" on a full disk
            import errno
            import shutil

            d = os.path.dirname(os.path.abspath(self.path))
            if e.errno is None and shutil.disk_usage(d).free < arr.nbytes + (1 << 20):
                raise OSError(errno.ENOSPC, f"No space left on device writing {self.path} ({e})") from None
            raise

    def finish(self):
        if self._i != len(self.order):
            raise ValueError(f"{len(self.order) - self._i} declared tensors were not written")
        self.w.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        try:
            self.w.close()
        except Exception:
            pass
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def save_gguf(path, tensors: dict, metadata: dict | None = None, arch: str = "pyqkern"):
    """Write ``tensors`` (name -> ggml-format QTensor or ndarray) to a GGUF file.

    QTensors are written as their ggml block bytes with the matching GGMLQuantizationType (a [N, K]
    weight is listed with ggml dims (K, N)); ndarrays keep their dtype (float32 -> F32, float16 -> F16,
    also F64 and I8..I64). ``metadata``: str -> str | int | float | bool | list (ints are stored as
    UINT32 when they fit, floats as FLOAT32, as llama.cpp expects; a :class:`GGUFMetadata` from
    load_gguf keeps each key's recorded type while its value still fits it; ``general.alignment``
    sets the tensor data alignment, a power of two). ``general.architecture`` is
    ``arch`` unless metadata sets it; ``general.quantization_version`` is added when a tensor is
    quantized. Non-ggml formats (nf4, int4, int8) raise ValueError: use :func:`pyqkern.io.save`.
    The file is written under a temporary name and renamed into place."""
    if not isinstance(tensors, dict):
        raise TypeError("tensors must be a dict name -> QTensor | ndarray")
    plans = {name: _tensor_plan(name, t) for name, t in tensors.items()}  # validate all before writing
    sw = GGUFStreamWriter(path, metadata, arch)
    try:
        for name, (arr, raw) in plans.items():
            if raw is not None:
                sw.declare(name, arr.nbytes, tensors[name].shape, raw)
            else:
                sw.declare(name, arr.nbytes, arr.shape, dtype=arr.dtype)
        sw.begin()
        for name, (arr, _) in plans.items():
            sw.write(name, arr)
        sw.finish()
    except BaseException:
        sw.abort()
        raise
