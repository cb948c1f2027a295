"""Numba kernels for the block formats q4_0, q4_1, q8_0, iq4_nl (dequantize), nf4, fp4, int2/3/4, int8.

Same contracts and the same bits as :mod:`pyqkern.reference` and ``csrc/kernels/ref``:

- every float operation is float32, in the C++ reference's order, with no fused
  multiply-add (Numba does not contract without ``fastmath``). Constants are ``np.float32``
  module globals, which Numba freezes as float32: a bare Python literal would promote the
  expression to float64.
- float -> int conversions follow ``csrc/kernels/common.h`` exactly: x86 ``cvttss2si``
  ("integer indefinite" INT32_MIN for NaN and out-of-range, whose low byte is what ggml
  stores), C ``roundf`` for q8_0, round half to even elsewhere. These are written out with
  an explicit range check, never left to LLVM's ``fptosi`` (poison when out of range).
- fp16 <-> fp32 use integer bit manipulation (round to nearest even, overflow to inf), so
  they do not depend on Numba's float16 support.

Each kernel takes the whole [N, K] problem and runs rows in parallel (``prange``); a row is
computed by one thread from its own inputs only, so results do not depend on the thread count.
Multi-byte fields are written and read byte by byte, little-endian, as the formats define them.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ._par import pjit

_F32 = np.float32
_JIT = dict(cache=True, nogil=True, error_model="numpy")

F0 = _F32(0.0)
F1 = _F32(1.0)
F_HALF = _F32(0.5)
F_M_HALF = _F32(-0.5)
F_M8 = _F32(-8.0)
F8_5 = _F32(8.5)
F15 = _F32(15.0)
F127 = _F32(127.0)
F65504 = _F32(65504.0)
F_M1 = _F32(-1.0)
F_2M24 = _F32(5.9604644775390625e-08)  # 2^-24
# cvttss2si is defined on (-2^31 - 256, 2^31): the float32 neighbours of the int32 range
F_I32_LO = _F32(-2147483904.0)
F_I32_HI = _F32(2147483648.0)
INT32_MIN = -2147483648

NF4_CODE = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0], dtype=_F32)
NF4_MID = ((NF4_CODE[:-1] + NF4_CODE[1:]) * _F32(0.5)).astype(_F32)  # fp32 midpoints, as in C++
IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                        dtype=_F32)
# bitsandbytes FP4, bit-pattern order (bit 3 = sign); see csrc/kernels/common.h kFP4
FP4_CODE = (np.array([0.0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3], _F32)
            / _F32(12)).astype(_F32)
FP4_MAG_CODE = np.array([0, 1, 6, 7, 4, 5, 2, 3], np.int64)
_FP4_MAG = FP4_CODE[FP4_MAG_CODE]
FP4_MID = ((_FP4_MAG[:-1] + _FP4_MAG[1:]) * _F32(0.5)).astype(_F32)
FP4_MIN_ABSMAX = _F32(1e-38)


# ---------------------------------------------------------------- bit casts
@intrinsic
def f32_as_u32(typingctx, x):
    """Raw bits of a float32 (LLVM bitcast)."""
    if not (isinstance(x, types.Float) and x.bitwidth == 32):
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def u32_as_f32(typingctx, u):
    """float32 with the given 32 bits (LLVM bitcast); u is any integer, its low 32 bits count."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.uint32)
        return builder.bitcast(v, ir.FloatType())

    return types.float32(u), codegen


# ---------------------------------------------------------------- scalar semantics (common.h)
@njit(**_JIT)
def fp16_to_fp32(h):
    """IEEE binary16 bits (int) -> float32, exact."""
    h = np.int64(h)
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    man = h & 0x3FF
    if e == 0:
        if man == 0:
            return u32_as_f32(sign)
        v = _F32(man) * F_2M24  # subnormal: man * 2^-24, exact in fp32
        return -v if sign != 0 else v
    if e == 31:
        return u32_as_f32(sign | 0x7F800000 | (man << 13))
    return u32_as_f32(sign | ((e + 112) << 23) | (man << 13))


@njit(**_JIT)
def fp32_to_fp16(f):
    """float32 -> IEEE binary16 bits (int), round to nearest even, overflow to inf."""
    x = np.int64(f32_as_u32(f))
    sign = (x >> 16) & 0x8000
    a = x & 0x7FFFFFFF
    if a >= 0x7F800000:
        return sign | 0x7C00 | (0x200 if a > 0x7F800000 else 0)
    if a >= 0x477FF000:  # >= 65520 rounds to inf
        return sign | 0x7C00
    if a < 0x38800000:  # result is subnormal or zero
        e = a >> 23
        if e < 102:
            return sign
        m = (a & 0x7FFFFF) | 0x800000
        shift = 126 - e  # 14..24
        q = m >> shift
        rem = m & ((np.int64(1) << shift) - 1)
        half = np.int64(1) << (shift - 1)
        if rem > half or (rem == half and (q & 1) != 0):
            q += 1
        return sign | q
    r = a - 0x38000000  # rebias 127 -> 15
    r += 0xFFF + ((r >> 13) & 1)
    return sign | (r >> 13)


@njit(**_JIT)
def cvtt_i32(v):
    """float32 -> int with x86 cvttss2si semantics (truncate; NaN / out of range -> INT32_MIN)."""
    if not (v > F_I32_LO and v < F_I32_HI):
        return np.int64(INT32_MIN)
    return np.int64(v)


@njit(**_JIT)
def round_away_i32(v):
    """C roundf (half away from zero) then cvtt_i32."""
    if not (v > F_I32_LO and v < F_I32_HI):
        return np.int64(INT32_MIN)
    t = np.int64(v)
    d = v - _F32(t)  # exact: trunc(v) is a float32 and shares v's exponent range
    if d >= F_HALF:
        t += 1
    elif d <= F_M_HALF:
        t -= 1
    return t


@njit(**_JIT)
def round_even_i32(v):
    """Round half to even (nearbyint in the default mode) then cvtt_i32."""
    if not (v > F_I32_LO and v < F_I32_HI):  # values this large are integers already
        return np.int64(INT32_MIN)
    t = np.int64(v)
    d = v - _F32(t)  # exact
    if d > F_HALF or (d == F_HALF and (t & 1) != 0):
        t += 1
    elif d < F_M_HALF or (d == F_M_HALF and (t & 1) != 0):
        t -= 1
    return t


@njit(**_JIT)
def q4_code(v):
    """ggml: MIN(15, (int8_t)(cvtt(v))) clamped at 0 -- the low byte of integer indefinite is 0."""
    c = cvtt_i32(v) & 0xFF
    if c >= 128:
        return 0
    return c if c < 15 else 15


@njit(**_JIT)
def nf4_index(v):
    """Nearest NF4 code; an exact midpoint goes to the lower code."""
    lo = 0
    for i in range(15):
        if v > NF4_MID[i]:
            lo += 1
    return lo


@njit(**_JIT)
def fp4_index(v):
    """FP4 code: sign bit 8 if v < 0; nearest magnitude by fp32 midpoints (a tie goes to the smaller)."""
    a = abs(v)
    i = 0
    for j in range(7):
        if a > FP4_MID[j]:
            i += 1
    c = FP4_MAG_CODE[i]
    return c | 8 if v < F0 else c


@njit(**_JIT)
def store_f16(buf, r, o, v):
    h = fp32_to_fp16(v)
    buf[r, o] = h & 0xFF
    buf[r, o + 1] = h >> 8


@njit(**_JIT)
def load_u16(buf, r, o):
    return np.int64(buf[r, o]) | (np.int64(buf[r, o + 1]) << 8)


@njit(**_JIT)
def load_u32(buf, r, o):
    return (np.int64(buf[r, o]) | (np.int64(buf[r, o + 1]) << 8) | (np.int64(buf[r, o + 2]) << 16)
            | (np.int64(buf[r, o + 3]) << 24))


@njit(**_JIT)
def store_f32(buf, r, o, v):
    u = np.int64(f32_as_u32(v))
    buf[r, o] = u & 0xFF
    buf[r, o + 1] = (u >> 8) & 0xFF
    buf[r, o + 2] = (u >> 16) & 0xFF
    buf[r, o + 3] = (u >> 24) & 0xFF


@njit(**_JIT)
def _abs_max(x, r, o, n):
    """max |x[r, o:o+n]| (0 for none; the comparison keeps a NaN out, as in the C++ kernels)."""
    amax = F0
    for j in range(n):
        a = abs(x[r, o + j])
        amax = amax if amax > a else a
    return amax


# ---------------------------------------------------------------- ggml block-32 formats
@pjit(**_JIT)
def _quantize_q4_0(x, q):
    n, k = x.shape
    for r in prange(n):
        for b in range(k // 32):
            xo = b * 32
            o = b * 18
            amax = F0
            mx = F0
            for j in range(32):
                v = x[r, xo + j]
                a = abs(v)
                if amax < a:
                    amax = a
                    mx = v
            d = mx / F_M8
            idv = F1 / d if d != F0 else F0
            store_f16(q, r, o, d)
            for j in range(16):
                lo = q4_code(x[r, xo + j] * idv + F8_5)
                hi = q4_code(x[r, xo + j + 16] * idv + F8_5)
                q[r, o + 2 + j] = lo | (hi << 4)


@pjit(**_JIT)
def _dequantize_q4_0(q, y):
    n, k = y.shape
    for r in prange(n):
        for b in range(k // 32):
            o = b * 18
            yo = b * 32
            d = fp16_to_fp32(load_u16(q, r, o))
            for j in range(16):
                c = q[r, o + 2 + j]
                y[r, yo + j] = _F32(np.int32(c & 0xF) - 8) * d
                y[r, yo + j + 16] = _F32(np.int32(c >> 4) - 8) * d


@pjit(**_JIT)
def _quantize_q4_1(x, q):
    n, k = x.shape
    for r in prange(n):
        for b in range(k // 32):
            xo = b * 32
            o = b * 20
            mn = x[r, xo]
            mx = x[r, xo]
            for j in range(1, 32):
                v = x[r, xo + j]
                mn = v if v < mn else mn
                mx = v if v > mx else mx
            d = (mx - mn) / F15
            idv = F1 / d if d != F0 else F0
            store_f16(q, r, o, d)
            store_f16(q, r, o + 2, mn)
            for j in range(16):
                lo = q4_code((x[r, xo + j] - mn) * idv + F_HALF)
                hi = q4_code((x[r, xo + j + 16] - mn) * idv + F_HALF)
                q[r, o + 4 + j] = lo | (hi << 4)


@pjit(**_JIT)
def _dequantize_q4_1(q, y):
    n, k = y.shape
    for r in prange(n):
        for b in range(k // 32):
            o = b * 20
            yo = b * 32
            d = fp16_to_fp32(load_u16(q, r, o))
            m = fp16_to_fp32(load_u16(q, r, o + 2))
            for j in range(16):
                c = q[r, o + 4 + j]
                y[r, yo + j] = d * _F32(c & 0xF) + m
                y[r, yo + j + 16] = d * _F32(c >> 4) + m


@pjit(**_JIT)
def _quantize_q8_0(x, q):
    n, k = x.shape
    for r in prange(n):
        for b in range(k // 32):
            xo = b * 32
            o = b * 34
            amax = _abs_max(x, r, xo, 32)
            d = amax / F127
            idv = F1 / d if d != F0 else F0
            store_f16(q, r, o, d)
            for j in range(32):
                q[r, o + 2 + j] = round_away_i32(x[r, xo + j] * idv) & 0xFF


@pjit(**_JIT)
def _dequantize_q8_0(q, y):
    n, k = y.shape
    for r in prange(n):
        for b in range(k // 32):
            o = b * 34
            yo = b * 32
            d = fp16_to_fp32(load_u16(q, r, o))
            for j in range(32):
                y[r, yo + j] = _F32(np.int8(q[r, o + 2 + j])) * d


@pjit(**_JIT)
def _dequantize_iq4_nl(q, y):
    n, k = y.shape
    for r in prange(n):
        for b in range(k // 32):
            o = b * 18
            yo = b * 32
            d = fp16_to_fp32(load_u16(q, r, o))
            for j in range(16):
                c = q[r, o + 2 + j]
                y[r, yo + j] = d * IQ4NL_VALUES[c & 0xF]
                y[r, yo + j + 16] = d * IQ4NL_VALUES[c >> 4]


# ---------------------------------------------------------------- nf4 (bitsandbytes order)
@njit(**_JIT)
def _bnb_recip(amax):
    """1 / max(absmax, 1e-38): bitsandbytes codes x * this (reference.bnb_recip), fp4 and nf4"""
    return F1 / (amax if amax > FP4_MIN_ABSMAX else FP4_MIN_ABSMAX)


@pjit(**_JIT)
def _quantize_nf4(x, bs, q, s):
    n, k = x.shape
    for r in prange(n):
        for b in range(k // bs):
            xo = b * bs
            amax = _abs_max(x, r, xo, bs)
            store_f32(s, r, 4 * b, amax)
            qo = xo // 2
            if amax == F0:
                for j in range(bs // 2):
                    q[r, qo + j] = 0x77
                continue
            rc = _bnb_recip(amax)
            for j in range(0, bs, 2):
                hi = nf4_index(x[r, xo + j] * rc)
                lo = nf4_index(x[r, xo + j + 1] * rc)
                q[r, qo + j // 2] = (hi << 4) | lo


@pjit(**_JIT)
def _dequantize_bnb4(q, s, bs, table, y):
    """bitsandbytes 4-bit layout (nf4, fp4): table[code] * absmax, first element high nibble."""
    n, k = y.shape
    for r in prange(n):
        for b in range(k // bs):
            amax = u32_as_f32(load_u32(s, r, 4 * b))
            yo = b * bs
            for j in range(0, bs, 2):
                c = q[r, (yo + j) // 2]
                y[r, yo + j] = table[c >> 4] * amax
                y[r, yo + j + 1] = table[c & 0xF] * amax


# ---------------------------------------------------------------- fp4 (bitsandbytes order)
@pjit(**_JIT)
def _quantize_fp4(x, bs, q, s):
    n, k = x.shape
    for r in prange(n):
        for b in range(k // bs):
            xo = b * bs
            amax = _abs_max(x, r, xo, bs)
            store_f32(s, r, 4 * b, amax)
            rc = _bnb_recip(amax)
            qo = xo // 2
            for j in range(0, bs, 2):
                hi = fp4_index(x[r, xo + j] * rc)
                lo = fp4_index(x[r, xo + j + 1] * rc)
                q[r, qo + j // 2] = (hi << 4) | lo


# ---------------------------------------------------------------- int4 (GPTQ quantizer)
@njit(**_JIT)
def _int4_group_params(x, r, xo, g, sym):
    """(scale after fp16 rounding, its fp16 bits, zero point) of one group, as int4_group_params."""
    return _intq_group_params(x, r, xo, g, sym, 15)


@njit(**_JIT)
def _intq_group_params(x, r, xo, g, sym, maxq):
    """As reference.intq_group_params for one group (maxq = 2^bits - 1)."""
    mn = F0  # GPTQ: the range always includes 0
    mx = F0
    for i in range(g):
        v = x[r, xo + i]
        mn = v if v < mn else mn
        mx = v if v > mx else mx
    if sym:
        a = -mn if -mn > mx else mx
        mn = -a
        mx = a
    if mn == F0 and mx == F0:
        mn = F_M1
        mx = F1
    scale = (mx - mn) / _F32(maxq)
    if scale > F65504:
        scale = F65504  # fp16 saturates instead of becoming inf
    s16 = fp32_to_fp16(scale)
    sf = fp16_to_fp32(s16)
    if sym:
        zero = (maxq + 1) // 2
    elif sf == F0:
        zero = 0
    else:
        z = round_even_i32(-mn / sf)
        zero = 0 if z < 0 else (maxq if z > maxq else z)
    return sf, s16, zero


@pjit(**_JIT)
def _quantize_intq(x, g, sym, bits, q, s, z):
    """int2 / int3: codes at bit bits*i of the row, low bits first (q zeroed by the caller). int4 keeps
    its own pairwise kernel above: this per-element read-modify-write loop is 4x slower at 4 bits."""
    n, k = x.shape
    maxq = (1 << bits) - 1
    for r in prange(n):
        for b in range(k // g):
            xo = b * g
            sf, s16, zero = _intq_group_params(x, r, xo, g, sym, maxq)
            s[r, 2 * b] = s16 & 0xFF
            s[r, 2 * b + 1] = s16 >> 8
            if not sym:
                z[r, b] = zero
            for j in range(g):
                c = zero if sf == F0 else round_even_i32(x[r, xo + j] / sf) + zero
                c = 0 if c < 0 else (maxq if c > maxq else c)
                bit = (xo + j) * bits
                v = c << (bit & 7)
                q[r, bit >> 3] |= v & 0xFF
                if (bit & 7) + bits > 8:
                    q[r, (bit >> 3) + 1] |= v >> 8


@pjit(**_JIT)
def _dequantize_intq(q, s, z, g, sym, bits, y):
    n, k = y.shape
    mask = (1 << bits) - 1
    for r in prange(n):
        for b in range(k // g):
            sf = fp16_to_fp32(load_u16(s, r, 2 * b))
            zero = np.int32(1 << (bits - 1)) if sym else np.int32(z[r, b])
            for j in range(b * g, (b + 1) * g):
                bit = j * bits
                v = np.int32(q[r, bit >> 3])
                if (bit & 7) + bits > 8:
                    v |= np.int32(q[r, (bit >> 3) + 1]) << 8
                y[r, j] = _F32(((v >> (bit & 7)) & mask) - zero) * sf


@pjit(**_JIT)
def _quantize_int4(x, g, sym, q, s, z):
    n, k = x.shape
    for r in prange(n):
        for b in range(k // g):
            xo = b * g
            sf, s16, zero = _int4_group_params(x, r, xo, g, sym)
            s[r, 2 * b] = s16 & 0xFF
            s[r, 2 * b + 1] = s16 >> 8
            if not sym:
                z[r, b] = zero
            for j in range(0, g, 2):
                if sf == F0:
                    c0 = zero
                    c1 = zero
                else:
                    c0 = round_even_i32(x[r, xo + j] / sf) + zero
                    c1 = round_even_i32(x[r, xo + j + 1] / sf) + zero
                c0 = 0 if c0 < 0 else (15 if c0 > 15 else c0)
                c1 = 0 if c1 < 0 else (15 if c1 > 15 else c1)
                q[r, (xo + j) // 2] = c0 | (c1 << 4)


@pjit(**_JIT)
def _dequantize_int4(q, s, z, g, sym, y):
    n, k = y.shape
    for r in prange(n):
        for b in range(k // g):
            sf = fp16_to_fp32(load_u16(s, r, 2 * b))
            zero = np.int32(8) if sym else np.int32(z[r, b])
            yo = b * g
            for j in range(0, g, 2):
                c = q[r, (yo + j) // 2]
                y[r, yo + j] = _F32(np.int32(c & 0xF) - zero) * sf
                y[r, yo + j + 1] = _F32(np.int32(c >> 4) - zero) * sf


# ---------------------------------------------------------------- int8 (per row)
@pjit(**_JIT)
def _quantize_int8(x, q, s):
    n, k = x.shape
    for r in prange(n):
        amax = _abs_max(x, r, 0, k)
        scale = amax / F127
        store_f32(s, r, 0, scale)
        for j in range(k):
            if scale == F0:
                v = 0
            else:
                v = round_even_i32(x[r, j] / scale)
                v = -127 if v < -127 else (127 if v > 127 else v)
            q[r, j] = v & 0xFF


@pjit(**_JIT)
def _dequantize_int8(q, s, y):
    n, k = y.shape
    for r in prange(n):
        scale = u32_as_f32(load_u32(s, r, 0))
        for j in range(k):
            y[r, j] = _F32(np.int8(q[r, j])) * scale


# ---------------------------------------------------------------- public wrappers (reference.py signatures)
def _f32(x):
    return np.ascontiguousarray(x, dtype=_F32)


def _u8(a):
    return np.ascontiguousarray(a, dtype=np.uint8)


def _empty(n):
    return np.zeros((n, 0), dtype=np.uint8)


# The registry entries of the ggml formats (blk weights in block_bytes bytes; kquants.py too). K
# and the q section are checked here: the kernels have no bounds checks, so a q shorter than K
# needs would be read past its end, and a partial last block dropped.
def _ggml_quantizer(kernel, block_bytes, blk=32):
    def quantize(x, group=0, sym=0):
        x = _f32(x)
        n, k = x.shape
        if k % blk:
            raise ValueError(f"K={k} is not a multiple of {blk}")
        q = np.empty((n, k // blk * block_bytes), dtype=np.uint8)
        kernel(x, q)
        return q, _empty(n), _empty(n)

    return quantize


def _ggml_dequantizer(kernel, block_bytes, blk=32):
    def dequantize(q, s, z, k, group=0, sym=0):
        q = _u8(q)
        if q.ndim != 2 or k % blk or q.shape[1] != k // blk * block_bytes:
            raise ValueError(f"q has shape {q.shape}; K={k} needs {k // blk * block_bytes} bytes per row")
        y = np.empty((q.shape[0], k), dtype=_F32)
        kernel(q, y)
        return y

    return dequantize


quantize_q4_0 = _ggml_quantizer(_quantize_q4_0, 18)
quantize_q4_1 = _ggml_quantizer(_quantize_q4_1, 20)
quantize_q8_0 = _ggml_quantizer(_quantize_q8_0, 34)
dequantize_q4_0 = _ggml_dequantizer(_dequantize_q4_0, 18)
dequantize_q4_1 = _ggml_dequantizer(_dequantize_q4_1, 20)
dequantize_q8_0 = _ggml_dequantizer(_dequantize_q8_0, 34)
dequantize_iq4_nl = _ggml_dequantizer(_dequantize_iq4_nl, 18)
for _f, _name in ((quantize_q4_0, "quantize_q4_0"), (quantize_q4_1, "quantize_q4_1"),
                  (quantize_q8_0, "quantize_q8_0"), (dequantize_q4_0, "dequantize_q4_0"),
                  (dequantize_q4_1, "dequantize_q4_1"), (dequantize_q8_0, "dequantize_q8_0"),
                  (dequantize_iq4_nl, "dequantize_iq4_nl")):
    _f.__name__ = _f.__qualname__ = _name


def _make_bnb4(fmt, quantize_kernel, table):
    """Wrappers of the bitsandbytes-layout kernels (nf4, fp4): checks and section buffers."""

    def quantize(x, group=64, sym=0):
        x = _f32(x)
        n, k = x.shape
        if group <= 0 or group % 2 or k % group:
            raise ValueError(f"{fmt}: K={k} is not a multiple of an even block size {group}")
        q = np.empty((n, k // 2), dtype=np.uint8)
        s = np.empty((n, k // group * 4), dtype=np.uint8)
        quantize_kernel(x, group, q, s)
        return q, s, _empty(n)

    def dequantize(q, s, z, k, group=64, sym=0):
        q, s = _u8(q), _u8(s)
        n = q.shape[0]
        if group <= 0 or group % 2 or k % group or q.shape[1] != k // 2 or s.shape != (n, k // group * 4):
            raise ValueError(f"{fmt}: sections do not match K={k}, block {group}")
        y = np.empty((n, k), dtype=_F32)
        _dequantize_bnb4(q, s, group, table, y)
        return y

    quantize.__name__, dequantize.__name__ = f"quantize_{fmt}", f"dequantize_{fmt}"
    return quantize, dequantize


quantize_nf4, dequantize_nf4 = _make_bnb4("nf4", _quantize_nf4, NF4_CODE)
quantize_fp4, dequantize_fp4 = _make_bnb4("fp4", _quantize_fp4, FP4_CODE)


def _int4_group(k, group):
    g = k if group == -1 else group
    if g <= 0 or g % 2 or k % g:
        raise ValueError(f"int4: K={k} is not a multiple of an even group size {group}")
    return g


def quantize_int4(x, group=128, sym=0):
    x = _f32(x)
    n, k = x.shape
    g = _int4_group(k, group)
    groups = k // g
    q = np.empty((n, k // 2), dtype=np.uint8)
    s = np.empty((n, 2 * groups), dtype=np.uint8)
    z = np.empty((n, 0 if sym else groups), dtype=np.uint8)
    _quantize_int4(x, g, bool(sym), q, s, z)
    return q, s, z


def dequantize_int4(q, s, z, k, group=128, sym=0):
    q, s = _u8(q), _u8(s)
    n = q.shape[0]
    g = _int4_group(k, group)
    groups = k // g
    z = _empty(n) if sym else _u8(z)
    if q.shape[1] != k // 2 or s.shape != (n, 2 * groups) or z.shape != (n, 0 if sym else groups):
        raise ValueError(f"int4: sections do not match K={k}, group {group}, sym={bool(sym)}")
    y = np.empty((n, k), dtype=_F32)
    _dequantize_int4(q, s, z, g, bool(sym), y)
    return y


def _intq_group(fmt, k, group, bits):
    unit = 8 if bits == 3 else 8 // bits
    g = k if group == -1 else group
    if g <= 0 or k % g or g % unit:
        raise ValueError(f"{fmt}: K={k} is not a multiple of a group size {group} that fills whole bytes")
    return g


def _make_intq(bits):
    fmt = f"int{bits}"

    def quantize(x, group=128, sym=0):
        x = _f32(x)
        n, k = x.shape
        g = _intq_group(fmt, k, group, bits)
        groups = k // g
        q = np.zeros((n, k * bits // 8), dtype=np.uint8)
        s = np.empty((n, 2 * groups), dtype=np.uint8)
        z = np.empty((n, 0 if sym else groups), dtype=np.uint8)
        _quantize_intq(x, g, bool(sym), bits, q, s, z)
        return q, s, z

    def dequantize(q, s, z, k, group=128, sym=0):
        q, s = _u8(q), _u8(s)
        n = q.shape[0]
        g = _intq_group(fmt, k, group, bits)
        groups = k // g
        z = _empty(n) if sym else _u8(z)
        if q.shape[1] != k * bits // 8 or s.shape != (n, 2 * groups) or z.shape != (n, 0 if sym else groups):
            raise ValueError(f"{fmt}: sections do not match K={k}, group {group}, sym={bool(sym)}")
        y = np.empty((n, k), dtype=_F32)
        _dequantize_intq(q, s, z, g, bool(sym), bits, y)
        return y

    quantize.__name__, dequantize.__name__ = f"quantize_{fmt}", f"dequantize_{fmt}"
    return quantize, dequantize


quantize_int2, dequantize_int2 = _make_intq(2)
quantize_int3, dequantize_int3 = _make_intq(3)


def quantize_int8(x, group=0, sym=0):
    x = _f32(x)
    n, k = x.shape
    q = np.empty((n, k), dtype=np.uint8)
    s = np.empty((n, 4), dtype=np.uint8)
    _quantize_int8(x, q, s)
    return q, s, _empty(n)


def dequantize_int8(q, s, z, k, group=0, sym=0):
    q, s = _u8(q), _u8(s)
    n = q.shape[0]
    if q.shape[1] != k or s.shape != (n, 4):
        raise ValueError(f"int8: sections do not match K={k}")
    y = np.empty((n, k), dtype=_F32)
    _dequantize_int8(q, s, y)
    return y


QUANTIZE = {
    "q4_0": quantize_q4_0, "q4_1": quantize_q4_1, "q8_0": quantize_q8_0,
    "nf4": quantize_nf4, "int4": quantize_int4, "int8": quantize_int8,
    "int2": quantize_int2, "int3": quantize_int3, "fp4": quantize_fp4,
}
DEQUANTIZE = {
    "q4_0": dequantize_q4_0, "q4_1": dequantize_q4_1, "q8_0": dequantize_q8_0, "iq4_nl": dequantize_iq4_nl,
    "nf4": dequantize_nf4, "int4": dequantize_int4, "int8": dequantize_int8,
    "int2": dequantize_int2, "int3": dequantize_int3, "fp4": dequantize_fp4,
}
