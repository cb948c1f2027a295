"""Numba inner loop of GPTQ: the columns of one lazy-update block (see :mod:`pyqkern.gptq`).

The working weights are stored transposed, ``Wb`` [B, N] (one processing-order column per row,
contiguous over the N output channels). For each column j of the segment [j0, j1):

    c, q   = code and value chosen by the format's rule with the column's group parameters
    err    = (w - q) / U[j, j]
    Wb[jj] -= U[j, jj] * err      for every later column jj of the block

Quantizer arithmetic is float32 (the rules of :mod:`pyqkern.reference`), the error feedback is
float64. Parameters come from tables indexed by ``colgrp[j]`` (row = group, column = channel):

- mode 0, int2/int3/int4/int8: ``a`` = scale, ``z`` = zero point;
  ``c = clamp(rint(w / a) + z, qlo, qhi)``, ``q = (c - z) * a``.
- mode 1, q4_0: ``a`` = ggml's fp32 1/d, ``b`` = fp16-rounded d;
  ``c = clamp(trunc(w * a + 8.5), 0, 15)``, ``q = (c - 8) * b``.
- mode 2, q8_0: ``a`` = ggml's fp32 1/d, ``b`` = fp16-rounded d;
  ``c = clamp(roundf(w * a), -127, 127)``, ``q = c * b``.
- mode 3, a code table T (ascending; q4_1: 0..15, nf4: its code book, iq4_nl: its values):
  ``a`` = 1/scale, ``b`` = scale, ``m`` = min (q4_1; else 0);
  ``c = nearest(T, (w - m) * a)``, ``q = T[c] * b + m``.

Out-of-range values are clamped (the stored codes are exactly the chosen ones, so the bytes
dequantize to ``q`` whatever the clamp rule).
"""
from __future__ import annotations

import numpy as np
from numba import njit

_F32 = np.float32
_HALF = np.float32(0.5)
_8P5 = np.float32(8.5)


@njit(cache=True, nogil=True, error_model="numpy")
def _rne(v):
    return np.rint(v)


@njit(cache=True, nogil=True, error_model="numpy")
def _round_away(v):
    t = np.trunc(v)
    d = v - t
    if d >= _HALF:
        t += _F32(1)
    elif d <= -_HALF:
        t -= _F32(1)
    return t


@njit(cache=True, nogil=True, error_model="numpy")
def _nearest(T, v):
    """Index of the entry of the ascending table T nearest to v (ties to the lower entry)."""
    lo = 0
    hi = T.shape[0] - 1
    while lo < hi:  # first index whose upper midpoint is >= v
        mid = (lo + hi) // 2
        if v <= (T[mid] + T[mid + 1]) * _HALF:
            hi = mid
        else:
            lo = mid + 1
    return lo


@njit(cache=True, nogil=True, error_model="numpy")
def block_columns(Wb, Ub, Err, C, Qv, colgrp, A, Bt, Z, M, T, qlo, qhi, j0, j1, mode):
    """Process columns j0..j1-1 of the block in place (Wb, Err, C, Qv updated)."""
    nb = Wb.shape[0]
    n = Wb.shape[1]
    flo = _F32(qlo)
    fhi = _F32(qhi)
    for j in range(j0, j1):
        g = colgrp[j]
        d = Ub[j, j]
        for r in range(n):
            w = Wb[j, r]
            x = _F32(w)
            a = A[g, r]
            if mode == 0:
                zz = Z[g, r]
                if a == _F32(0):
                    c = zz
                else:
                    t = _rne(x / a) + _F32(zz)
                    if t < flo:
                        t = flo
                    elif t > fhi:
                        t = fhi
                    c = np.int32(t)
                q = _F32(c - zz) * a
            elif mode == 1:
                t = np.trunc(x * a + _8P5)
                if t < _F32(0):
                    t = _F32(0)
                elif t > _F32(15):
                    t = _F32(15)
                c = np.int32(t)
                q = _F32(c - 8) * Bt[g, r]
            elif mode == 2:
                t = _round_away(x * a)
                if t < _F32(-127):
                    t = _F32(-127)
                elif t > _F32(127):
                    t = _F32(127)
                c = np.int32(t)
                q = _F32(c) * Bt[g, r]
            else:
                m = M[g, r]
                c = np.int32(_nearest(T, (x - m) * a))
                q = T[c] * Bt[g, r] + m
            C[j, r] = c
            Qv[j, r] = q
            # a value the format cannot hold (its fp16 scale overflowed) feeds no error back:
            # its NaN / Inf would reach every later column of the row
            Err[j, r] = (w - np.float64(q)) / d if np.isfinite(q) else 0.0
        for jj in range(j + 1, nb):
            u = Ub[j, jj]
            if u != 0.0:
                for r in range(n):
                    Wb[jj, r] -= u * Err[j, r]
