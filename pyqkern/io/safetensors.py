"""A small, strict safetensors reader/writer in NumPy (no dependency on the ``safetensors`` package).

File layout (https://github.com/huggingface/safetensors, "Format"):

    8 bytes   N, unsigned little-endian 64-bit: length of the header
    N bytes   UTF-8 JSON object {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
              "__metadata__": {str: str}}; may be padded at the end with spaces
    rest      the data area; offsets are relative to its start, tensors are C-order little-endian

Everything is validated before any tensor is read, and every problem raises ``ValueError`` naming it:
header length against the file size (and the format's 100 MB header limit), UTF-8 and JSON (no
duplicate keys), the entry fields, a known dtype, non-negative integer shapes, offsets inside the
data area, byte length == prod(shape) * itemsize, and - as the format requires, to rule out
polyglot files - tensors that do not overlap and cover the data area with no holes.

Reads are zero-copy: the file is memory-mapped (``np.memmap``, read-only) and each array is a view
of it. BF16 has no NumPy dtype: ``load(path, bf16="float32")`` (default) returns a float32 copy
(exact: bf16 is the top half of a float32); ``bf16="bits"`` returns the raw uint16 bits zero-copy;
``bf16="ml_dtypes"`` returns an ``ml_dtypes.bfloat16`` view (needs ml_dtypes).
"""
from __future__ import annotations

import json
import os
import re
import struct

import numpy as np

__all__ = ["load", "save", "read_header", "DTYPES", "StreamWriter"]

#: safetensors dtype name -> NumPy dtype (little-endian). BF16 is handled separately (see load).
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_KNOWN_UNSUPPORTED = ("F8_E5M2", "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64")
MAX_HEADER = 100_000_000  # the reference implementation's limit
# tensors per file (counted as JSON objects before parsing): real shards hold a few thousand; a
# 17 MB header of 300k empty tensors took 375 MB of Python objects to parse (review)
MAX_TENSORS = 1 << 17
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}

try:
    import ml_dtypes as _ml_dtypes

    _BF16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # optional
    _BF16 = None


def no_dup_keys(pairs):
    """json.loads object_pairs_hook: a ValueError for a key given twice (json keeps the last)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


_JSON_ESCAPE = re.compile(r"\\.", re.S)  # removed first: then no string holds a backslash or an inner quote
_JSON_STRING = re.compile(r'"[^"]*"')  # single-character repeats: linear time, no per-character state
MAX_JSON_ITEMS_PER_OBJECT = 64  # a tensor entry: its keys and at most 32 dimensions, 2 offsets
MAX_JSON_ITEMS_EXTRA = 1 << 16  # for metadata (string pairs, one object)


def check_json_items(text: str, what: str, arrays_per_object: int) -> None:
    """ValueError unless the JSON text holds, outside its strings, at most arrays_per_object
    arrays per object and MAX_JSON_ITEMS_PER_OBJECT items (commas) per object (plus a margin for
    metadata): the object count alone left arrays and items free (a review: a 30 MB header of
    10 million empty lists took 880 MB to parse, 2.5 million metadata entries 600 MB)."""
    bare = _JSON_STRING.sub("", _JSON_ESCAPE.sub("", text))
    objects = bare.count("{")
    arrays, items = bare.count("["), bare.count(",")
    if arrays > arrays_per_object * objects + 2 or items > MAX_JSON_ITEMS_PER_OBJECT * objects + MAX_JSON_ITEMS_EXTRA:
        raise ValueError(f"{what}: {arrays} JSON arrays and {items} items for {objects} objects, more than its "
                         "entries can hold: refused (parsing them would take hundreds of megabytes)")


def _parse_header(raw: bytes, data_len: int):
    """Validated ({name: (dtype_name, shape tuple, begin, end)}, metadata dict)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"safetensors header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.startswith("{"):
        raise ValueError("safetensors header must be a JSON object starting with '{'")
    if text.count("{") > MAX_TENSORS + 2:  # one object per tensor (braces inside names count too)
        raise ValueError(f"safetensors header holds more than {MAX_TENSORS} objects (tensors): refused (parsing "
                         "them would take hundreds of megabytes)")
    check_json_items(text, "safetensors header", arrays_per_object=2)
    try:
        hdr = json.loads(text, object_pairs_hook=no_dup_keys)
    except RecursionError:
        raise ValueError("safetensors header: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, duplicate keys
        raise ValueError(f"safetensors header is not valid JSON: {e}") from None
    if not isinstance(hdr, dict):
        raise ValueError("safetensors header must be a JSON object")
    try:  # a JSON escape can spell a lone surrogate, which no UTF-8 file can hold (nor a re-save)
        json.dumps(hdr, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"safetensors header holds an escaped lone surrogate ({e.reason}), not a Unicode "
                         "string") from None
    meta = hdr.pop("__metadata__", None)
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("safetensors __metadata__ must be an object mapping strings to strings")
    entries = {}
    for name, info in hdr.items():
        if not isinstance(info, dict):
            raise ValueError(f"tensor {name!r}: entry must be an object")
        if set(info) != _ENTRY_KEYS:
            missing, extra = _ENTRY_KEYS - set(info), set(info) - _ENTRY_KEYS
            raise ValueError(f"tensor {name!r}: entry needs exactly dtype, shape, data_offsets"
                             f"{'; missing ' + ', '.join(sorted(missing)) if missing else ''}"
                             f"{'; unknown ' + ', '.join(sorted(map(str, extra))) if extra else ''}")
        dt = info["dtype"]
        if not isinstance(dt, str) or dt not in DTYPES:
            why = "is not supported by this reader" if dt in _KNOWN_UNSUPPORTED else "is unknown"
            raise ValueError(f"tensor {name!r}: dtype {dt!r} {why}; supported: {', '.join(DTYPES)}")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        offs = info["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
            raise ValueError(f"tensor {name!r}: data_offsets must be [begin, end] integers, got {offs!r}")
        b, e = offs
        if not 0 <= b <= e <= data_len:
            raise ValueError(f"tensor {name!r}: data_offsets [{b}, {e}] outside the data area of {data_len} bytes")
        if len(shape) > 32:
            raise ValueError(f"tensor {name!r}: {len(shape)} dimensions (at most 32 are supported)")
        count, extent = 1, DTYPES[dt].itemsize
        for d in shape:
            count *= d  # Python ints: no overflow
            extent *= max(d, 1)
        if extent > 1 << 62:  # NumPy cannot represent it, even with a zero dimension
            raise ValueError(f"tensor {name!r}: shape {shape} is too large to represent")
        if count * DTYPES[dt].itemsize != e - b:
            raise ValueError(f"tensor {name!r}: shape {shape} of {dt} needs {count * DTYPES[dt].itemsize} bytes "
                             f"but data_offsets span {e - b}")
        entries[name] = (dt, tuple(shape), b, e)
    pos = 0
    for name, (_, _, b, e) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if b < pos:
            raise ValueError(f"tensor {name!r}: data_offsets [{b}, {e}] overlap the previous tensor (ends at {pos})")
        if b > pos:
            raise ValueError(f"data area has a hole at bytes [{pos}, {b}) before tensor {name!r} "
                             "(the format requires the data area to be fully indexed)")
        pos = e
    if pos != data_len:
        raise ValueError(f"data area has {data_len - pos} unindexed bytes at its end (after byte {pos})")
    return entries, meta


def _read_prefix(path):
    size = os.path.getsize(path)
    if size < 8:
        raise ValueError(f"{path}: {size} bytes is too short for a safetensors file (needs an 8-byte header length)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER:
            raise ValueError(f"{path}: header length {n} exceeds the format's limit of {MAX_HEADER} bytes")
        if n > size - 8:
            raise ValueError(f"{path}: header length {n} is larger than the rest of the file ({size - 8} bytes)")
        raw = f.read(n)
    return size, n, raw


def _parse_header_of(path, raw, data_len):
    """_parse_header with the file named in its errors (a directory of shards has many)."""
    try:
        return _parse_header(raw, data_len)
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)}: {e}") from None


def read_header(path):
    """({name: {"dtype", "shape", "data_offsets"}}, metadata) after full validation, without mapping the data."""
    size, n, raw = _read_prefix(path)
    entries, meta = _parse_header_of(path, raw, size - 8 - n)
    return ({k: {"dtype": dt, "shape": list(sh), "data_offsets": [b, e]} for k, (dt, sh, b, e) in entries.items()},
            meta)


def load(path, *, bf16="float32"):
    """Read a safetensors file -> (dict name -> ndarray, metadata dict).

    Arrays are read-only zero-copy views of a memory map (except BF16 with ``bf16="float32"``, a
    converted copy). ``bf16``: "float32" | "bits" (uint16) | "ml_dtypes" (ml_dtypes.bfloat16).
    Raises ValueError for any malformed file."""
    if bf16 not in ("float32", "bits", "ml_dtypes"):
        raise ValueError(f"bf16 must be 'float32', 'bits' or 'ml_dtypes', got {bf16!r}")
    if bf16 == "ml_dtypes" and _BF16 is None:
        raise ImportError("bf16='ml_dtypes' needs the ml_dtypes package")
    path = os.fspath(path)
    size, n, raw = _read_prefix(path)
    data_len = size - 8 - n
    entries, meta = _parse_header_of(path, raw, data_len)
    mm = np.memmap(path, dtype=np.uint8, mode="r")  # size >= 8 here: never an empty map
    base = 8 + n
    out = {}
    for name, (dt, shape, b, e) in entries.items():
        try:
            arr = mm[base + b: base + e].view(DTYPES[dt]).reshape(shape)
        except (ValueError, OverflowError) as err:  # belt and braces: the header checks should prevent this
            raise ValueError(f"tensor {name!r}: cannot view its bytes as {dt} {list(shape)}: {err}") from None
        if dt == "BOOL" and arr.size and int(mm[base + b: base + e].max()) > 1:
            raise ValueError(f"tensor {name!r}: BOOL data holds bytes other than 0 and 1")
        if dt == "BF16":
            if bf16 == "float32":
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            elif bf16 == "ml_dtypes":
                arr = arr.view(_BF16)
        out[name] = np.asarray(arr) if not isinstance(arr, np.memmap) else arr.view(np.ndarray)
    return out, meta


def _dtype_name(arr, name, bf16_names):
    dt = arr.dtype
    if name in bf16_names:
        if dt != np.uint16:
            raise TypeError(f"tensor {name!r}: listed in bf16= but has dtype {dt} (expected uint16 bf16 bits)")
        return "BF16"
    if _BF16 is not None and dt == _BF16:
        return "BF16"
    for k, v in DTYPES.items():
        if k != "BF16" and dt.kind == v.kind and dt.itemsize == v.itemsize:
            return k
    raise TypeError(f"tensor {name!r}: dtype {dt} cannot be stored in safetensors")


def _check_metadata(metadata):
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise TypeError("metadata must be a dict mapping str to str")


def _check_name(name):
    if not isinstance(name, str) or not name:
        raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
    if name == "__metadata__":
        raise ValueError("'__metadata__' is reserved and cannot name a tensor")


def _layout(specs, metadata):
    """The file layout for ``specs`` [(name, dtype name, shape)]: (header bytes, [(name, dtype name,
    shape, begin, end)] in file order). Tensors are sorted by item size (largest first) then name, so
    every tensor is aligned to its item size; the header is padded with spaces to a multiple of 8.
    :func:`save` and :class:`StreamWriter` both lay files out with this, so they write identical bytes."""
    items = sorted(specs, key=lambda t: (-DTYPES[t[1]].itemsize, t[0]))
    hdr, off, placed = {}, 0, []
    if metadata:
        hdr["__metadata__"] = dict(metadata)
    for name, dtn, shape in items:
        nb = DTYPES[dtn].itemsize
        for d in shape:
            nb *= d
        hdr[name] = {"dtype": dtn, "shape": list(shape), "data_offsets": [off, off + nb]}
        placed.append((name, dtn, tuple(shape), off, off + nb))
        off += nb
    raw = json.dumps(hdr, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER:
        raise ValueError(f"safetensors header would be {len(raw)} bytes, over the format's limit of {MAX_HEADER}")
    return raw, placed


def _bytes_of(a):
    """A flat uint8 view of a C-contiguous little-endian array (no copy)."""
    return a.reshape(-1).view(np.uint8) if a.size else np.zeros(0, np.uint8)


def save(path, tensors: dict, metadata: dict | None = None, *, bf16=()):
    """Write ``tensors`` (name -> ndarray) to ``path`` as safetensors.

    Tensors are stored little-endian, C order, sorted by alignment then name (so every tensor is
    aligned to its item size), header padded with spaces to a multiple of 8. BF16: pass
    ``ml_dtypes.bfloat16`` arrays, or uint16 bit arrays whose names are listed in ``bf16``.
    The file is written to a temporary name and renamed into place. To write a file larger
    than memory one tensor at a time, use :class:`StreamWriter`."""
    if not isinstance(tensors, dict):
        raise TypeError("tensors must be a dict name -> ndarray")
    bf16 = set(bf16)
    _check_metadata(metadata)
    arrays = {}
    for name, arr in tensors.items():
        _check_name(name)
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"tensor {name!r} must be a numpy array, got {type(arr).__name__}")
        dtn = _dtype_name(arr, name, bf16)
        le = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        arrays[name] = (dtn, np.asarray(arr, dtype=le, order="C"))  # (ascontiguousarray makes 0-d 1-d)
    raw, placed = _layout([(n, dtn, a.shape) for n, (dtn, a) in arrays.items()], metadata)

    def write(f):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, *_ in placed:
            f.write(_bytes_of(arrays[name][1]))

    write_replacing(path, write)


def write_replacing(path, write, text=False):
    """write(f) into a temporary file beside path, renamed over path when it is complete: a failure
    (or Ctrl-C) leaves an existing path as it was and no partial file (text: opened as UTF-8 text)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") if text else open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class StreamWriter:
    """Write a safetensors file one tensor at a time, holding no more than the tensor being written.

    ``specs``: every tensor the file will hold, as (name, dtype name, shape) with dtype names as in
    :data:`DTYPES` ("F32", "BF16", "U8", ...). The header - the same bytes :func:`save` would
    write for these tensors - goes out first; ``write(name, array)`` then puts each tensor's bytes at
    its place (any order; the dtype and shape must match the spec). ``drop(name)`` takes a declared
    tensor out again (``finish`` then rewrites the file without it, copying in bounded chunks), and
    ``finish(metadata=...)`` may replace the metadata (the header is rebuilt if it changes).
    ``finish()`` checks that every tensor was written and renames the temporary file into place;
    ``abort()`` removes it. Usable as a context manager (aborts on an exception)."""

    _CHUNK = 16 << 20

    def __init__(self, path, specs, metadata: dict | None = None):
        _check_metadata(metadata)
        self.path = os.fspath(path)
        self.metadata = dict(metadata) if metadata else None
        self.specs = {}
        for spec in specs:
            try:
                name, dtn, shape = spec
            except (TypeError, ValueError):
                raise TypeError(f"specs must be (name, dtype name, shape) triples, got {spec!r}") from None
            _check_name(name)
            if name in self.specs:
                raise ValueError(f"tensor {name!r} is declared twice")
            if dtn not in DTYPES:
                raise ValueError(f"tensor {name!r}: unknown dtype {dtn!r}; supported: {', '.join(DTYPES)}")
            shape = tuple(shape)
            if not all(_is_int(int(d)) and int(d) >= 0 for d in shape):
                raise ValueError(f"tensor {name!r}: shape must hold non-negative integers, got {shape!r}")
            self.specs[name] = (dtn, tuple(int(d) for d in shape))
        self._raw, placed = _layout([(n, dtn, sh) for n, (dtn, sh) in self.specs.items()], self.metadata)
        self._base = 8 + len(self._raw)
        self._where = {p[0]: (p[3], p[4]) for p in placed}
        self._written, self._dropped = set(), set()
        self.tmp = f"{self.path}.tmp-{os.getpid()}"
        self._f = open(self.tmp, "wb")
        try:
            self._f.write(struct.pack("<Q", len(self._raw)))
            self._f.write(self._raw)
        except BaseException:
            self.abort()
            raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if self._f is not None:
                self.finish()
        else:
            self.abort()
        return False

    def write(self, name, arr) -> None:
        if self._f is None:
            raise ValueError("the writer is closed")
        if name not in self.specs or name in self._dropped:
            raise ValueError(f"tensor {name!r} was not declared")
        if name in self._written:
            raise ValueError(f"tensor {name!r} was already written")
        dtn, shape = self.specs[name]
        a = np.asarray(arr)
        want = DTYPES[dtn]
        if a.dtype.kind != want.kind or a.dtype.itemsize != want.itemsize or (
                dtn == "BF16" and a.dtype != np.uint16 and (_BF16 is None or a.dtype != _BF16)):
            raise TypeError(f"tensor {name!r}: declared {dtn}, got dtype {a.dtype}")
        if tuple(a.shape) != shape:
            raise ValueError(f"tensor {name!r}: declared shape {list(shape)}, got {list(a.shape)}")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        a = np.ascontiguousarray(a)
        b, _ = self._where[name]
        self._f.seek(self._base + b)
        self._f.write(_bytes_of(a))
        self._written.add(name)

    def drop(self, name) -> None:
        """Leave a declared, not yet written tensor out of the file."""
        if name not in self.specs or name in self._dropped:
            raise ValueError(f"tensor {name!r} was not declared")
        if name in self._written:
            raise ValueError(f"tensor {name!r} was already written")
        self._dropped.add(name)

    def finish(self, metadata=None) -> None:
        if self._f is None:
            raise ValueError("the writer is closed")
        missing = [n for n in self.specs if n not in self._written and n not in self._dropped]
        if missing:
            self.abort()
            raise ValueError(f"{len(missing)} declared tensor(s) were not written: {', '.join(missing[:5])}")
        try:
            if metadata is not None:
                _check_metadata(metadata)
                metadata = dict(metadata) or None
            else:
                metadata = self.metadata
            keep = [(n, dtn, sh) for n, (dtn, sh) in self.specs.items() if n not in self._dropped]
            raw, placed = _layout(keep, metadata)
            self._f.close()
            if raw != self._raw or self._dropped:
                self._rewrite(raw, placed)
            self._f = None
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def _rewrite(self, raw, placed):
        """Copy the kept tensors into a new file under the new header (bounded memory)."""
        tmp2 = self.tmp + ".2"
        buf = bytearray(self._CHUNK)
        try:
            with open(self.tmp, "rb") as src, open(tmp2, "wb") as dst:
                dst.write(struct.pack("<Q", len(raw)))
                dst.write(raw)
                for name, _, _, _, _ in placed:
                    b, e = self._where[name]
                    src.seek(self._base + b)
                    left = e - b
                    while left:
                        mv = memoryview(buf)[:min(left, len(buf))]
                        got = src.readinto(mv)
                        if not got:
                            raise ValueError(f"{self.tmp}: short read while rewriting tensor {name!r}")
                        dst.write(mv[:got])
                        left -= got
            os.replace(tmp2, self.tmp)
        finally:
            if os.path.exists(tmp2):
                os.remove(tmp2)

    def abort(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None
        if os.path.exists(self.tmp):
            os.remove(self.tmp)
