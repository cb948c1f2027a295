"""Fused Numba matmul (compute="float"): y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).

The weight is read in its canonical row bytes (``qt.sections()``: q, s, z), one block at a
time; each weight is decoded into a float32 register (never a dequantized W) with exactly the
float operations of the dequantizers (:mod:`pyqkern.reference`, :mod:`pyqkern.reference_kquants`,
``simple.py`` / ``kquants.py``), so every decoded weight has the bits ``pq.dequantize`` gives:

    q4_0  f32(c - 8) * d           q4_1  d * f32(c) + m           q8_0  f32(int8 c) * d
    iq4_nl d * kvalue[c]           nf4 / fp4  code[c] * absmax    int8  f32(int8 c) * scale
    int4  f32(c - zero) * scale    q4_k  (d*sc) * f32(c) - (dmin*m)   q6_k (d*sc) * f32(c - 32)
    int2 / int3 as int4 (codes from their bit streams)

Then each decoded weight is multiplied by x in float32 and accumulated in float32, in 32
independent lanes (one element of every chunk of 32: element k = 32*c + j in lane j, or for the
two-codes-per-byte nf4 / fp4 / int4 layouts even elements in lanes 0..15 and odd ones in 16..31,
and for full int2 / int3 chunks the lane order of .intq) that are summed pairwise in a fixed order
at the end of the row; bias is added last. No fastmath: no reassociation, no
contraction, so the decode is exact and the accumulation order is the one written here.

The code-book formats (iq4_nl, nf4, fp4) decode a block of 32 through the intrinsics of
:mod:`.lut` (a register permute per 16 codes; LLVM turns the plain ``table[code]`` loop into one
scalar load per weight), int2 / int3 chunks through those of :mod:`.intq`, with the same float
operations.

M <= MAX_SMALL_M runs one kernel per format (see _drive_small), M above it one kernel for all
formats (_matmul), with the same lanes and order: a row alone gives the bits it gives in a batch,
except the sign of a NaN result (x86 keeps the first NaN operand of an add, and LLVM may order an
add's operands differently in the two kernels).

Rows n run in parallel (``prange`` over fixed chunks of rows); each y[m, n] is computed by one
thread in the same order whatever the thread count, so the result does not depend on it.
The error against x @ dequantize(W).T (in exact arithmetic) is within the usual float32 dot
product bound, |y - y_ref| <= K * 2^-23 * (|x| @ |W|.T) (+ the bias rounding).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._par import pjit
from .intq import int2_block, int3_block
from .lut import lut16_hi_first, lut16_lo_first
from .simple import FP4_CODE, IQ4NL_VALUES, NF4_CODE, u32_as_f32

_F32 = np.float32
_I32 = np.int32
_JIT = dict(cache=True, nogil=True, error_model="numpy")

F0 = _F32(0.0)
LANES = 32       # accumulator lanes = decode chunk
ROWS_PER_TASK = 8

# format ids (pyqkern._formats.FORMAT_IDS)
Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, IQ4_NL, NF4, INT4, INT8, INT2, INT3, FP4 = range(12)


# ---------------------------------------------------------------- byte / fp16 helpers
# fp16 bits -> float32 for all 65536 patterns (numpy's conversion: exact, the same bits as
# simple.fp16_to_fp32, NaN payloads included; checked exhaustively in tests). A load from this
# 256 KiB table replaces the branchy bit assembly: q4_1 GEMV 1.2 -> 0.7 ms.
_F16_TABLE = np.arange(65536, dtype=np.uint16).view(np.float16).astype(_F32)


@njit(inline="always", **_JIT)
def _f16(buf, r, o):
    """fp16 at bytes o, o+1 of row r -> float32 (exact)."""
    return _F16_TABLE[np.int64(buf[r, o]) | (np.int64(buf[r, o + 1]) << 8)]


@njit(inline="always", **_JIT)
def _f32le(buf, r, o):
    return u32_as_f32(np.int64(buf[r, o]) | (np.int64(buf[r, o + 1]) << 8) | (np.int64(buf[r, o + 2]) << 16)
                      | (np.int64(buf[r, o + 3]) << 24))


@njit(inline="always", **_JIT)
def _i8(c):
    return np.int8(c)   # the byte's bits as int8


# Numba computes integer arithmetic in int64; each result below is cast back to int32, which lets
# LLVM keep the decode in 32-bit vector lanes (int64 lanes took 1.5-2x the time of the whole row).
@njit(inline="always", **_JIT)
def _lo(b):
    return _I32(_I32(b) & _I32(15))


@njit(inline="always", **_JIT)
def _hi(b):
    return _I32(_I32(b) >> _I32(4))


@njit(inline="always", **_JIT)
def _sub(a, b):
    return _I32(a - b)


# ---------------------------------------------------------------- fused row dots
# _row_<fmt>(q, s, z, r, gshift, sym, x, m0, m1, acc): for m0 <= m < m1 and every k,
# acc[m - m0, lane(k)] += w[n=r, k] * x[m, k]. Each weight is decoded with the dequantizer's float
# ops into a register and multiplied at once (decoding into a scratch array and reading it back is
# several times slower in Numba); the lanes of different m are independent, so where the m loop
# sits does not change any bits.

@njit(inline="always", **_JIT)
def _row_q4_0(q, s, z, r, gshift, sym, x, m0, m1, acc):
    k = x.shape[1]
    for ci in range(k // 32):
        o = ci * 18
        k0 = ci * 32
        d = _f16(q, r, o)
        for m in range(m0, m1):
            for j in range(16):
                c = q[r, o + 2 + j]
                acc[m - m0, j] += (_F32(_sub(_lo(c), 8)) * d) * x[m, k0 + j]
                acc[m - m0, j + 16] += (_F32(_sub(_hi(c), 8)) * d) * x[m, k0 + j + 16]


@njit(inline="always", **_JIT)
def _row_q4_1(q, s, z, r, gshift, sym, x, m0, m1, acc):
    k = x.shape[1]
    for ci in range(k // 32):
        o = ci * 20
        k0 = ci * 32
        d = _f16(q, r, o)
        mn = _f16(q, r, o + 2)
        for m in range(m0, m1):
            for j in range(16):
                c = q[r, o + 4 + j]
                acc[m - m0, j] += (d * _F32(_lo(c)) + mn) * x[m, k0 + j]
                acc[m - m0, j + 16] += (d * _F32(_hi(c)) + mn) * x[m, k0 + j + 16]


@njit(inline="always", **_JIT)
def _row_q8_0(q, s, z, r, gshift, sym, x, m0, m1, acc):
    k = x.shape[1]
    for ci in range(k // 32):
        o = ci * 34
        k0 = ci * 32
        d = _f16(q, r, o)
        for m in range(m0, m1):
            for j in range(32):
                acc[m - m0, j] += (_F32(_i8(q[r, o + 2 + j])) * d) * x[m, k0 + j]


@njit(inline="always", **_JIT)
def _row_iq4_nl(q, s, z, r, gshift, sym, x, m0, m1, acc):
    k = x.shape[1]
    for ci in range(k // 32):
        o = ci * 18
        k0 = ci * 32
        d = _f16(q, r, o)
        for m in range(m0, m1):   # (kvalue[c] * d) * x, as d * kvalue[c]: a product is commutative
            lut16_lo_first(q, r, o + 2, IQ4NL_VALUES, d, x, m, k0, acc, m - m0)


@njit(inline="always", **_JIT)
def _q4k_scale_min(q, r, o, j):
    """(sc, m) of sub-block j (0..7) of the super-block at byte o: 6-bit values packed in 12 bytes."""
    so = o + 4
    if j < 4:
        sc = _I32(_I32(q[r, so + j]) & _I32(63))
        mn = _I32(_I32(q[r, so + j + 4]) & _I32(63))
    else:
        sc = _I32(_I32(_I32(q[r, so + j + 4]) & _I32(15)) | _I32(_I32(_I32(q[r, so + j - 4]) >> _I32(6)) << _I32(4)))
        mn = _I32(_I32(_I32(q[r, so + j + 4]) >> _I32(4)) | _I32(_I32(_I32(q[r, so + j]) >> _I32(6)) << _I32(4)))
    return sc, mn


@njit(inline="always", **_JIT)
def _row_q4_k(q, s, z, r, gshift, sym, x, m0, m1, acc):
    """sub-block j of super-block b: (d*sc)*c - (dmin*m); sub-blocks 2i and 2i+1 are the low and
    high nibbles of the same 32 bytes, taken together (each lane still gets 2i before 2i+1)."""
    k = x.shape[1]
    for cp in range(k // 64):
        b = cp >> 2
        i = cp & 3
        o = 144 * b
        k0 = cp * 64
        d = _f16(q, r, o)
        dmin = _f16(q, r, o + 2)
        sc0, mn0 = _q4k_scale_min(q, r, o, 2 * i)
        sc1, mn1 = _q4k_scale_min(q, r, o, 2 * i + 1)
        dd0 = d * _F32(sc0)
        dm0 = dmin * _F32(mn0)
        dd1 = d * _F32(sc1)
        dm1 = dmin * _F32(mn1)
        qo = o + 16 + 32 * i
        for m in range(m0, m1):
            for l in range(32):
                c = q[r, qo + l]
                acc[m - m0, l] += (dd0 * _F32(_lo(c)) - dm0) * x[m, k0 + l]
                acc[m - m0, l] += (dd1 * _F32(_hi(c)) - dm1) * x[m, k0 + 32 + l]


@njit(inline="always", **_JIT)
def _row_q6_k(q, s, z, r, gshift, sym, x, m0, m1, acc):
    """elements 32*ci .. +32: half h, quarter i of a 256 super-block; (d*sc)*(c-32). The four
    quarters of a half share their bytes (quarter i: low bits from nibble i >> 1 of lo bytes
    32*(i & 1) .., high bits 2i of the 32 hi bytes) and are taken together, each lane still in
    quarter order."""
    k = x.shape[1]
    for hb in range(k // 128):
        b = hb >> 1
        h = hb & 1
        o = 210 * b
        k0 = hb * 128
        d = _f16(q, r, o + 208)
        so = o + 192 + 8 * h
        dd00 = d * _F32(_i8(q[r, so]))
        dd01 = d * _F32(_i8(q[r, so + 1]))
        dd10 = d * _F32(_i8(q[r, so + 2]))
        dd11 = d * _F32(_i8(q[r, so + 3]))
        dd20 = d * _F32(_i8(q[r, so + 4]))
        dd21 = d * _F32(_i8(q[r, so + 5]))
        dd30 = d * _F32(_i8(q[r, so + 6]))
        dd31 = d * _F32(_i8(q[r, so + 7]))
        lo = o + 64 * h
        ho = o + 128 + 32 * h
        for m in range(m0, m1):
            for l in range(32):
                a0 = _I32(q[r, lo + l])        # quarters 0 (low nibble) and 2 (high)
                a1 = _I32(q[r, lo + 32 + l])   # quarters 1 and 3
                hh = _I32(q[r, ho + l])
                c0 = _sub(_I32(_lo(a0) | _I32(_I32(hh & _I32(3)) << _I32(4))), 32)
                c1 = _sub(_I32(_lo(a1) | _I32(_I32(_I32(hh >> _I32(2)) & _I32(3)) << _I32(4))), 32)
                c2 = _sub(_I32(_hi(a0) | _I32(_I32(_I32(hh >> _I32(4)) & _I32(3)) << _I32(4))), 32)
                c3 = _sub(_I32(_hi(a1) | _I32(_I32(hh >> _I32(6)) << _I32(4))), 32)
                if l < 16:
                    acc[m - m0, l] += (dd00 * _F32(c0)) * x[m, k0 + l]
                    acc[m - m0, l] += (dd10 * _F32(c1)) * x[m, k0 + 32 + l]
                    acc[m - m0, l] += (dd20 * _F32(c2)) * x[m, k0 + 64 + l]
                    acc[m - m0, l] += (dd30 * _F32(c3)) * x[m, k0 + 96 + l]
                else:
                    acc[m - m0, l] += (dd01 * _F32(c0)) * x[m, k0 + l]
                    acc[m - m0, l] += (dd11 * _F32(c1)) * x[m, k0 + 32 + l]
                    acc[m - m0, l] += (dd21 * _F32(c2)) * x[m, k0 + 64 + l]
                    acc[m - m0, l] += (dd31 * _F32(c3)) * x[m, k0 + 96 + l]


# nf4, fp4 and int4 pack elements 2j, 2j+1 in byte j. They take x "split": within every chunk of 32
# (and the shorter tail chunk of length L), the even elements first, then the odd ones (see
# _split_pairs), so the even elements of a chunk go to lanes 0..L/2-1 and the odd ones to the next
# L/2 lanes with contiguous loads, as the other formats do.

@njit(inline="always", **_JIT)
def _row_bnb4(q, s, r, bshift, code, xs, m0, m1, acc):
    """nf4 / fp4 (bitsandbytes order): element 2j = high nibble of byte j; code[c] * absmax (block >= 32)."""
    k = xs.shape[1]
    for ci in range(k // 32):
        k0 = ci * 32
        amax = _f32le(s, r, 4 * (k0 >> bshift))
        qo = k0 >> 1
        for m in range(m0, m1):
            lut16_hi_first(q, r, qo, code, amax, xs, m, k0, acc, m - m0)


@njit(inline="always", **_JIT)
def _row_int4(q, s, z, r, gshift, sym, xs, m0, m1, acc):
    """element 2i = low nibble; f32(c - zero) * scale. Groups are 2^gshift (>= 16) or the whole
    row (gshift = 62): a chunk of 32 holds one group, or two of 16 (bytes 0..7 and 8..15)."""
    k = xs.shape[1]
    nfull = k // 32
    gprev = -1
    sf = F0
    zero = np.int32(8)
    for ci in range(nfull):
        k0 = ci * 32
        qo = k0 >> 1
        gi = k0 >> gshift
        if gi != gprev:  # scale and zero once per group (4 chunks at group 128)
            sf = _f16(s, r, 2 * gi)
            zero = np.int32(8) if sym else np.int32(z[r, gi])
            gprev = gi
        if gshift >= 5:
            for m in range(m0, m1):
                for j in range(16):
                    c = q[r, qo + j]
                    acc[m - m0, j] += (_F32(_sub(_lo(c), zero)) * sf) * xs[m, k0 + j]
                    acc[m - m0, 16 + j] += (_F32(_sub(_hi(c), zero)) * sf) * xs[m, k0 + 16 + j]
        else:  # group 16
            sf1 = _f16(s, r, 2 * gi + 2)
            zero1 = np.int32(8) if sym else np.int32(z[r, gi + 1])
            for m in range(m0, m1):
                for j in range(16):
                    c = q[r, qo + j]
                    zj = zero if j < 8 else zero1
                    sj = sf if j < 8 else sf1
                    acc[m - m0, j] += (_F32(_sub(_lo(c), zj)) * sj) * xs[m, k0 + j]
                    acc[m - m0, 16 + j] += (_F32(_sub(_hi(c), zj)) * sj) * xs[m, k0 + 16 + j]
    k0 = nfull * 32
    if k0 < k:  # tail chunk of length L < 32 (K even): one group (per-channel) or one of 16
        h = (k - k0) >> 1
        gi = k0 >> gshift
        sf = _f16(s, r, 2 * gi)
        zero = np.int32(8) if sym else np.int32(z[r, gi])
        qo = k0 >> 1
        for m in range(m0, m1):
            for j in range(h):
                c = q[r, qo + j]
                acc[m - m0, j] += (_F32(_sub(_lo(c), zero)) * sf) * xs[m, k0 + j]
                acc[m - m0, 16 + j] += (_F32(_sub(_hi(c), zero)) * sf) * xs[m, k0 + h + j]


@njit(inline="always", **_JIT)
def _intq_code(q, r, bits, kk):
    """code of element kk of row r in the bits-wide little-endian stream (int2 / int3)."""
    bit = np.int64(kk) * bits
    v = _I32(q[r, bit >> 3])
    if (bit & 7) + bits > 8:
        v = _I32(v | _I32(_I32(q[r, (bit >> 3) + 1]) << _I32(8)))
    return _I32(_I32(v >> _I32(bit & 7)) & _I32((1 << bits) - 1))


@njit(inline="always", **_JIT)
def _row_intq(q, s, z, r, gshift, sym, bits, x, m0, m1, acc):
    """int2 / int3: element i's code at bit bits*i of the row (low bits first); f32(c - zero) *
    scale. A chunk of 32 codes is 8 (int2) or 12 (int3: 8 codes per 3) whole bytes, decoded by
    the intrinsics of .intq with x in their lane order (_INTQ_LANES); groups of 16 and the tail
    chunk take the code-by-code walk, x in element order, element k = 32*c + j in lane j."""
    k = x.shape[1]
    zsym = _I32(1 << (bits - 1))
    nfull = k // 32 if gshift >= 5 else 0
    for ci in range(nfull):
        k0 = ci * 32
        gi = k0 >> gshift
        sf = _f16(s, r, 2 * gi)
        zero = zsym if sym else _I32(z[r, gi])
        if bits == 2:
            for m in range(m0, m1):
                int2_block(q, r, ci * 8, zero, sf, x, m, k0, acc, m - m0)
        else:
            for m in range(m0, m1):
                int3_block(q, r, ci * 12, zero, sf, x, m, k0, acc, m - m0)
    for kk in range(nfull * 32, k):
        gi = kk >> gshift
        zero = zsym if sym else _I32(z[r, gi])
        w = _F32(_sub(_intq_code(q, r, bits, kk), zero)) * _f16(s, r, 2 * gi)
        for m in range(m0, m1):
            acc[m - m0, kk & 31] += w * x[m, kk]


@njit(inline="always", **_JIT)
def _row_nf4(q, s, z, r, gshift, sym, xs, m0, m1, acc):
    _row_bnb4(q, s, r, gshift, NF4_CODE, xs, m0, m1, acc)


@njit(inline="always", **_JIT)
def _row_fp4(q, s, z, r, gshift, sym, xs, m0, m1, acc):
    _row_bnb4(q, s, r, gshift, FP4_CODE, xs, m0, m1, acc)


@njit(inline="always", **_JIT)
def _row_int2(q, s, z, r, gshift, sym, x, m0, m1, acc):
    _row_intq(q, s, z, r, gshift, sym, 2, x, m0, m1, acc)


@njit(inline="always", **_JIT)
def _row_int3(q, s, z, r, gshift, sym, x, m0, m1, acc):
    _row_intq(q, s, z, r, gshift, sym, 3, x, m0, m1, acc)


# lane L of a full int2 / int3 chunk holds element _INTQ_LANES[bits][L] of it
_INTQ_LANES = {2: np.array([4 * (L % 8) + L // 8 for L in range(32)]),   # lane 8t + j: element 4j + t
               3: np.array([8 * (L % 4) + L // 4 for L in range(32)])}   # lane 4t + g: element 8g + t


def _intq_lanes(x, bits, group):
    """x for _row_intq: each full chunk of 32 in lane order, when chunks lie inside one group
    (group >= 32 or per-channel); the tail chunk, and groups of 16, in element order."""
    if 0 < group < 32:
        return x
    mm, k = x.shape
    kf = k // 32 * 32
    xs = x.copy()
    xs[:, :kf] = x[:, :kf].reshape(mm, -1, 32)[:, :, _INTQ_LANES[bits]].reshape(mm, kf)
    return xs


def _split_pairs(x):
    """x [M, K] (K even) -> copy with each chunk of 32 (and the tail chunk) reordered: even
    elements first, then odd ones."""
    mm, k = x.shape
    kf = k // 32 * 32
    xs = np.empty_like(x)
    xs[:, :kf] = x[:, :kf].reshape(mm, -1, 16, 2).transpose(0, 1, 3, 2).reshape(mm, kf)
    if kf < k:
        xs[:, kf:] = x[:, kf:].reshape(mm, -1, 2).transpose(0, 2, 1).reshape(mm, k - kf)
    return xs


@njit(inline="always", **_JIT)
def _row_int8(q, s, z, r, gshift, sym, x, m0, m1, acc):
    k = x.shape[1]
    scale = _f32le(s, r, 0)
    nfull = k // 32
    for ci in range(nfull):
        k0 = ci * 32
        for m in range(m0, m1):
            for j in range(32):
                acc[m - m0, j] += (_F32(_i8(q[r, k0 + j])) * scale) * x[m, k0 + j]
    k0 = nfull * 32
    for m in range(m0, m1):
        for j in range(k - k0):
            acc[m - m0, j] += (_F32(_i8(q[r, k0 + j])) * scale) * x[m, k0 + j]


# ---------------------------------------------------------------- the kernel
@njit(inline="always", **_JIT)
def _lora_epilogue(v, m, r, T, Bc, offs, ranks, scales, dfac, isdora, ids, use_ids):
    """v + Σ_a scale_a · (T[m, off_a:off_a+r_a] · B_a[r]) for the adapters of row m (one, by ids,
    or all), then the DoRA rescale of a DoRA adapter (alone on its rows)."""
    na = offs.shape[0]
    for a in range(na):
        if use_ids and ids[m] != a:
            continue
        o = offs[a]
        d = F0
        for j in range(ranks[a]):
            d += T[m, o + j] * Bc[r, o + j]
        v = v + scales[a] * d
        if isdora[a]:
            v = v * dfac[a, r]
    return v


@pjit(**_JIT)
def _shrink(x, Ac, offs, ranks, ids, use_ids, T):
    """T[m, c] = x[m] · Ac[c] for the rank columns of the adapters row m uses (float32, K order)."""
    mm, k = x.shape
    na = offs.shape[0]
    for m in prange(mm):
        for a in range(na):
            if use_ids and ids[m] != a:
                continue
            for c in range(offs[a], offs[a] + ranks[a]):
                acc = F0
                for kk in range(k):
                    acc += x[m, kk] * Ac[c, kk]
                T[m, c] = acc


@njit(inline="always", **_JIT)
def _lanesum(acc, i):
    """the fixed pairwise reduction of the 32 lanes of acc[i]"""
    for half in (16, 8, 4, 2, 1):
        for j in range(half):
            acc[i, j] = acc[i, j] + acc[i, j + half]
    return acc[i, 0]


@njit(inline="always", **_JIT)
def _drive_small(row, q, s, z, gshift, sym, x, y):
    """M <= MAX_SMALL_M: activation rows in groups of 4, then the remaining rows one at a time,
    each with acc a fresh array of a shape known at compile time, (4, LANES) or (1, LANES), which
    LLVM keeps in registers (a weight is decoded once per group). Inlined into one kernel per format
    below: one kernel dispatching on the format, or taking acc of run-time shape as _matmul does,
    keeps acc in memory (M = 1: 1.2-2.5x as long; (8,4096,4096) q4_0: 6.3 ms against 4.3); a row
    function passed as an argument is not inlined."""
    mm = x.shape[0]
    n = y.shape[1]
    m4 = mm // 4 * 4
    ntask = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for t in prange(ntask):
        r1 = min(n, (t + 1) * ROWS_PER_TASK)
        for r in range(t * ROWS_PER_TASK, r1):
            for m0 in range(0, m4, 4):
                acc = np.zeros((4, LANES), _F32)
                row(q, s, z, r, gshift, sym, x, m0, m0 + 4, acc)
                for i in range(4):
                    y[m0 + i, r] = _lanesum(acc, i)
            for m in range(m4, mm):
                acc1 = np.zeros((1, LANES), _F32)
                row(q, s, z, r, gshift, sym, x, m, m + 1, acc1)
                y[m, r] = _lanesum(acc1, 0)


MAX_SMALL_M = 8   # _drive_small up to this many rows; beyond, _matmul (one decode per tile of rows)
X_TILE_BYTES = 2 << 20  # _matmul's rows of x per tile: read once per weight row, from L3


@pjit(**_JIT)
def _matmul(fmt, q, s, z, gshift, sym, x, y):
    """M > MAX_SMALL_M: y[m, r] = the lane sum of row r against x[m]; x in tiles of rows (X_TILE_BYTES)
    that stay in L3 while a task's weight rows run over them (all of x per weight row streamed x from DRAM N
    times: (2048, 2048, 2048) q4_0 took 26x the native time). A weight row is decoded once per
    tile; each (m, r) gets the same operations whatever the tiling."""
    mm, k = x.shape
    n = y.shape[1]
    mt = max(MAX_SMALL_M, X_TILE_BYTES // (4 * k))
    ntask = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for t in prange(ntask):
        accm = np.empty((min(mm, mt), LANES), _F32)
        r1 = min(n, (t + 1) * ROWS_PER_TASK)
        for t0 in range(0, mm, mt):
            # views, so the row functions run over rows 0.. of them as they did over all of x
            xt, yt = x[t0:t0 + mt], y[t0:t0 + mt]
            tm = xt.shape[0]
            acc = accm[:tm]
            for r in range(t * ROWS_PER_TASK, r1):
                acc[:, :] = F0
                if fmt == Q4_0:
                    _row_q4_0(q, s, z, r, gshift, sym, xt, 0, tm, acc)
                elif fmt == Q4_1:
                    _row_q4_1(q, s, z, r, gshift, sym, xt, 0, tm, acc)
                elif fmt == Q8_0:
                    _row_q8_0(q, s, z, r, gshift, sym, xt, 0, tm, acc)
                elif fmt == IQ4_NL:
                    _row_iq4_nl(q, s, z, r, gshift, sym, xt, 0, tm, acc)
                elif fmt == Q4_K:
                    _row_q4_k(q, s, z, r, gshift, sym, xt, 0, tm, acc)
                elif fmt == Q6_K:
                    _row_q6_k(q, s, z, r, gshift, sym, xt, 0, tm, acc)
                elif fmt == NF4:
                    _row_nf4(q, s, z, r, gshift, sym, xt, 0, tm, acc)
                elif fmt == FP4:
                    _row_fp4(q, s, z, r, gshift, sym, xt, 0, tm, acc)
                elif fmt == INT4:
                    _row_int4(q, s, z, r, gshift, sym, xt, 0, tm, acc)
                elif fmt == INT2:
                    _row_int2(q, s, z, r, gshift, sym, xt, 0, tm, acc)
                elif fmt == INT3:
                    _row_int3(q, s, z, r, gshift, sym, xt, 0, tm, acc)
                else:
                    _row_int8(q, s, z, r, gshift, sym, xt, 0, tm, acc)
                for m in range(tm):
                    yt[m, r] = _lanesum(acc, m)


@pjit(**_JIT)
def _small_q4_0(q, s, z, gshift, sym, x, y):
    _drive_small(_row_q4_0, q, s, z, gshift, sym, x, y)


@pjit(**_JIT)
def _small_q4_1(q, s, z, gshift, sym, x, y):
    _drive_small(_row_q4_1, q, s, z, gshift, sym, x, y)


@pjit(**_JIT)
def _small_q8_0(q, s, z, gshift, sym, x, y):
    _drive_small(_row_q8_0, q, s, z, gshift, sym, x, y)


@pjit(**_JIT)
def _small_q4_k(q, s, z, gshift, sym, x, y):
    _drive_small(_row_q4_k, q, s, z, gshift, sym, x, y)


@pjit(**_JIT)
def _small_q6_k(q, s, z, gshift, sym, x, y):
    _drive_small(_row_q6_k, q, s, z, gshift, sym, x, y)


@pjit(**_JIT)
def _small_iq4_nl(q, s, z, gshift, sym, x, y):
    _drive_small(_row_iq4_nl, q, s, z, gshift, sym, x, y)


@pjit(**_JIT)
def _small_nf4(q, s, z, gshift, sym, x, y):
    _drive_small(_row_nf4, q, s, z, gshift, sym, x, y)


@pjit(**_JIT)
def _small_fp4(q, s, z, gshift, sym, x, y):
    _drive_small(_row_fp4, q, s, z, gshift, sym, x, y)


@pjit(**_JIT)
def _small_int4(q, s, z, gshift, sym, x, y):
    _drive_small(_row_int4, q, s, z, gshift, sym, x, y)


@pjit(**_JIT)
def _small_int2(q, s, z, gshift, sym, x, y):
    _drive_small(_row_int2, q, s, z, gshift, sym, x, y)


@pjit(**_JIT)
def _small_int3(q, s, z, gshift, sym, x, y):
    _drive_small(_row_int3, q, s, z, gshift, sym, x, y)


@pjit(**_JIT)
def _small_int8(q, s, z, gshift, sym, x, y):
    _drive_small(_row_int8, q, s, z, gshift, sym, x, y)


_SMALL = {Q4_0: _small_q4_0, Q4_1: _small_q4_1, Q8_0: _small_q8_0, Q4_K: _small_q4_k, Q6_K: _small_q6_k, IQ4_NL: _small_iq4_nl,
         NF4: _small_nf4, INT4: _small_int4, INT8: _small_int8, INT2: _small_int2, INT3: _small_int3, FP4: _small_fp4}


@pjit(**_JIT)
def _finish(y, bias, has_bias, T, Bc, offs, ranks, scales, dfac, isdora, ids, use_ids):
    """y[m, r] (the base sum) -> + adapters (expansion, then DoRA rescale) + bias, in that order."""
    mm, n = y.shape
    for r in prange(n):
        for m in range(mm):
            v = y[m, r]
            if offs.shape[0] > 0:
                v = _lora_epilogue(v, m, r, T, Bc, offs, ranks, scales, dfac, isdora, ids, use_ids)
            if has_bias:
                v = v + bias[r]
            y[m, r] = v


_NO_ADAPTERS = None


def _no_adapters():
    global _NO_ADAPTERS
    if _NO_ADAPTERS is None:
        z2 = np.zeros((1, 1), _F32)
        zi = np.zeros(0, np.int64)
        _NO_ADAPTERS = (z2, z2, zi, zi, np.zeros(0, _F32), z2, np.zeros(0, np.bool_), np.zeros(1, np.int32), False)
    return _NO_ADAPTERS


def lora_operands(x, n, adapters, ids):
    """Operands of the fused adapter epilogue. adapters: list of (A [r, K], B [N, r], scale,
    dora factor [N] or None), A already in x's column order; ids int32 [M] or None."""
    mm = x.shape[0]
    ranks = np.array([a[0].shape[0] for a in adapters], np.int64)
    offs = np.concatenate([[0], np.cumsum(ranks)[:-1]]).astype(np.int64)
    rt = int(ranks.sum())
    Ac = np.ascontiguousarray(np.concatenate([np.asarray(a[0], _F32) for a in adapters]), dtype=_F32)
    Bc = np.ascontiguousarray(np.concatenate([np.asarray(a[1], _F32) for a in adapters], axis=1), dtype=_F32)
    scales = np.array([a[2] for a in adapters], _F32)
    dfac = np.ones((len(adapters), n), _F32)
    isdora = np.zeros(len(adapters), np.bool_)
    for i, a in enumerate(adapters):
        if a[3] is not None:
            dfac[i] = a[3]
            isdora[i] = True
    use_ids = ids is not None
    idv = np.ascontiguousarray(ids, dtype=np.int32) if use_ids else np.zeros(1, np.int32)
    T = np.zeros((mm, rt), _F32)
    _shrink(np.ascontiguousarray(x, dtype=_F32), Ac, offs, ranks, idv, use_ids, T)
    return (T, Bc, offs, ranks, scales, dfac, isdora, idv, use_ids)


def matmul_float(fmt_id, q, s, z, k, group, sym, x, bias, y, adapters=None, ids=None):
    """y [M, N] (float32, C-contiguous, written) = x [M, K] @ W.T (+ adapters) (+ bias) from the
    row sections. adapters: see :func:`lora_operands` (shrink first, expansion fused into the
    epilogue of each output value, then the DoRA rescale, then bias)."""
    if x.shape[1] != k or y.shape != (x.shape[0], q.shape[0]):
        raise ValueError(f"shapes: x {x.shape}, K={k}, q {q.shape}, y {y.shape}")
    q = np.ascontiguousarray(q, dtype=np.uint8)
    s = np.ascontiguousarray(s, dtype=np.uint8)
    z = np.ascontiguousarray(z, dtype=np.uint8)
    x = np.ascontiguousarray(x, dtype=_F32)
    lo = lora_operands(x, y.shape[1], adapters, ids) if adapters else _no_adapters()
    if fmt_id in (NF4, FP4, INT4):
        x = _split_pairs(x)
    elif fmt_id in (INT2, INT3):
        x = _intq_lanes(x, 2 if fmt_id == INT2 else 3, group)
    if fmt_id in (INT4, INT2, INT3):
        gshift = 62 if group == -1 else int(group).bit_length() - 1   # per-channel: group index 0
    elif fmt_id in (NF4, FP4):
        gshift = int(group).bit_length() - 1
    else:
        gshift = 0
    has_bias = bias is not None
    b = np.ascontiguousarray(bias, dtype=_F32) if has_bias else np.zeros(1, _F32)
    if x.shape[0] <= MAX_SMALL_M:
        _SMALL[fmt_id](q, s, z, np.int64(gshift), bool(sym), x, y)
    else:
        _matmul(np.int64(fmt_id), q, s, z, np.int64(gshift), bool(sym), x, y)
    if has_bias or adapters:
        _finish(y, b, has_bias, *lo)
    return y
