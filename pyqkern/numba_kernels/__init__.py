"""Numba backend: portable JIT kernels with the same contracts as the native ones.

QUANTIZE[fmt](x, group, sym) -> (q, s, z); DEQUANTIZE[fmt](q, s, z, k, group, sym) -> y.
Signatures and bytes are those of :mod:`pyqkern.reference`. Kernels are compiled on first
use and cached on disk (``cache=True``).
"""
try:
    import numba as _numba  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the numba backend needs numba: pip install 'pyqkern[numba]'") from e

QUANTIZE = {}
DEQUANTIZE = {}

from . import simple as _simple  # noqa: E402  q4_0 q4_1 q8_0 iq4_nl(deq) nf4 int4 int8

QUANTIZE.update(_simple.QUANTIZE)
DEQUANTIZE.update(_simple.DEQUANTIZE)

from . import kquants as _kquants  # noqa: E402  q4_k q6_k iq4_nl(quant)

QUANTIZE.update(_kquants.QUANTIZE)
DEQUANTIZE.update(_kquants.DEQUANTIZE)
