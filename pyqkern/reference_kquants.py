"""NumPy specification of the ggml super-block formats q4_k, q6_k and of iq4_nl quantize.

These follow llama.cpp's ``ggml/src/ggml-quants.c`` as it runs without an importance matrix
(the algorithms are re-stated here, not copied):

``q4_k``   ``quantize_row_q4_K_ref``: per 32-element sub-block a weighted asymmetric 4-bit fit
           (``make_qkx2_quants``, weights ``sqrt(mean(x^2)) + |x|``, 21 candidate grids), the
           eight scales and mins quantized to 6 bits against ``d = max_scale/63`` and
           ``dmin = max_min/63`` (fp16), then the codes re-derived from the stored scales.
``q6_k``   ``quantize_row_q6_K_ref``: per 16-element sub-block a symmetric 6-bit fit
           (``make_qx_quants`` with ``nmax = 32``, ``rmse_type = 1``: weights ``x^2``, 18
           extra candidate scales), scales quantized to int8 against ``d = max_scale/-128``.
``iq4_nl`` ``quantize_iq4_nl`` without imatrix: what llama-quantize runs (a search over 15
           candidate scales, ``ntry = 7``, weights ``x^2``). ggml's ``quantize_row_iq4_nl_ref``
           (no search) is only its from_float hook; the model files people use come from
           ``quantize_iq4_nl``, so its bytes are the ones to reproduce.

Bit-identical to ``csrc/kernels/ref/kquants.cpp`` (and so to llama.cpp): all arithmetic is
float32 in the C code's order without fused multiply-add. Vectorised over (sub-)blocks; every
sum runs left to right with ``np.add.accumulate`` (never ``np.sum``, which is pairwise).
"""
from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_IQ4NL_F = IQ4NL_VALUES.astype(F32)


# ---------------------------------------------------------------- scalar semantics, vectorised
def nearest_int(v):
    """ggml's nearest_int: add 1.5*2^23 in float32 and read the mantissa bits (round half to
    even for |v| <= 2^22; the same bit pattern as the C code outside that range)."""
    t = (np.asarray(v, dtype=F32) + F32(12582912.0)).astype(F32)
    return (t.view(np.int32).astype(np.int64) & 0x007FFFFF) - 0x00400000


def seq_sum(a):
    """Sum over the last axis in float32, left to right from +0.0 (C: ``s = 0; s += a[i]``)."""
    a = np.asarray(a, dtype=F32)
    z = np.zeros(a.shape[:-1] + (1,), dtype=F32)
    return np.add.accumulate(np.concatenate([z, a], axis=-1), axis=-1, dtype=F32)[..., -1]


def seq_sum_from_first(a):
    """Sum over the last axis in float32 starting from the first element (no leading +0.0)."""
    return np.add.accumulate(np.asarray(a, dtype=F32), axis=-1, dtype=F32)[..., -1]


def abs_argmax_value(x):
    """Per row, the element of largest |x| (first one on ties) and that |x| (C: strict ``>``
    starting from 0; when every |x| is 0 the value is never used)."""
    a = np.abs(x)
    i = a.argmax(axis=-1)
    return np.take_along_axis(x, i[..., None], -1)[..., 0], np.take_along_axis(a, i[..., None], -1)[..., 0]


def f16_round(v):
    """float32 -> (fp16 bits as uint16, the fp16 value back as float32); round to nearest even."""
    h = np.asarray(v, dtype=F32).astype(np.float16)
    return h.view(np.uint16), h.astype(F32)


def u16_bytes(h):
    """uint16 [..., m] -> uint8 [..., 2m] little-endian"""
    h = np.ascontiguousarray(h, dtype="<u2")
    return h.view(np.uint8).reshape(h.shape[:-1] + (h.shape[-1] * 2,))


def iq4nl_index(v):
    """ggml best_index_int8 on the iq4_nl table: clamp at the ends, nearest entry, an exact
    midpoint to the upper entry (``v - lo < hi - v`` in float32), NaN -> 15."""
    v = np.asarray(v, dtype=F32)
    mu = np.clip((v[..., None] >= _IQ4NL_F).sum(axis=-1), 1, 15)
    lo, hi = _IQ4NL_F[mu - 1], _IQ4NL_F[mu]
    idx = np.where((v - lo) < (hi - v), mu - 1, mu)
    idx = np.where(v <= _IQ4NL_F[0], 0, np.where(v >= _IQ4NL_F[15], 15, idx))
    return np.where(np.isnan(v), 15, idx).astype(np.uint8)


def _where_nz(d, num):
    """num / d where d is nonzero, else 0 (C: ``d ? num/d : 0``)."""
    return np.where(d != 0, num / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)


# ---------------------------------------------------------------- q4_k
def fit_q4k(x, w):
    """make_qkx2_quants(32, 15, x, w, L, &the_min, Laux, -1, 0.1, 20, false) on rows of x [M, 32].

    Returns (scale [M], the_min [M] (= -min, >= 0), L uint8 [M, 32])."""
    nmax = 15
    lo = x.min(axis=1)          # the sign of a zero min never reaches the output bytes
    hi = x.max(axis=1)
    lo = np.where(lo > 0, F32(0), lo).astype(F32)
    sum_w = seq_sum_from_first(w)
    sum_x = seq_sum_from_first(w * x)
    same = hi == lo             # constant block: L = 0, scale 0, min = the value (or 0)
    lo0 = lo

    def grid(iscale):           # ggml uses the current best min here, not the block's min
        return np.clip(nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)

    iscale = (F32(nmax) / (hi - lo)).astype(F32)
    scale = (F32(1) / iscale).astype(F32)
    L = grid(iscale)
    diff = (scale[:, None] * L.astype(F32) + lo[:, None]) - x
    best = seq_sum(w * (diff * diff))
    for step in range(21):
        iscale = ((F32(-1) + F32(0.1) * F32(step) + F32(nmax)) / (hi - lo)).astype(F32)
        la = grid(iscale)
        lf = la.astype(F32)
        wl = w * lf
        sl, sl2, sxl = seq_sum(wl), seq_sum(wl * lf), seq_sum(wl * x)
        det = sum_w * sl2 - sl * sl
        ok = det > 0
        dd = np.where(ok, det, F32(1))
        s = ((sum_w * sxl - sum_x * sl) / dd).astype(F32)
        m = ((sl2 * sum_x - sl * sxl) / dd).astype(F32)
        pos = m > 0
        m = np.where(pos, F32(0), m).astype(F32)
        s = np.where(pos, sxl / sl2, s).astype(F32)
        diff = (s[:, None] * lf + m[:, None]) - x
        err = seq_sum(w * (diff * diff))
        upd = ok & (err < best)
        L = np.where(upd[:, None], la, L)
        best = np.where(upd, err, best)
        scale = np.where(upd, s, scale).astype(F32)
        lo = np.where(upd, m, lo).astype(F32)
    L = np.where(same[:, None], 0, L)
    scale = np.where(same, F32(0), scale).astype(F32)
    lo = np.where(same, lo0, lo).astype(F32)
    return scale, (-lo).astype(F32), L.astype(np.uint8)


def _q4k_scales_pack(ls, lm):
    """ls, lm uint8 [nb, 8] (6-bit) -> the 12-byte scales field [nb, 12]."""
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return out


def q4k_scales_unpack(sc):
    """12-byte scales field [nb, 12] -> (scales, mins) uint8 [nb, 8] (ggml get_scale_min_k4)."""
    s = np.empty((sc.shape[0], 8), dtype=np.uint8)
    m = np.empty((sc.shape[0], 8), dtype=np.uint8)
    s[:, :4] = sc[:, 0:4] & 63
    m[:, :4] = sc[:, 4:8] & 63
    s[:, 4:] = (sc[:, 8:12] & 0x0F) | ((sc[:, 0:4] >> 6) << 4)
    m[:, 4:] = (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)
    return s, m


def quantize_q4_k(x, group=0, sym=0):
    n, k = x.shape
    with np.errstate(all="ignore"):
        xs = np.ascontiguousarray(x, dtype=F32).reshape(-1, 32)       # sub-blocks
        nb = xs.shape[0] // 8
        av_x = np.sqrt(seq_sum(xs * xs) / F32(32)).astype(F32)
        w = (av_x[:, None] + np.abs(xs)).astype(F32)
        scales, mins, L = fit_q4k(xs, w)
        scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
        max_scale = np.zeros(nb, F32)
        max_min = np.zeros(nb, F32)
        for j in range(8):   # strict '>' from 0: NaN never wins
            max_scale = np.where(scales[:, j] > max_scale, scales[:, j], max_scale)
            max_min = np.where(mins[:, j] > max_min, mins[:, j], max_min)
        inv_scale = _where_nz(np.where(max_scale > 0, max_scale, F32(0)), F32(63))
        inv_min = _where_nz(np.where(max_min > 0, max_min, F32(0)), F32(63))
        # ggml keeps nearest_int(.) in a uint8_t, then MIN(63, .)
        ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
        lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
        d16, d = f16_round(max_scale / F32(63))
        m16, dmin = f16_round(max_min / F32(63))
        # codes against the stored scales; a sub-block whose scale is 0 keeps the fit's codes
        dj = (d[:, None] * ls.astype(F32)).reshape(-1)
        dm = (dmin[:, None] * lm.astype(F32)).reshape(-1)
        redo = np.clip(nearest_int((xs + dm[:, None]) / dj[:, None]), 0, 15)
        L = np.where((dj == 0)[:, None], L, redo).astype(np.uint8).reshape(nb, 4, 64)
    qs = (L[:, :, :32] | (L[:, :, 32:] << 4)).reshape(nb, 128)
    blocks = np.concatenate([u16_bytes(d16[:, None]), u16_bytes(m16[:, None]), _q4k_scales_pack(ls, lm), qs], axis=1)
    return blocks.reshape(n, -1), _empty(n), _empty(n)


def dequantize_q4_k(q, s, z, k, group=0, sym=0):
    n = q.shape[0]
    b = np.ascontiguousarray(q).reshape(-1, 144)
    d = b[:, 0:2].copy().view(np.float16).astype(F32)
    dmin = b[:, 2:4].copy().view(np.float16).astype(F32)
    sc, m = q4k_scales_unpack(b[:, 4:16])
    qs = b[:, 16:].reshape(-1, 4, 1, 32)
    c = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32).astype(F32)
    with np.errstate(invalid="ignore", over="ignore"):   # inf fields: inf * 0 = NaN, as in C
        dd = (d * sc.astype(F32))[:, :, None]                   # [nb, 8, 1]
        dm = (dmin * m.astype(F32))[:, :, None]
        return (dd * c - dm).astype(F32).reshape(n, k)


# ---------------------------------------------------------------- q6_k
def fit_q6k(x):
    """make_qx_quants(16, 32, x, L, 1, NULL) on rows of x [M, 16] -> (scale [M], L uint8 [M, 16])."""
    nmax = 32
    mx, amax = abs_argmax_value(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx).astype(F32)
    w = x * x
    wx = w * x

    def sums(iscale):
        l = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = l.astype(F32)
        return l, seq_sum(wx * lf), seq_sum(w * lf * lf)

    l, sumlx, suml2 = sums((F32(-nmax) / mx).astype(F32))
    L = l + nmax
    scale = _where_nz(suml2, sumlx)
    best = scale * sumlx
    for t in range(-9, 10):
        if t == 0:
            continue
        iscale = (-(F32(nmax) + F32(0.1) * F32(t)) / mx).astype(F32)
        l, sumlx, suml2 = sums(iscale)
        upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(upd[:, None], l + nmax, L)
        scale = np.where(upd, sumlx / np.where(upd, suml2, F32(1)), scale).astype(F32)
        best = np.where(upd, scale * sumlx, best).astype(F32)
    L = np.where(zero[:, None], 0, L)
    scale = np.where(zero, F32(0), scale).astype(F32)
    return scale, L.astype(np.uint8)


def quantize_q6_k(x, group=0, sym=0):
    n, k = x.shape
    with np.errstate(all="ignore"):
        xs = np.ascontiguousarray(x, dtype=F32).reshape(-1, 16)
        nb = xs.shape[0] // 16
        scales, L = fit_q6k(xs)
        scales = scales.reshape(nb, 16)
        max_scale = np.zeros(nb, F32)
        max_abs = np.zeros(nb, F32)
        for j in range(16):
            a = np.abs(scales[:, j])
            upd = a > max_abs
            max_abs = np.where(upd, a, max_abs)
            max_scale = np.where(upd, scales[:, j], max_scale)
        zero = max_abs < GROUP_MAX_EPS
        iscale = (F32(-128) / np.where(zero, F32(1), max_scale)).astype(F32)
        d16, d = f16_round(F32(1) / iscale)
        sc = (np.minimum(nearest_int(iscale[:, None] * scales), 127) & 0xFF).astype(np.uint8)
        dj = (d[:, None] * sc.view(np.int8).astype(F32)).reshape(-1)
        redo = np.clip(nearest_int(xs / dj[:, None]), -32, 31) + 32
        L = np.where((dj == 0)[:, None], L, redo).astype(np.uint8).reshape(nb, 2, 4, 32)
    lo4 = L & 0x0F
    ql = np.concatenate([lo4[:, :, 0] | (lo4[:, :, 2] << 4), lo4[:, :, 1] | (lo4[:, :, 3] << 4)], axis=2)  # [nb, 2, 64]
    qh = L[:, :, 0] >> 4 | (L[:, :, 1] >> 4) << 2 | (L[:, :, 2] >> 4) << 4 | (L[:, :, 3] >> 4) << 6  # [nb, 2, 32]
    blocks = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc, u16_bytes(d16[:, None])], axis=1)
    blocks[zero] = 0
    return blocks.reshape(n, -1), _empty(n), _empty(n)


def dequantize_q6_k(q, s, z, k, group=0, sym=0):
    n = q.shape[0]
    b = np.ascontiguousarray(q).reshape(-1, 210)
    ql = b[:, :128].reshape(-1, 2, 1, 64)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    sc = b[:, 192:208].copy().view(np.int8).astype(F32)
    d = b[:, 208:210].copy().view(np.float16).astype(F32)
    lo = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 2, 4, 32)      # elements 32i + l
    hi = np.concatenate([qh, qh >> 2, qh >> 4, qh >> 6], axis=2) & 3
    c = ((lo | (hi << 4)).astype(np.int16) - 32).astype(F32).reshape(-1, 16, 16)
    with np.errstate(invalid="ignore", over="ignore"):
        return ((d * sc)[:, :, None] * c).astype(F32).reshape(n, k)


# ---------------------------------------------------------------- iq4_nl
def quantize_iq4_nl(x, group=0, sym=0):
    """quantize_iq4_nl(..., quant_weights=NULL): ntry = 7, weights x^2, one block of 32."""
    n, k = x.shape
    ntry = 7
    with np.errstate(all="ignore"):
        b = np.ascontiguousarray(x, dtype=F32).reshape(-1, 32)
        mx, amax = abs_argmax_value(b)
        zero = amax < GROUP_MAX_EPS
        mx = np.where(zero, F32(1), mx).astype(F32)
        w = b * b

        def sums(idv):
            qv = _IQ4NL_F[iq4nl_index(idv[:, None] * b)]
            wq = w * qv
            return seq_sum(wq * b), seq_sum(wq * qv)

        d = ((-mx) / _IQ4NL_F[0]).astype(F32)
        sumqx, sumq2 = sums((F32(1) / d).astype(F32))
        d = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), F32(0)).astype(F32)
        best = d * sumqx
        for t in range(-ntry, ntry + 1):
            sumqx, sumq2 = sums((F32(t + int(IQ4NL_VALUES[0])) / mx).astype(F32))
            upd = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(upd, sumqx / np.where(upd, sumq2, F32(1)), d).astype(F32)
            best = np.where(upd, d * sumqx, best).astype(F32)
        # x^2 overflowed (|x| beyond ~1.8e19): inf / inf, a NaN with the CPU's sign bit; x86's
        d = np.where(np.isnan(d), np.uint32(0xFFC00000).view(F32), d)
        d = np.where(zero, F32(0), d).astype(F32)
        d16, _ = f16_round(d)
        idv = _where_nz(d, F32(1))        # codes against the unrounded d; all-zero blocks -> code 8
        c = iq4nl_index(idv[:, None] * b)
    qs = c[:, :16] | (c[:, 16:] << 4)
    blocks = np.concatenate([u16_bytes(d16[:, None]), qs], axis=1)
    return blocks.reshape(n, -1), _empty(n), _empty(n)


def _empty(n):
    return np.zeros((n, 0), dtype=np.uint8)


QUANTIZE = {"q4_k": quantize_q4_k, "q6_k": quantize_q6_k, "iq4_nl": quantize_iq4_nl}
DEQUANTIZE = {"q4_k": dequantize_q4_k, "q6_k": dequantize_q6_k}
