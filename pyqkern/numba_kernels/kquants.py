"""Numba kernels for the ggml super-block formats q4_k, q6_k and for iq4_nl quantize.

Line-by-line ports of ``csrc/kernels/ref/kquants.cpp`` (which follows llama.cpp's
``quantize_row_q4_K_ref``, ``quantize_row_q6_K_ref`` and ``quantize_iq4_nl`` without an
importance matrix; see that file and :mod:`pyqkern.reference_kquants` for the choices made).
Same bits as the C++ and NumPy versions:

- every float operation is float32, in the C code's order, with no fused multiply-add (Numba
  does not contract without ``fastmath``). Float constants are ``np.float32`` module globals
  and ints enter float expressions only through ``np.float32(i)``, so nothing is promoted to
  float64.
- ggml's ``nearest_int`` is done exactly as in C: add 1.5*2^23 and read the float's bits.
- fp16 <-> fp32 by integer bit manipulation (round to nearest even, overflow to inf).

Rows run in parallel (``prange``); each row is computed from its own inputs only, so the result
does not depend on the thread count.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._par import pjit

_F32 = np.float32
_JIT = dict(cache=True, nogil=True, error_model="numpy")

F0 = _F32(0.0)
F1 = _F32(1.0)
F15 = _F32(15.0)
F_32 = _F32(32.0)
F63 = _F32(63.0)
F_M1 = _F32(-1.0)
F_M32 = _F32(-32.0)
F_M128 = _F32(-128.0)
F0_1 = _F32(0.1)
F_MAGIC = _F32(12582912.0)           # 1.5 * 2^23
F_2M24 = _F32(5.9604644775390625e-08)  # 2^-24
GROUP_MAX_EPS = _F32(1e-15)
IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=_F32)
IQ4NL_V0 = -127


# ---------------------------------------------------------------- bit casts and fp16 (shared with simple.py)
from .simple import _ggml_dequantizer, _ggml_quantizer, u32_as_f32  # noqa: E402
from .simple import f32_as_u32 as _f32_bits  # noqa: E402
from .simple import fp16_to_fp32 as f16_bits_to_f32  # noqa: E402
from .simple import fp32_to_fp16 as f32_to_f16_bits  # noqa: E402


@njit(inline="always", **_JIT)
def nearest_int(v):
    """ggml nearest_int: the mantissa bits of v + 1.5*2^23 (round half to even in range)."""
    b = np.int64(_f32_bits(v + F_MAGIC))
    return (b & 0x007FFFFF) - 0x00400000


@njit(inline="always", **_JIT)
def _clamp(v, lo, hi):
    return lo if v < lo else (hi if v > hi else v)


@njit(inline="always", **_JIT)
def _store_f16(out, pos, v):
    h = f32_to_f16_bits(v)
    out[pos] = np.uint8(h & 0xFF)
    out[pos + 1] = np.uint8(h >> 8)
    return f16_bits_to_f32(h)


@njit(inline="always", **_JIT)
def _load_f16(buf, pos):
    return f16_bits_to_f32(np.int64(buf[pos]) | (np.int64(buf[pos + 1]) << 8))


# ---------------------------------------------------------------- q4_k
@njit(**_JIT)
def _fit_q4k(x, w, L, aux):
    """make_qkx2_quants(32, 15, x, w, L, &the_min, aux, -1, 0.1, 20, false) on a 32-element
    view: codes into L, returns (scale, the_min = -min)."""
    lo = x[0]
    hi = x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, 32):
        if x[i] < lo:
            lo = x[i]
        if x[i] > hi:
            hi = x[i]
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if lo > F0:
        lo = F0
    if hi == lo:
        for i in range(32):
            L[i] = 0
        return F0, -lo
    iscale = F15 / (hi - lo)
    scale = F1 / iscale
    best = F0
    for i in range(32):
        l = _clamp(nearest_int(iscale * (x[i] - lo)), 0, 15)
        L[i] = l
        diff = scale * _F32(l) + lo - x[i]
        diff = diff * diff
        best += w[i] * diff
    for step in range(21):
        iscale = (F_M1 + F0_1 * _F32(step) + F15) / (hi - lo)   # lo: the current best min
        sl = F0
        sl2 = F0
        sxl = F0
        for i in range(32):
            l = _clamp(nearest_int(iscale * (x[i] - lo)), 0, 15)
            aux[i] = l
            fl = _F32(l)
            sl += w[i] * fl
            sl2 += w[i] * fl * fl
            sxl += w[i] * fl * x[i]
        det = sum_w * sl2 - sl * sl
        if not (det > F0):
            continue
        s = (sum_w * sxl - sum_x * sl) / det
        m = (sl2 * sum_x - sl * sxl) / det
        if m > F0:
            m = F0
            s = sxl / sl2
        err = F0
        for i in range(32):
            diff = s * _F32(aux[i]) + m - x[i]
            diff = diff * diff
            err += w[i] * diff
        if err < best:
            for i in range(32):
                L[i] = aux[i]
            best = err
            scale = s
            lo = m
    return scale, -lo


@njit(inline="always", **_JIT)
def _q4k_scale_min(sc, j):
    """6-bit scale and min j (0..7) of a 12-byte scales field (ggml get_scale_min_k4)."""
    if j < 4:
        return np.int64(sc[j]) & 63, np.int64(sc[j + 4]) & 63
    s = (np.int64(sc[j + 4]) & 0x0F) | ((np.int64(sc[j - 4]) >> 6) << 4)
    m = (np.int64(sc[j + 4]) >> 4) | ((np.int64(sc[j]) >> 6) << 4)
    return s, m


@njit(**_JIT)
def _q4k_block(x, out):
    """One super-block: x 256 floats -> out 144 bytes."""
    L = np.empty(256, np.int64)
    aux = np.empty(32, np.int64)
    w = np.empty(32, _F32)
    scales = np.empty(8, _F32)
    mins = np.empty(8, _F32)
    max_scale = F0
    max_min = F0
    for j in range(8):
        xb = x[32 * j:32 * j + 32]
        sum_x2 = F0
        for l in range(32):
            sum_x2 += xb[l] * xb[l]
        av_x = np.sqrt(sum_x2 / F_32)
        for l in range(32):
            w[l] = av_x + abs(xb[l])
        sc, mn = _fit_q4k(xb, w, L[32 * j:32 * j + 32], aux)
        scales[j] = sc
        mins[j] = mn
        if sc > max_scale:
            max_scale = sc
        if mn > max_min:
            max_min = mn
    inv_scale = F63 / max_scale if max_scale > F0 else F0
    inv_min = F63 / max_min if max_min > F0 else F0
    sp = out[4:16]
    for j in range(8):
        ls = min(nearest_int(inv_scale * scales[j]) & 0xFF, 63)   # uint8_t, then MIN(63, .)
        lm = min(nearest_int(inv_min * mins[j]) & 0xFF, 63)
        if j < 4:
            sp[j] = np.uint8(ls)
            sp[j + 4] = np.uint8(lm)
        else:
            sp[j + 4] = np.uint8((ls & 0x0F) | ((lm & 0x0F) << 4))
            sp[j - 4] = np.uint8(np.int64(sp[j - 4]) | ((ls >> 4) << 6))
            sp[j] = np.uint8(np.int64(sp[j]) | ((lm >> 4) << 6))
    d_all = _store_f16(out, 0, max_scale / F63)
    dmin_all = _store_f16(out, 2, max_min / F63)
    for j in range(8):
        s, m = _q4k_scale_min(sp, j)
        d = d_all * _F32(s)
        if d == F0:
            continue   # keep the fit's codes, as ggml does
        dm = dmin_all * _F32(m)
        for i in range(32):
            L[32 * j + i] = _clamp(nearest_int((x[32 * j + i] + dm) / d), 0, 15)
    for c in range(4):
        for l in range(32):
            out[16 + 32 * c + l] = np.uint8(L[64 * c + l] | (L[64 * c + 32 + l] << 4))


@pjit(**_JIT)
def _q4k_quantize(x, q):
    nb = x.shape[1] // 256
    for r in prange(x.shape[0]):
        for b in range(nb):
            _q4k_block(x[r, 256 * b:256 * b + 256], q[r, 144 * b:144 * b + 144])


@pjit(**_JIT)
def _q4k_dequantize(q, y):
    n, k = y.shape
    for r in prange(n):
        for b in range(k // 256):
            blk = q[r, 144 * b:144 * b + 144]
            d = _load_f16(blk, 0)
            dmin = _load_f16(blk, 2)
            sc = blk[4:16]
            for c in range(4):
                s0, m0 = _q4k_scale_min(sc, 2 * c)
                s1, m1 = _q4k_scale_min(sc, 2 * c + 1)
                d0 = d * _F32(s0)
                dm0 = dmin * _F32(m0)
                d1 = d * _F32(s1)
                dm1 = dmin * _F32(m1)
                yo = 256 * b + 64 * c
                for l in range(32):
                    v = np.int64(blk[16 + 32 * c + l])
                    y[r, yo + l] = d0 * _F32(v & 0x0F) - dm0
                    y[r, yo + 32 + l] = d1 * _F32(v >> 4) - dm1


# ---------------------------------------------------------------- q6_k
@njit(**_JIT)
def _q6k_sums(x, iscale):
    a = F0
    b = F0
    for i in range(16):
        fl = _F32(_clamp(nearest_int(iscale * x[i]), -32, 31))
        w = x[i] * x[i]
        a += w * x[i] * fl
        b += w * fl * fl
    return a, b


@njit(inline="always", **_JIT)
def _q6k_codes(x, iscale, L):
    for i in range(16):
        L[i] = _clamp(nearest_int(iscale * x[i]), -32, 31) + 32


@njit(**_JIT)
def _fit_q6k(x, L):
    """make_qx_quants(16, 32, x, L, 1, NULL) on a 16-element view: codes (0..63) into L."""
    amax = F0
    mx = F0
    for i in range(16):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(16):
            L[i] = 0
        return F0
    iscale = F_M32 / mx
    sumlx, suml2 = _q6k_sums(x, iscale)
    _q6k_codes(x, iscale, L)
    scale = sumlx / suml2 if suml2 != F0 else F0
    best = scale * sumlx
    for t in range(-9, 10):
        if t == 0:
            continue
        iscale = -(F_32 + F0_1 * _F32(t)) / mx
        sumlx, suml2 = _q6k_sums(x, iscale)
        if suml2 > F0 and sumlx * sumlx > best * suml2:
            _q6k_codes(x, iscale, L)
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(**_JIT)
def _q6k_block(x, out):
    """One super-block: x 256 floats -> out 210 bytes (ql[128], qh[64], scales[16], d)."""
    L = np.empty(256, np.int64)
    scales = np.empty(16, _F32)
    max_scale = F0
    max_abs = F0
    for ib in range(16):
        s = _fit_q6k(x[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16])
        scales[ib] = s
        a = abs(s)
        if a > max_abs:
            max_abs = a
            max_scale = s
    if max_abs < GROUP_MAX_EPS:
        for i in range(210):
            out[i] = 0
        return
    iscale = F_M128 / max_scale
    d_all = _store_f16(out, 208, F1 / iscale)
    for ib in range(16):
        v = min(nearest_int(iscale * scales[ib]), 127) & 0xFF
        out[192 + ib] = np.uint8(v)
    for j in range(16):
        sc = np.int64(out[192 + j])
        sc = sc - 256 if sc > 127 else sc
        d = d_all * _F32(sc)
        if d == F0:
            continue   # keep the fit's codes, as ggml does
        for i in range(16):
            L[16 * j + i] = _clamp(nearest_int(x[16 * j + i] / d), -32, 31) + 32
    for h in range(2):
        e = 128 * h
        for l in range(32):
            a0 = L[e + l]
            a1 = L[e + l + 32]
            a2 = L[e + l + 64]
            a3 = L[e + l + 96]
            out[64 * h + l] = np.uint8((a0 & 0x0F) | ((a2 & 0x0F) << 4))
            out[64 * h + 32 + l] = np.uint8((a1 & 0x0F) | ((a3 & 0x0F) << 4))
            out[128 + 32 * h + l] = np.uint8((a0 >> 4) | ((a1 >> 4) << 2) | ((a2 >> 4) << 4) | ((a3 >> 4) << 6))


@pjit(**_JIT)
def _q6k_quantize(x, q):
    nb = x.shape[1] // 256
    for r in prange(x.shape[0]):
        for b in range(nb):
            _q6k_block(x[r, 256 * b:256 * b + 256], q[r, 210 * b:210 * b + 210])


@pjit(**_JIT)
def _q6k_dequantize(q, y):
    n, k = y.shape
    for r in prange(n):
        for b in range(k // 256):
            blk = q[r, 210 * b:210 * b + 210]
            d = _load_f16(blk, 208)
            for h in range(2):
                yo = 256 * b + 128 * h
                for l in range(32):
                    lo0 = np.int64(blk[64 * h + l])
                    lo1 = np.int64(blk[64 * h + 32 + l])
                    hb = np.int64(blk[128 + 32 * h + l])
                    for i in range(4):
                        c = ((lo0 if i % 2 == 0 else lo1) >> (4 * (i // 2))) & 0x0F
                        c = (c | (((hb >> (2 * i)) & 3) << 4)) - 32
                        sc = np.int64(blk[192 + 8 * h + 2 * i + l // 16])
                        sc = sc - 256 if sc > 127 else sc
                        y[r, yo + 32 * i + l] = d * _F32(sc) * _F32(c)


# ---------------------------------------------------------------- iq4_nl
@njit(inline="always", **_JIT)
def _iq4nl_index(v):
    """ggml best_index_int8 on the iq4_nl table (exact midpoint -> upper entry, NaN -> 15)."""
    if v <= IQ4NL_VALUES[0]:
        return 0
    if v >= IQ4NL_VALUES[15]:
        return 15
    lo = 0
    hi = 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if v < IQ4NL_VALUES[mid]:
            hi = mid
        else:
            lo = mid
    return hi - 1 if v - IQ4NL_VALUES[hi - 1] < IQ4NL_VALUES[hi] - v else hi


@njit(**_JIT)
def _iq4nl_sums(x, idv):
    a = F0
    b = F0
    for j in range(32):
        qv = IQ4NL_VALUES[_iq4nl_index(idv * x[j])]
        w = x[j] * x[j]
        a += w * qv * x[j]
        b += w * qv * qv
    return a, b


@njit(**_JIT)
def _iq4nl_block(x, out):
    """quantize_iq4_nl without imatrix (ntry = 7, weights x^2) on one block of 32."""
    amax = F0
    mx = F0
    for j in range(32):
        ax = abs(x[j])
        if ax > amax:
            amax = ax
            mx = x[j]
    d = F0
    if not (amax < GROUP_MAX_EPS):
        d = -mx / IQ4NL_VALUES[0]
        sumqx, sumq2 = _iq4nl_sums(x, F1 / d)
        d = sumqx / sumq2 if sumq2 > F0 else F0
        best = d * sumqx
        for t in range(-7, 8):
            sumqx, sumq2 = _iq4nl_sums(x, _F32(t + IQ4NL_V0) / mx)
            if sumq2 > F0 and sumqx * sumqx > best * sumq2:
                d = sumqx / sumq2
                best = d * sumqx
        if d != d:  # x^2 overflowed (|x| beyond ~1.8e19): x86's NaN on every CPU, as ref
            d = u32_as_f32(np.uint32(0xFFC00000))
    _store_f16(out, 0, d)
    idv = F1 / d if d != F0 else F0     # the unrounded d; all-zero blocks give code 8
    for j in range(16):
        out[2 + j] = np.uint8(_iq4nl_index(idv * x[j]) | (_iq4nl_index(idv * x[j + 16]) << 4))


@pjit(**_JIT)
def _iq4nl_quantize(x, q):
    nb = x.shape[1] // 32
    for r in prange(x.shape[0]):
        for b in range(nb):
            _iq4nl_block(x[r, 32 * b:32 * b + 32], q[r, 18 * b:18 * b + 18])


# ---------------------------------------------------------------- entry points
quantize_q4_k = _ggml_quantizer(_q4k_quantize, 144, 256)
quantize_q6_k = _ggml_quantizer(_q6k_quantize, 210, 256)
quantize_iq4_nl = _ggml_quantizer(_iq4nl_quantize, 18)
dequantize_q4_k = _ggml_dequantizer(_q4k_dequantize, 144, 256)
dequantize_q6_k = _ggml_dequantizer(_q6k_dequantize, 210, 256)
for _f, _name in ((quantize_q4_k, "quantize_q4_k"), (quantize_q6_k, "quantize_q6_k"),
                  (quantize_iq4_nl, "quantize_iq4_nl"), (dequantize_q4_k, "dequantize_q4_k"),
                  (dequantize_q6_k, "dequantize_q6_k")):
    _f.__name__ = _f.__qualname__ = _name


QUANTIZE = {"q4_k": quantize_q4_k, "q6_k": quantize_q6_k, "iq4_nl": quantize_iq4_nl}
DEQUANTIZE = {"q4_k": dequantize_q4_k, "q6_k": dequantize_q6_k}
