"""Shared helpers of the foreign-format converters (GPTQ, AWQ, ORT MatMulNBits, bitsandbytes)."""
from __future__ import annotations

import json
import math

import numpy as np

from .. import _formats
from .._qtensor import QTensor, assemble


def as_int_words(a, name, shape):
    """int32/uint32 array of the exact shape -> uint32 view (copy if needed)."""
    a = np.asarray(a)
    if a.dtype not in (np.int32, np.uint32):
        raise ValueError(f"{name} must be int32 (or uint32), got {a.dtype}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(a.shape)}): a weight needs N and K > 0")
    return np.ascontiguousarray(a).view(np.uint32)


def as_fp16(a, name, shape):
    """Scales -> float16 of the exact shape. float32/float64 are accepted only if every value is
    exactly representable in fp16 (pyqkern stores fp16 scales; anything else would be lossy)."""
    a = np.asarray(a)
    if a.dtype.kind != "f":
        raise ValueError(f"{name} must be a float array (float16), got {a.dtype}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    if a.dtype == np.float16:
        return np.ascontiguousarray(a)
    h = a.astype(np.float16)
    if not np.array_equal(h.astype(a.dtype), a, equal_nan=True):
        raise ValueError(f"{name} ({a.dtype}) is not exactly representable in float16: pyqkern int4 keeps "
                         "fp16 scales, so the conversion would be lossy")
    return h


def unpack_nibbles_u32(words, axis_len_out):
    """uint32 [..., W] -> uint8 [..., 8*W] with nibble j of word w at position 8w+j (LSB first)."""
    w = np.asarray(words, np.uint32)
    sh = np.arange(8, dtype=np.uint32) * np.uint32(4)
    out = ((w[..., None] >> sh) & np.uint32(0xF)).astype(np.uint8)
    return out.reshape(*w.shape[:-1], w.shape[-1] * 8)[..., :axis_len_out]


def pack_nibbles_u32(codes):
    """uint8 [..., 8*W] (values 0..15) -> uint32 [..., W], element 8w+j at bits 4j."""
    c = np.asarray(codes, np.uint32)
    c = c.reshape(*c.shape[:-1], c.shape[-1] // 8, 8)
    sh = np.arange(8, dtype=np.uint32) * np.uint32(4)
    return np.bitwise_or.reduce(c << sh, axis=-1).astype(np.uint32)


def finite_number(v):
    """v is a number from a config file or a model attribute (int or float, not bool) and finite;
    ints of any size are (math.isfinite would overflow on a JSON integer beyond float's range)"""
    return not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, float) and math.isfinite(v)))


def integral(v):
    """v is a finite number with an integer value (4 or 4.0)"""
    return finite_number(v) and v == int(v)


def json_object(fn, what="the file"):
    """A JSON file holding an object -> dict; ValueError naming the file otherwise (FileNotFoundError
    passes through)."""
    try:
        with open(fn, encoding="utf-8") as f:
            v = json.load(f)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{fn}: not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(v, dict):
        raise ValueError(f"{fn}: {what} must be a JSON object, got {type(v).__name__}")
    return v


def group_size_for(k, n_groups):
    """pyqkern group parameter for K input channels split into n_groups equal groups."""
    if k <= 0 or n_groups <= 0 or k % n_groups:
        raise ValueError(f"K={k} is not divisible into {n_groups} groups")
    if n_groups == 1:
        return -1
    gs = k // n_groups
    if gs < 16 or gs & (gs - 1):
        raise ValueError(f"group size {gs} is not supported by pyqkern int4 (power of two >= 16, or -1)")
    return gs


def check_finite_scales(scales, what="scales"):
    """ValueError for NaN / Inf among a checkpoint's scales: its weights would dequantize to NaN /
    Inf (quantize refuses such inputs the same way); the first bad position is named."""
    a = np.asarray(scales)
    bad = ~np.isfinite(a)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{what}: {int(bad.sum())} NaN or Inf value(s), the first at index {at} ({a[at]}); "
                         "the checkpoint is damaged (those weights would dequantize to NaN / Inf)")


def int4_from_parts(codes, scales16, zeros, group, sym) -> QTensor:
    """codes uint8 [N, K] (0..15), scales fp16 [N, G], zeros uint8 [N, G] (ignored if sym) -> int4 QTensor."""
    n, k = codes.shape
    if k % 2:
        raise ValueError(f"K={k} must be even for pyqkern int4 (two codes per byte)")
    params = _formats.resolve_params("int4", k, group, sym)
    c = np.ascontiguousarray(codes, np.uint8)
    q = (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)
    check_finite_scales(scales16)
    s = np.ascontiguousarray(scales16, np.float16).view(np.uint8).reshape(n, -1)
    z = None if sym else np.ascontiguousarray(zeros, np.uint8).reshape(n, -1)
    return assemble("int4", n, k, params, q, s, z)


def int4_parts(qt: QTensor):
    """int4 QTensor -> (codes uint8 [N, K] in stored column order, scales fp16 [N, G], zeros uint8 [N, G]
    (8 where sym), group size in K units)."""
    if not isinstance(qt, QTensor) or qt.format != "int4":
        raise ValueError(f"expected an int4 QTensor, got {qt!r}")
    n, k = qt.shape
    q, s, z = qt.sections()
    codes = np.empty((n, k), np.uint8)
    codes[:, 0::2] = q & 0x0F
    codes[:, 1::2] = q >> 4
    scales = np.ascontiguousarray(s).view(np.float16).reshape(n, -1)
    g = scales.shape[1]
    zeros = np.full((n, g), 8, np.uint8) if qt.sym else np.ascontiguousarray(z).reshape(n, g).copy()
    check_zero_points(zeros, 4)
    gs = k if qt.group == -1 else qt.group
    return codes, scales, zeros, gs


def check_zero_points(zeros, bits):
    """The exported formats pack zero points in fields of the codes' width: a pyqkern zero point
    beyond 2^bits - 1 (its byte can hold one; no quantizer makes one) would spill into the
    neighbouring channel's field and change that weight, so it is refused."""
    if zeros.size and int(zeros.max()) >= 1 << bits:
        raise ValueError(f"zero point {int(zeros.max())} does not fit the {bits}-bit field of the target format")


def perm_from_g_idx(g_idx, k, g, gs):
    """g_idx (int [K] group of each input channel) -> None (plain k // gs) or the stable sort
    permutation that makes the groups contiguous. ValueError if groups are not all gs wide."""
    gi = np.asarray(g_idx)
    if gi.dtype.kind not in "iu" or gi.shape != (k,):
        raise ValueError(f"g_idx must be an integer array of shape ({k},), got {gi.dtype} {gi.shape}")
    gi = gi.astype(np.int64)
    if gi.size and (gi.min() < 0 or gi.max() >= g):
        raise ValueError(f"g_idx values must be in [0, {g})")
    plain = np.arange(k) // gs
    if np.array_equal(gi, plain):
        return None
    perm = np.argsort(gi, kind="stable")
    if not np.array_equal(gi[perm], plain):
        raise ValueError(f"g_idx does not give every group exactly {gs} input channels: cannot be "
                         "expressed as a permutation plus contiguous groups")
    return perm


def unpermute(codes, perm, gs):
    """Stored codes [N, K] of a permuted QTensor -> (codes in original column order, g_idx int32 [K])."""
    k = codes.shape[1]
    g_stored = (np.arange(k) // gs).astype(np.int32)
    if perm is None:
        return codes, g_stored
    orig = np.empty_like(codes)
    orig[:, perm] = codes                  # stored column j is original column perm[j]
    g_idx = np.empty(k, np.int32)
    g_idx[perm] = g_stored
    return orig, g_idx
