"""pyqkern: CPU quantization kernels (bit-exact ggml / GPTQ / NF4 formats, packed matmul).

    import pyqkern as pq
    qt = pq.quantize(w, "q4_0")      # w float32/float16/bfloat16 [N, K]
    w2 = pq.dequantize(qt)           # float32 [N, K]
"""
from __future__ import annotations

import os as _os

from . import _formats, _numba_fork, reference  # noqa: F401  (_numba_fork: its fork hook)
from ._lora import LoRA
from ._matmul import QLinear, matmul
from ._ops import dequantize, quantize
from ._qtensor import QTensor
from . import io, lora
from . import gptq

__version__ = "0.1.0"
__all__ = ["gptq", "get_include", "get_library", "QTensor", "QLinear", "matmul", "quantize", "dequantize", "formats", "info", "variants", "set_num_threads",
           "get_num_threads", "reference", "LoRA", "lora", "io", "__version__"]


def get_include() -> str:
    """Directory holding pyqkern/pyqkern.h, the C ABI (compile with -I this)."""
    return _os.path.join(_os.path.dirname(__file__), "include")


def get_library() -> str:
    """Path of libpyqkern.so, the C ABI shared library the Python module itself uses."""
    return _os.path.join(_os.path.dirname(__file__), "libpyqkern.so")


def formats() -> list:
    """Names of the supported formats."""
    return list(_formats.FORMATS)


def _nat():
    from . import _native

    return _native


# worst to best (dispatch picks the best runnable one; ids are in the order variants were added)
_VARIANT_RANK = {"ref": 0, "avx2": 1, "avxvnni": 2, "avx512": 3, "avx512vnni": 4, "neon": 1, "dotprod": 2}


def variants() -> list:
    """Native kernel variants compiled in that this CPU can run, best last."""
    n = _nat()
    names = [name for i, name in enumerate(n.isa_names()) if n.isa_runnable(i)]
    return sorted(names, key=lambda v: _VARIANT_RANK.get(v, 99))


def set_num_threads(n: int) -> None:
    """Threads for native kernels (n <= 0: one per CPU this process may run on, its affinity
    mask). Results do not depend on it. Calls from several Python threads run side by side: one
    uses the pool, the others run on their own thread meanwhile."""
    import operator

    if isinstance(n, bool) or not hasattr(n, "__index__"):  # not a float, nor "2"
        raise TypeError("number of threads must be an int")
    n = operator.index(n)  # a NumPy integer too
    nat = _nat()
    if n > nat.MAX_THREADS:  # the library's bound (a pool of 100000 threads started until the OS refused)
        raise ValueError(f"number of threads {n} is too large (at most {nat.MAX_THREADS})")
    nat.set_num_threads(max(n, 0))  # every n <= 0 means the same; -2**70 overflowed the binding's int


def get_num_threads() -> int:
    return _nat().get_num_threads()


def info() -> dict:
    """Version, CPU, features, compiled and active kernel variant, threads."""
    n = _nat()
    names = n.isa_names()
    try:
        active = names[n.active_isa()]
    except RuntimeError as e:  # bad PYQKERN_ISA: say so instead of failing info()
        active = f"error: {e}"
    return {
        "version": __version__,
        "cpu": n.cpu_brand(),
        "features": n.cpu_features().split(),
        "compiled_variants": sorted((v for i, v in enumerate(names) if n.isa_compiled(i)),
                                    key=lambda v: _VARIANT_RANK.get(v, 99)),
        "runnable_variants": variants(),
        "active_variant": active,
        "forced_by_env": _os.environ.get("PYQKERN_ISA") or None,
        "threads": n.get_num_threads(),
        "formats": formats(),
    }
