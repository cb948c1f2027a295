"""NumPy specification of every op: the oracle the native and Numba backends are tested against.

Row layout (shared by all backends): a quantized [N, K] tensor is up to three uint8 arrays,
``q`` [N, rq] (codes or ggml block bytes), ``s`` [N, rs] (scales), ``z`` [N, rz] (zero points);
see :mod:`pyqkern._formats`. Each format has
``quantize_<fmt>(x, group, sym) -> (q, s, z)`` and ``dequantize_<fmt>(q, s, z, k, group, sym) -> y``,
collected in :data:`QUANTIZE` / :data:`DEQUANTIZE`.

Written for clarity, vectorised over blocks; all float arithmetic is float32 with the same
operation order as the C++ reference (no fused multiply-add), so results are bit-identical.
"""
from __future__ import annotations

import math

import numpy as np

F32 = np.float32

NF4_CODE = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0], dtype=F32)
NF4_MID = ((NF4_CODE[:-1] + NF4_CODE[1:]) * F32(0.5)).astype(F32)
# bitsandbytes FP4 in bit-pattern order (bit 3 = sign): raw {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12 in fp32
FP4_CODE = (np.array([0.0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3], F32)
            / F32(12)).astype(F32)
FP4_MAG_CODE = np.array([0, 1, 6, 7, 4, 5, 2, 3], np.uint8)  # codes of the magnitudes in ascending order
FP4_MAG = FP4_CODE[FP4_MAG_CODE]
FP4_MID = ((FP4_MAG[:-1] + FP4_MAG[1:]) * F32(0.5)).astype(F32)
FP4_MIN_ABSMAX = F32(1e-38)   # the fp4 / nf4 quantizers' reciprocal uses max(absmax, 1e-38), as bitsandbytes does
IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)

def _empty(n):
    return np.zeros((n, 0), dtype=np.uint8)


# ---------------------------------------------------------------- scalar semantics, vectorised
def cvtt_i32(v):
    """float32 -> int32 truncation with x86 semantics: NaN/out of range -> INT32_MIN."""
    v = np.asarray(v, dtype=F32)
    ok = (v > F32(-2147483904.0)) & (v < F32(2147483648.0))
    with np.errstate(invalid="ignore"):
        out = np.where(ok, np.trunc(np.where(ok, v, 0)), 0).astype(np.int64)
    return np.where(ok, out, np.iinfo(np.int32).min).astype(np.int64)


def round_away(v):
    """C roundf (half away from zero) in float32."""
    v = np.asarray(v, dtype=F32)
    with np.errstate(invalid="ignore"):
        t = np.trunc(v)
        d = v - t
        t = np.where(d >= F32(0.5), t + F32(1), np.where(d <= F32(-0.5), t - F32(1), t))
    return t.astype(F32)


def low_byte(i):
    return (np.asarray(i, dtype=np.int64) & 0xFF).astype(np.uint8)


def f16_bytes(v):
    """float32 values -> their IEEE half bytes (round to nearest even), last axis x2."""
    v = np.asarray(v, dtype=F32)
    with np.errstate(over="ignore"):
        h = v.astype(np.float16)
    return h.reshape(v.shape + (1,)).view(np.uint8).reshape(v.shape[:-1] + (v.shape[-1] * 2,))


def f16_values(b):
    """uint8 [..., 2m] -> float32 [..., m]"""
    b = np.ascontiguousarray(b)
    return b.view(np.float16).astype(F32)


def _pack_split_halves(codes):
    """[nb, 32] codes -> [nb, 16] bytes: byte j = code j (low) | code j+16 (high)."""
    return (codes[:, :16] | (codes[:, 16:] << 4)).astype(np.uint8)


def _unpack_split_halves(qs):
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


# ---------------------------------------------------------------- ggml block-32 formats
def quantize_q4_0(x, group=0, sym=0):
    n, k = x.shape
    b = x.reshape(-1, 32).astype(F32)
    # llama.cpp keeps the first element whose |x| beats a running max that starts at +0.0, so an
    # all-zero block uses +0.0 (gguf's numpy takes element 0 and differs on all -0.0 blocks).
    imax = np.abs(b).argmax(axis=1)
    mx = b[np.arange(b.shape[0]), imax][:, None]
    mx = np.where(np.abs(mx) == 0, F32(0), mx).astype(F32)
    d = (mx / F32(-8)).astype(F32)
    with np.errstate(divide="ignore", over="ignore"):  # 1 / subnormal d: Inf, as ggml's 1.0f / d
        idv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)
    with np.errstate(invalid="ignore", over="ignore"):
        v = (b * idv + F32(8.5)).astype(F32)
    c = low_byte(cvtt_i32(v)).view(np.int8).astype(np.int32)
    c = np.clip(np.minimum(c, 15), 0, 15).astype(np.uint8)
    blocks = np.concatenate([f16_bytes(d), _pack_split_halves(c)], axis=1)
    return blocks.reshape(n, -1), _empty(n), _empty(n)


def dequantize_q4_0(q, s, z, k, group=0, sym=0):
    n = q.shape[0]
    b = q.reshape(-1, 18)
    d = f16_values(b[:, :2])
    c = _unpack_split_halves(b[:, 2:]).astype(np.int32) - 8
    return (c.astype(F32) * d).astype(F32).reshape(n, k)


def quantize_q4_1(x, group=0, sym=0):
    n, k = x.shape
    b = x.reshape(-1, 32).astype(F32)
    # the first element reaching the min / max, as llama.cpp's loop (decides the sign of a zero)
    rows = np.arange(b.shape[0])
    mn = b[rows, b.argmin(axis=1)][:, None]
    mx = b[rows, b.argmax(axis=1)][:, None]
    with np.errstate(over="ignore"):  # a range beyond float32: Inf, as ggml's float arithmetic
        d = ((mx - mn) / F32(15)).astype(F32)
    with np.errstate(divide="ignore", over="ignore"):  # 1 / subnormal d: Inf, as ggml's 1.0f / d
        idv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)
    with np.errstate(invalid="ignore", over="ignore"):
        v = ((b - mn) * idv + F32(0.5)).astype(F32)
    c = low_byte(cvtt_i32(v)).view(np.int8).astype(np.int32)
    c = np.clip(c, 0, 15).astype(np.uint8)
    blocks = np.concatenate([f16_bytes(d), f16_bytes(mn), _pack_split_halves(c)], axis=1)
    return blocks.reshape(n, -1), _empty(n), _empty(n)


def dequantize_q4_1(q, s, z, k, group=0, sym=0):
    n = q.shape[0]
    b = q.reshape(-1, 20)
    d = f16_values(b[:, 0:2])
    m = f16_values(b[:, 2:4])
    c = _unpack_split_halves(b[:, 4:]).astype(F32)
    return (d * c + m).astype(F32).reshape(n, k)


def quantize_q8_0(x, group=0, sym=0):
    n, k = x.shape
    b = x.reshape(-1, 32).astype(F32)
    d = (np.abs(b).max(axis=1, keepdims=True) / F32(127)).astype(F32)
    with np.errstate(divide="ignore", over="ignore"):  # 1 / subnormal d: Inf, as ggml's 1.0f / d
        idv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)
    with np.errstate(invalid="ignore", over="ignore"):
        v = (b * idv).astype(F32)
    c = low_byte(cvtt_i32(round_away(v)))
    blocks = np.concatenate([f16_bytes(d), c], axis=1)
    return blocks.reshape(n, -1), _empty(n), _empty(n)


def dequantize_q8_0(q, s, z, k, group=0, sym=0):
    n = q.shape[0]
    b = q.reshape(-1, 34)
    d = f16_values(b[:, :2])
    c = np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(F32)
    return (c * d).astype(F32).reshape(n, k)


def dequantize_iq4_nl(q, s, z, k, group=0, sym=0):
    n = q.shape[0]
    b = q.reshape(-1, 18)
    d = f16_values(b[:, :2])
    c = IQ4NL_VALUES[_unpack_split_halves(b[:, 2:])].astype(F32)
    return (d * c).astype(F32).reshape(n, k)


# ---------------------------------------------------------------- nf4 (bitsandbytes)
def bnb_recip(amax):
    """1 / max(absmax, 1e-38) in float32: bitsandbytes codes x * this, not x / absmax (fp4, nf4)"""
    return (F32(1) / np.maximum(amax, FP4_MIN_ABSMAX)).astype(F32)


def nf4_index(v):
    """Nearest NF4 code of v in [-1, 1]; an exact midpoint goes to the lower code."""
    return (v[..., None] > NF4_MID).sum(axis=-1).astype(np.uint8)


def quantize_nf4(x, group=64, sym=0):
    n, k = x.shape
    b = x.reshape(-1, group).astype(F32)
    amax = np.abs(b).max(axis=1, keepdims=True).astype(F32)
    idx = nf4_index((b * bnb_recip(amax)).astype(F32))
    idx = idx.reshape(n, k)
    q = ((idx[:, 0::2] << 4) | idx[:, 1::2]).astype(np.uint8)
    s = amax.reshape(n, -1).view(np.uint8).reshape(n, -1)
    return q, np.ascontiguousarray(s), _empty(n)


def _dequantize_bnb4(table, q, s, k, group):
    """bitsandbytes 4-bit layout (first element in the high nibble): table[code] * absmax."""
    n = q.shape[0]
    idx = np.empty((n, k), dtype=np.uint8)
    idx[:, 0::2] = q >> 4
    idx[:, 1::2] = q & 0x0F
    amax = np.ascontiguousarray(s).view(F32).reshape(n, -1)
    vals = table[idx].reshape(n, -1, group)
    return (vals * amax[:, :, None]).astype(F32).reshape(n, k)


def dequantize_nf4(q, s, z, k, group=64, sym=0):
    return _dequantize_bnb4(NF4_CODE, q, s, k, group)


# ---------------------------------------------------------------- fp4 (bitsandbytes)
def fp4_index(v):
    """FP4 code of v = x * (1 / absmax): sign bit 8 if v < 0; magnitude = nearest code magnitude by
    fp32 midpoints, an exact midpoint going to the smaller magnitude."""
    v = np.asarray(v, F32)
    mag = FP4_MAG_CODE[(np.abs(v)[..., None] > FP4_MID).sum(axis=-1)]
    return (mag | np.where(v < 0, np.uint8(8), np.uint8(0))).astype(np.uint8)


def quantize_fp4(x, group=64, sym=0):
    n, k = x.shape
    b = x.reshape(-1, group).astype(F32)
    amax = np.abs(b).max(axis=1, keepdims=True).astype(F32)
    idx = fp4_index((b * bnb_recip(amax)).astype(F32)).reshape(n, k)
    q = ((idx[:, 0::2] << 4) | idx[:, 1::2]).astype(np.uint8)
    s = amax.reshape(n, -1).view(np.uint8).reshape(n, -1)
    return q, np.ascontiguousarray(s), _empty(n)


def dequantize_fp4(q, s, z, k, group=64, sym=0):
    return _dequantize_bnb4(FP4_CODE, q, s, k, group)


# ---------------------------------------------------------------- int2/int3/int4 (GPTQ-style)
def intq_group_params(g, sym, maxq=15):
    """g: [groups, gs] float32 -> (scale as float32 after fp16 rounding, fp16 bytes, zero int).
    GPTQ's quantizer with maxq = 2^bits - 1 (sym: zero fixed at (maxq + 1) / 2)."""
    mn = np.minimum(g.min(axis=1), F32(0)).astype(F32)
    mx = np.maximum(g.max(axis=1), F32(0)).astype(F32)
    if sym:
        a = np.maximum(-mn, mx)
        mn, mx = -a, a
    both0 = (mn == 0) & (mx == 0)
    mn = np.where(both0, F32(-1), mn).astype(F32)
    mx = np.where(both0, F32(1), mx).astype(F32)
    with np.errstate(over="ignore"):  # a range beyond float32 (values near 3.4e38): Inf, clamped next
        scale = ((mx - mn) / F32(maxq)).astype(F32)
    scale = np.minimum(scale, F32(65504)).astype(F32)
    s16 = scale.astype(np.float16)
    sf = s16.astype(F32)
    if sym:
        zero = np.full(sf.shape, (maxq + 1) // 2, dtype=np.int64)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            zr = cvtt_i32(np.rint((-mn / sf).astype(F32)))
        zero = np.where(sf == 0, 0, np.clip(zr, 0, maxq))
    return sf, s16, zero


def int4_group_params(g, sym):
    return intq_group_params(g, sym, 15)


def pack_codes(c, bits):
    """Codes [N, K] (0 <= c < 2^bits) -> packed bytes [N, K*bits/8], low bits first (int4: element
    2i low nibble; int2: element 4i+t at bits 2t; int3: little-endian bit stream, element i at bit 3i)."""
    c = np.asarray(c).astype(np.uint32)
    n, k = c.shape
    if bits == 4:
        return (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)
    if bits == 2:
        return (c[:, 0::4] | (c[:, 1::4] << 2) | (c[:, 2::4] << 4) | (c[:, 3::4] << 6)).astype(np.uint8)
    if bits == 3:  # 8 codes -> 24 bits -> 3 bytes
        w = c.reshape(n, -1, 8)
        v = np.zeros(w.shape[:2], np.uint32)
        for i in range(8):
            v |= w[:, :, i] << (3 * i)
        out = np.stack([(v >> (8 * j)) & 0xFF for j in range(3)], axis=2)
        return out.astype(np.uint8).reshape(n, -1)
    raise ValueError(bits)


def unpack_codes(q, k, bits):
    """Inverse of pack_codes: bytes [N, K*bits/8] -> codes int32 [N, K]."""
    q = np.asarray(q).astype(np.uint32)
    n = q.shape[0]
    if bits == 4:
        c = np.empty((n, k), np.int32)
        c[:, 0::2] = q & 0x0F
        c[:, 1::2] = q >> 4
        return c
    if bits == 2:
        return np.stack([(q >> (2 * t)) & 3 for t in range(4)], axis=2).reshape(n, k).astype(np.int32)
    if bits == 3:
        b = q.reshape(n, -1, 3)
        v = b[:, :, 0] | (b[:, :, 1] << 8) | (b[:, :, 2] << 16)
        return np.stack([(v >> (3 * i)) & 7 for i in range(8)], axis=2).reshape(n, k).astype(np.int32)
    raise ValueError(bits)


def _quantize_intq(x, group, sym, bits):
    n, k = x.shape
    maxq = (1 << bits) - 1
    gs = k if group == -1 else group
    g = x.reshape(-1, gs).astype(F32)
    sf, s16, zero = intq_group_params(g, sym, maxq)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = cvtt_i32(np.rint((g / sf[:, None]).astype(F32)))
    c = np.where(sf[:, None] == 0, zero[:, None], r + zero[:, None])
    c = np.clip(c, 0, maxq).reshape(n, k)
    s = s16.reshape(n, -1).view(np.uint8).reshape(n, -1)
    z = _empty(n) if sym else zero.astype(np.uint8).reshape(n, -1)
    return pack_codes(c, bits), np.ascontiguousarray(s), z


def _dequantize_intq(q, s, z, k, group, sym, bits):
    n = q.shape[0]
    gs = k if group == -1 else group
    c = unpack_codes(q, k, bits)
    sf = np.ascontiguousarray(s).view(np.float16).astype(F32).reshape(n, -1)
    zero = np.full(sf.shape, 1 << (bits - 1), np.int32) if sym else z.astype(np.int32).reshape(n, -1)
    c = c.reshape(n, -1, gs) - zero[:, :, None]
    return (c.astype(F32) * sf[:, :, None]).astype(F32).reshape(n, k)


def quantize_int4(x, group=128, sym=0):
    return _quantize_intq(x, group, sym, 4)


def dequantize_int4(q, s, z, k, group=128, sym=0):
    return _dequantize_intq(q, s, z, k, group, sym, 4)


def quantize_int3(x, group=128, sym=0):
    return _quantize_intq(x, group, sym, 3)


def dequantize_int3(q, s, z, k, group=128, sym=0):
    return _dequantize_intq(q, s, z, k, group, sym, 3)


def quantize_int2(x, group=128, sym=0):
    return _quantize_intq(x, group, sym, 2)


def dequantize_int2(q, s, z, k, group=128, sym=0):
    return _dequantize_intq(q, s, z, k, group, sym, 2)


# ---------------------------------------------------------------- int8 (per channel)
def quantize_int8(x, group=0, sym=0):
    n, k = x.shape
    x = x.astype(F32)
    scale = (np.abs(x).max(axis=1) / F32(127)).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = cvtt_i32(np.rint((x / scale[:, None]).astype(F32)))
    c = np.where(scale[:, None] == 0, 0, np.clip(r, -127, 127)).astype(np.int8)
    return c.view(np.uint8), scale.reshape(n, 1).view(np.uint8).reshape(n, 4), _empty(n)


def dequantize_int8(q, s, z, k, group=0, sym=0):
    n = q.shape[0]
    scale = np.ascontiguousarray(s).view(F32).reshape(n, 1)
    return (np.ascontiguousarray(q).view(np.int8).astype(F32) * scale).astype(F32)


QUANTIZE = {
    "q4_0": quantize_q4_0, "q4_1": quantize_q4_1, "q8_0": quantize_q8_0,
    "nf4": quantize_nf4, "int4": quantize_int4, "int8": quantize_int8,
    "int2": quantize_int2, "int3": quantize_int3, "fp4": quantize_fp4,
}
DEQUANTIZE = {
    "q4_0": dequantize_q4_0, "q4_1": dequantize_q4_1, "q8_0": dequantize_q8_0,
    "iq4_nl": dequantize_iq4_nl, "nf4": dequantize_nf4, "int4": dequantize_int4, "int8": dequantize_int8,
    "int2": dequantize_int2, "int3": dequantize_int3, "fp4": dequantize_fp4,
}

# K-quants and iq4_nl quantize live in their own module
from .reference_kquants import DEQUANTIZE as _KD, QUANTIZE as _KQ  # noqa: E402

QUANTIZE.update(_KQ)
DEQUANTIZE.update(_KD)


# ---------------------------------------------------------------- matmul (the spec)
NF4_I8 = np.array([np.float32(np.rint(np.float32(127) * c)) for c in NF4_CODE], dtype=np.int32)
FP4_I8 = np.array([np.float32(np.rint(np.float32(127) * c)) for c in FP4_CODE], dtype=np.int32)
QBLK = 32


def decompose(fmt, q, s, z, k, group, sym):
    """Per row n and weight block b: w = a * (u - o) + m (see csrc/core/packed.h).

    Returns (blk, u int64 [N, K], a f32 [N, nb], o int64 [N, nb], m f32 [N, nb] or None).
    nf4 and fp4 use their code books rounded to 1/127 (the int8 path's only approximation)."""
    n = q.shape[0]
    if fmt in ("q4_0", "q4_1", "iq4_nl"):
        bs = 20 if fmt == "q4_1" else 18
        b = q.reshape(n, -1, bs)
        a = f16_values(np.ascontiguousarray(b[:, :, 0:2]).reshape(n, -1)).reshape(n, -1)
        qs = b[:, :, 4:] if fmt == "q4_1" else b[:, :, 2:]
        u = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, k).astype(np.int64)
        m = None
        if fmt == "q4_0":
            o = np.full(a.shape, 8, np.int64)
        elif fmt == "iq4_nl":
            u = IQ4NL_VALUES.astype(np.int64)[u] + 128
            o = np.full(a.shape, 128, np.int64)
        else:
            o = np.zeros(a.shape, np.int64)
            m = f16_values(np.ascontiguousarray(b[:, :, 2:4]).reshape(n, -1)).reshape(n, -1)
        return 32, u, a, o, m
    if fmt == "q8_0":
        b = q.reshape(n, -1, 34)
        a = f16_values(np.ascontiguousarray(b[:, :, 0:2]).reshape(n, -1)).reshape(n, -1)
        u = np.ascontiguousarray(b[:, :, 2:]).view(np.int8).reshape(n, k).astype(np.int64) + 128
        return 32, u, a, np.full(a.shape, 128, np.int64), None
    if fmt == "int8":
        sc = np.ascontiguousarray(s).view(F32).reshape(n, 1)
        a = np.repeat(sc, k // 32, axis=1).astype(F32)
        u = np.ascontiguousarray(q).view(np.int8).astype(np.int64) + 128
        return 32, u, a, np.full(a.shape, 128, np.int64), None
    if fmt in ("nf4", "fp4"):
        idx = np.empty((n, k), np.int64)
        idx[:, 0::2] = q >> 4
        idx[:, 1::2] = q & 0x0F
        amax = np.ascontiguousarray(s).view(F32).reshape(n, -1)
        a = np.repeat((amax / F32(127)).astype(F32), group // 32, axis=1)
        table = NF4_I8 if fmt == "nf4" else FP4_I8
        return 32, table[idx].astype(np.int64) + 128, a, np.full(a.shape, 128, np.int64), None
    if fmt in ("int2", "int3", "int4"):
        bits = int(fmt[3])
        gs = k if group == -1 else group
        u = unpack_codes(q, k, bits).astype(np.int64)
        sf = np.ascontiguousarray(s).view(np.float16).astype(F32).reshape(n, -1)
        zz = np.full(sf.shape, 1 << (bits - 1), np.int64) if sym else z.astype(np.int64).reshape(n, -1)
        rep = gs // 32
        return 32, u, np.repeat(sf, rep, axis=1), np.repeat(zz, rep, axis=1), None
    if fmt == "q4_k":
        b = q.reshape(n, -1, 144)
        nsb = b.shape[1]
        d = f16_values(np.ascontiguousarray(b[:, :, 0:2]).reshape(n, -1)).reshape(n, nsb, 1)
        dmin = f16_values(np.ascontiguousarray(b[:, :, 2:4]).reshape(n, -1)).reshape(n, nsb, 1)
        sc = b[:, :, 4:16].astype(np.int64)
        scale = np.empty((n, nsb, 8), np.int64)
        mins = np.empty((n, nsb, 8), np.int64)
        scale[:, :, :4] = sc[:, :, 0:4] & 63
        mins[:, :, :4] = sc[:, :, 4:8] & 63
        scale[:, :, 4:] = (sc[:, :, 8:12] & 0xF) | ((sc[:, :, 0:4] >> 6) << 4)
        mins[:, :, 4:] = (sc[:, :, 8:12] >> 4) | ((sc[:, :, 4:8] >> 6) << 4)
        qs = b[:, :, 16:].reshape(n, nsb, 4, 32)
        u = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k).astype(np.int64)
        a = (d * scale.astype(F32)).astype(F32).reshape(n, -1)
        m = (-(dmin * mins.astype(F32))).astype(F32).reshape(n, -1)
        return 32, u, a, np.zeros(a.shape, np.int64), m
    if fmt == "q6_k":
        b = q.reshape(n, -1, 210)
        nsb = b.shape[1]
        ql = b[:, :, :128].reshape(n, nsb, 2, 64)
        qh = b[:, :, 128:192].reshape(n, nsb, 2, 32)
        sc = np.ascontiguousarray(b[:, :, 192:208]).view(np.int8).astype(F32)
        d = f16_values(np.ascontiguousarray(b[:, :, 208:210]).reshape(n, -1)).reshape(n, nsb, 1)
        lo = np.concatenate([ql[..., :32] & 0xF, ql[..., 32:] & 0xF, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=3)
        hi = np.concatenate([qh & 3, (qh >> 2) & 3, (qh >> 4) & 3, (qh >> 6) & 3], axis=3)
        u = (lo | (hi << 4)).reshape(n, k).astype(np.int64)
        a = (d * sc).astype(F32).reshape(n, -1)
        return 16, u, a, np.full(a.shape, 32, np.int64), None
    raise ValueError(fmt)


def quantize_activations(x):
    """x f32 [M, K] -> (xq int8 [M, K], dx f32 [M, K/32]): dx = amax/127, xq = rint(x / dx).

    Division (not x * (1/dx)): 1/dx overflows for subnormal dx, x/dx cannot since |x| <= amax."""
    mm, k = x.shape
    b = x.reshape(mm, -1, QBLK).astype(F32)
    d = (np.abs(b).max(axis=2) / F32(127)).astype(F32)
    v = np.rint((b / np.where(d != 0, d, F32(1))[:, :, None]).astype(F32))
    xq = np.clip(v, -127, 127).astype(np.int8).reshape(mm, k)
    return xq, d


def _max_abs(v):
    v = np.abs(np.asarray(v, F32))
    return float("inf") if np.isnan(v).any() else float(v.max(initial=0.0))


def int8_x_exp_limit(fmt, q, s, z, k, group, sym):
    """The exponent field every |x| must stay below for compute="int8" (core/matmul.cpp's
    int8_x_exp_limit, from the same largest |a| and |m|): the fp32 products a * dx and m * dx *
    block sum, and each block's term, stay finite, so no Inf * 0 makes NaN of a finite result."""
    _, _, a, o, m = decompose(fmt, q, s, z, k, group, sym)
    return _int8_x_exp_limit(fmt, q, a, o, m)


def _int8_x_exp_limit(fmt, q, a, o, m):
    """int8_x_exp_limit from decompose's parameters (and q for the K-quants' super-block factors)."""
    n = a.shape[0]
    if fmt in ("q4_k", "q6_k"):  # two-level: the super-block factor times 128 (a bound), as packed
        b = q.reshape(n, -1, 144 if fmt == "q4_k" else 210)
        at = slice(0, 2) if fmt == "q4_k" else slice(208, 210)
        max_a = _max_abs(f16_values(np.ascontiguousarray(b[:, :, at]).reshape(n, -1))) * 128
        max_m = _max_abs(f16_values(np.ascontiguousarray(b[:, :, 2:4]).reshape(n, -1))) * 128 \
            if fmt == "q4_k" else 0.0
        max_a, max_m = float(F32(max_a)), float(F32(max_m))
    else:
        max_a, max_m = _max_abs(a), (_max_abs(m) if m is not None else 0.0)
    if not (np.isfinite(max_a) and np.isfinite(max_m)):
        return 1
    plain4 = fmt in ("q4_0", "q4_1", "q4_k", "int2", "int3", "int4") and int(np.max(o, initial=0)) <= 16
    bits = 16 if plain4 else 20
    e = 249 if m is not None else 255
    if max_a > 0:
        e = min(e, 261 - bits - math.frexp(max_a)[1])
    if max_m > 0:
        e = min(e, 250 - math.frexp(max_m)[1])
    return max(e, 1)


def check_int8_x(x, e):
    """ValueError, as the native int8 path raises, if a row of x holds NaN / Inf or a value whose
    exponent field is e or more."""
    ex = (np.ascontiguousarray(x, F32).view(np.uint32) >> 23) & 0xFF
    bad = np.flatnonzero((ex >= e).any(axis=1))
    if bad.size:
        r = int(bad[0])
        if (ex[r] == 0xFF).any():
            raise ValueError(f"x contains NaN or Inf (row {r}); compute=int8 cannot quantize it; use compute=float")
        if e == 1:  # _int8_x_exp_limit's answer for a weight with Inf / NaN scales (finite ones give >= 113)
            raise ValueError("the weight has Inf or NaN scales (values beyond the format's range when quantized); "
                             "compute=int8 cannot use them; use compute=float")
        raise ValueError(f"x has values of magnitude 2^{e - 127} or more (row {r}): with this weight's scales "
                         "compute=int8's fp32 products could overflow; use compute=float")


def matmul_int8(x, fmt, q, s, z, n, k, group, sym, bias=None):
    """The int8-compute result, exactly as every native variant computes it (and the same errors
    for x it refuses: check_int8_x)."""
    blk, u, a, o, m = decompose(fmt, q, s, z, k, group, sym)
    check_int8_x(np.asarray(x, F32), _int8_x_exp_limit(fmt, q, a, o, m))
    xq, dx = quantize_activations(np.asarray(x, F32))
    xq64 = xq.astype(np.int64)
    mm = x.shape[0]
    acc = np.zeros((mm, n), F32)
    for b in range(k // blk):
        sl = slice(b * blk, (b + 1) * blk)
        xs = xq64[:, sl].sum(axis=1)                                   # [M]
        isum = xq64[:, sl] @ u[:, sl].T - xs[:, None] * o[None, :, b]  # [M, N] exact
        d = dx[:, (b * blk) // QBLK]
        da = (a[None, :, b] * d[:, None]).astype(F32)
        acc = (acc + (isum.astype(F32) * da).astype(F32)).astype(F32)
        if m is not None:
            mx = (d * xs.astype(F32)).astype(F32)
            acc = (acc + (m[None, :, b] * mx[:, None]).astype(F32)).astype(F32)
    if bias is not None:
        acc = (acc + np.asarray(bias, F32)[None, :]).astype(F32)
    return acc


def matmul_float(x, w_deq, bias=None):
    """compute="float": x @ dequantize(W).T in float32 (BLAS order; error bound in the docs)."""
    y = np.asarray(x, F32) @ w_deq.T
    if bias is not None:
        y = y + np.asarray(bias, F32)
    return y.astype(F32)
