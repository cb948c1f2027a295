"""Numba twin of :func:`pyqkern._grid._iq4nl_scale_numpy` (same candidates, same arithmetic).

For each row of b [R, 32] and each t in -7..7: id = (T[0] + t) / max (max = the first value of
largest magnitude), codes c = nearest(T, b·id), score Σ(T[c]·b)² / Σ T[c]² (the squared-error
reduction of the least-squares scale for those codes); the best t's scale Σ T[c]·b / Σ T[c]²
is returned unrounded (float64); an all-zero row gives 0."""
from __future__ import annotations

import numpy as np
from numba import njit

from .gptq_loop import _nearest

_F32 = np.float32


@njit(cache=True, nogil=True, error_model="numpy")
def iq4nl_lsq_scale(b, T):
    r, gs = b.shape
    out = np.zeros(r, np.float64)
    for i in range(r):
        row = b[i]
        mx = _F32(0)
        amax = _F32(0)
        for j in range(gs):
            a = abs(row[j])
            if a > amax:
                amax = a
                mx = row[j]
        if mx == _F32(0):
            continue
        best = -1.0
        for ti in range(15):
            idv = (T[0] + _F32(ti - 7)) / mx
            sqx = 0.0
            sq2 = 0.0
            for j in range(gs):
                v = T[_nearest(T, row[j] * idv)]
                sqx += np.float64(v) * np.float64(row[j])
                sq2 += np.float64(v) * np.float64(v)
            if sq2 > 0 and sqx * sqx / sq2 > best:
                best = sqx * sqx / sq2
                out[i] = sqx / sq2
    return out
