"""compressed-tensors ``pack_quantized`` (llm-compressor W4A16) <-> pyqkern int4 QTensor.

Layout (compressed-tensors ``pack_to_int32``), weight [N, K]:

    weight_packed      int32 [N, ceil(K/8)]  8 consecutive K elements per word, element 8w+i at
                                             bits 4i; values stored as signed q + 8 (0..15)
    weight_scale       float [N, G]  (G = K/group_size; G = 1 for the channel strategy)
    weight_zero_point  int32 [ceil(N/8), G]  asymmetric only: signed zero + 8, packed along N
    weight_g_idx       int32 [K]  optional (act-order), same meaning as GPTQ's g_idx
    weight_shape       int [2]    (N, K)
    W[n, k] = scale[n, g(k)] * ((stored_q - 8) - (stored_zp - 8))

The stored nibbles are exactly pyqkern's codes and zero points (symmetric: no zero point, i.e.
8), so conversion is lossless for 4-bit when the scales are fp16-representable (fp16 scales
always are; bf16 checkpoints usually are, otherwise ValueError). compressed-tensors itself
dequantizes in the scale dtype (bf16/fp16 products); pyqkern's dequantize gives the exact fp32
products. Only num_bits=4 is supported. As with GPTQ, weight_g_idx holds groups, not places
within a group: a perm that orders a group's channels other than ascending comes back ascending
(same values; see pyqkern.io.convert_gptq on act-order).
"""
from __future__ import annotations

import numpy as np

from .._qtensor import QTensor
from ._convert_common import (as_fp16, as_int_words, group_size_for, int4_from_parts, int4_parts,
                              pack_nibbles_u32, perm_from_g_idx, unpack_nibbles_u32, unpermute)

__all__ = ["from_compressed_tensors", "to_compressed_tensors"]


def from_compressed_tensors(weight_packed, weight_scale, weight_zero_point=None, weight_g_idx=None,
                            weight_shape=None, num_bits=4, sym=None) -> QTensor:
    """pack_quantized tensors -> int4 QTensor [N, K] (with an input permutation for act-order).

    weight_shape defaults to (N, 8 * words). sym: None => symmetric iff no zero point is given."""
    if num_bits != 4:
        raise NotImplementedError(f"num_bits={num_bits}: only 4-bit pack_quantized converts to pyqkern int4")
    wp = np.asarray(weight_packed)
    if wp.ndim != 2:
        raise ValueError(f"weight_packed must be 2-D [N, ceil(K/8)], got shape {wp.shape}")
    n = wp.shape[0]
    if weight_shape is None:
        k = wp.shape[1] * 8
    else:
        ws = np.asarray(weight_shape).reshape(-1)
        if ws.size != 2 or ws.dtype.kind not in "iu":
            raise ValueError(f"weight_shape must be two integers, got {weight_shape!r}")
        if int(ws[0]) != n:
            raise ValueError(f"weight_shape {tuple(ws)} does not match weight_packed rows {n}")
        k = int(ws[1])
    wp = as_int_words(wp, "weight_packed", (n, -(-k // 8)))
    sc = np.asarray(weight_scale)
    if sc.size == 1:                                  # tensor strategy: one scale, broadcast per channel
        sc = np.broadcast_to(sc.reshape(1, 1), (n, 1))
    if sc.ndim != 2 or sc.shape[0] != n:
        raise ValueError(f"weight_scale must be [N={n}, G], got shape {sc.shape}")
    g = sc.shape[1]
    sc = as_fp16(sc, "weight_scale", (n, g))
    gs_param = group_size_for(k, g)
    gs = k if gs_param == -1 else gs_param
    codes = unpack_nibbles_u32(wp, k)                 # [N, K]
    if weight_zero_point is None:
        zeros = np.full((n, g), 8, np.uint8)
        if sym is None:
            sym = True
    else:
        if n % 8:
            raise ValueError(f"packed weight_zero_point needs N % 8 == 0, got N={n}")
        zp = as_int_words(weight_zero_point, "weight_zero_point", (n // 8, g))
        zeros = np.ascontiguousarray(unpack_nibbles_u32(np.ascontiguousarray(zp.T), n).T)   # [N, G]
        if sym is None:
            sym = False
        elif sym and not np.all(zeros == 8):
            raise ValueError("sym=True but the zero points are not all 0 (stored 8)")
    perm = None if weight_g_idx is None else perm_from_g_idx(weight_g_idx, k, g, gs)
    if perm is not None:
        codes = codes[:, perm]
    qt = int4_from_parts(codes, sc, zeros, gs_param, sym)
    return qt.with_perm(perm) if perm is not None else qt


def to_compressed_tensors(qt: QTensor, *, scale_dtype=np.float16) -> dict:
    """int4 QTensor -> dict(weight_packed, weight_scale, weight_shape int64 [2], and
    weight_zero_point for an asymmetric QTensor, weight_g_idx for a permuted one)."""
    codes, scales, zeros, gs = int4_parts(qt)
    n, k = qt.shape
    codes, g_idx = unpermute(codes, qt.perm, gs)
    kw = -(-k // 8)
    if kw * 8 != k:
        codes = np.concatenate([codes, np.zeros((n, kw * 8 - k), np.uint8)], axis=1)
    out = {"weight_packed": np.ascontiguousarray(pack_nibbles_u32(codes)).view(np.int32),
           "weight_scale": scales.astype(scale_dtype),
           "weight_shape": np.array([n, k], np.int64)}
    if not qt.sym:
        if n % 8:
            raise ValueError(f"packed weight_zero_point needs N % 8 == 0, got N={n}")
        out["weight_zero_point"] = np.ascontiguousarray(
            pack_nibbles_u32(np.ascontiguousarray(zeros.T)).T).view(np.int32)        # [N/8, G]
    if qt.perm is not None:
        out["weight_g_idx"] = g_idx
    return out
