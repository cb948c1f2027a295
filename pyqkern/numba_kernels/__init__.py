"""Numba backend: portable JIT kernels with the same contracts as the native ones.

QUANTIZE[fmt](x, group, sym) -> (q, s, z); DEQUANTIZE[fmt](q, s, z, k, group, sym) -> y.
"""
QUANTIZE = {}
DEQUANTIZE = {}
