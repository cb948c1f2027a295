"""cffi bindings for libpyqkern.so, the plain C ABI of pyqkern (csrc/include/pyqkern/pyqkern.h).

    from pyqkern_cffi import ffi, lib, check
    check(lib.pqk_set_num_threads(2))

ABI mode (``ffi.dlopen``), not API mode: nothing is compiled when this is installed or imported,
so it needs no C compiler on the host and no build step beyond the one that already produced
libpyqkern.so; the C ABI is plain C with fixed-width types and no macros in the signatures, which
is exactly what ABI mode handles safely. The declarations are the installed header itself
(pyqkern.get_include()) minus comments and preprocessor lines, so there is no second copy to
drift; tests/test_cabi.py checks the result against the header and the C compiler's layouts.

The library is opened by the path pyqkern.get_library() gives, the same file the pybind11 module
links against, so the dynamic loader hands back the already loaded instance: one dispatch state
and one thread setting shared with ``import pyqkern``.
"""
from __future__ import annotations

import os
import re

import cffi

import pyqkern

HEADER_PATH = os.path.join(pyqkern.get_include(), "pyqkern", "pyqkern.h")


def cdef_from_header(text: str) -> str:
    """pyqkern.h as cffi's cdef takes it: no comments, no preprocessor lines, no PQK_API, no
    extern "C" braces (the header has no macros inside its declarations)."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    text = text.replace("PQK_API", " ").replace('extern "C" {', " ")
    return re.sub(r"^\s*}\s*$", "", text, flags=re.M)  # the extern "C" closing brace


with open(HEADER_PATH, encoding="utf-8") as _f:
    CDEF = cdef_from_header(_f.read())

ffi = cffi.FFI()
ffi.cdef(CDEF)
lib = ffi.dlopen(pyqkern.get_library())

STATUS_NAMES = {
    lib.PQK_OK: "PQK_OK",
    lib.PQK_ERR_ARG: "PQK_ERR_ARG",
    lib.PQK_ERR_SHAPE: "PQK_ERR_SHAPE",
    lib.PQK_ERR_NONFINITE: "PQK_ERR_NONFINITE",
    lib.PQK_ERR_UNSUPPORTED: "PQK_ERR_UNSUPPORTED",
    lib.PQK_ERR_ISA: "PQK_ERR_ISA",
    lib.PQK_ERR_NOMEM: "PQK_ERR_NOMEM",
    lib.PQK_ERR_INTERNAL: "PQK_ERR_INTERNAL",
}


class PqkError(RuntimeError):
    """A non-zero pqk_status; .status holds the code, the message is pqk_last_error()."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{STATUS_NAMES.get(status, status)}: {message}")
        self.status = status


def last_error() -> str:
    p = lib.pqk_last_error()
    return ffi.string(p).decode("utf-8", "replace") if p != ffi.NULL else ""


def check(status: int) -> None:
    """Raise PqkError for a non-zero status (read pqk_last_error() right away: it is per thread
    and valid until the next call on this thread)."""
    if status != lib.PQK_OK:
        raise PqkError(int(status), last_error())


def cstr(p) -> str:
    """const char* -> str ('' for NULL)."""
    return ffi.string(p).decode("utf-8", "replace") if p != ffi.NULL else ""


def qparams(group: int = 0, sym: int = 0):
    """A new pqk_qparams* (zero fields mean the format's defaults)."""
    return ffi.new("pqk_qparams*", {"group": group, "sym": sym})


def row_bytes(fmt: int, k: int, params=None):
    """-> (q, s, z) bytes per row; params (a pqk_qparams*) gets its defaults resolved in place."""
    params = qparams() if params is None else params
    out = ffi.new("pqk_row_bytes*")
    check(lib.pqk_row_bytes_of(fmt, k, params, out))
    return out.q, out.s, out.z


def ptr(a, ctype: str = "void*"):
    """A numpy array (or None) -> a C pointer to its data (NULL for None). The array must stay
    alive, and be C-contiguous in the layout the call expects, for as long as the pointer is used."""
    if a is None:
        return ffi.NULL
    return ffi.cast(ctype, a.ctypes.data)


def pack(fmt: int, q, s, z, n: int, k: int, params):
    """pqk_pack -> a pqk_packed* that frees itself (pqk_packed_free) when collected."""
    out = ffi.new("pqk_packed**")
    check(lib.pqk_pack(fmt, ptr(q), ptr(s), ptr(z), n, k, params, out))
    return ffi.gc(out[0], lib.pqk_packed_free)
