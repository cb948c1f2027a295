"""AutoAWQ GEMM 4-bit tensors <-> pyqkern int4 QTensor.

AWQ GEMM layout, Linear in=K, out=N, G = K/group_size:

    qweight int32 [K, N/8]   packed along the OUTPUT dim: nibble slot i (bits 4i) of word c holds
                             output channel 8c + AWQ_ORDER[i], AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
    qzeros  int32 [G, N/8]   same interleave; zero points stored as-is (no -1)
    scales  fp16  [G, N]
    W[k, n] = scales[k // gs, n] * (q[k, n] - zero[k // gs, n])

Lossless both ways (codes, fp16 scales and zeros map one to one). AWQ has no g_idx, so a
QTensor with an input permutation cannot be exported.
"""
from __future__ import annotations

import numpy as np

from .._qtensor import QTensor
from ._convert_common import (as_fp16, as_int_words, group_size_for, int4_from_parts, int4_parts,
                              pack_nibbles_u32, unpack_nibbles_u32)

__all__ = ["from_awq", "to_awq", "AWQ_ORDER"]

AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])
AWQ_REVERSE_ORDER = np.argsort(AWQ_ORDER)   # [0, 4, 1, 5, 2, 6, 3, 7]


def _unpack_awq(words, n):
    """uint32 [R, N/8] -> uint8 [R, N] in channel order."""
    slots = unpack_nibbles_u32(words, n).reshape(words.shape[0], n // 8, 8)   # [.., c, slot]
    return slots[:, :, AWQ_REVERSE_ORDER].reshape(words.shape[0], n)          # channel j = slot REVERSE[j]


def _pack_awq(vals):
    r, n = vals.shape
    ch = vals.reshape(r, n // 8, 8)
    return pack_nibbles_u32(ch[:, :, AWQ_ORDER].reshape(r, n))                 # slot i = channel ORDER[i]


def from_awq(qweight, qzeros, scales, sym=None) -> QTensor:
    """AWQ GEMM tensors -> int4 QTensor [N, K]. sym: None => symmetric QTensor when every zero is 8."""
    qw = np.asarray(qweight)
    if qw.ndim != 2:
        raise ValueError(f"qweight must be 2-D [K, N/8], got shape {qw.shape}")
    k, n = qw.shape[0], qw.shape[1] * 8
    qw = as_int_words(qw, "qweight", (k, n // 8))
    sc = np.asarray(scales)
    if sc.ndim != 2 or sc.shape[1] != n:
        raise ValueError(f"scales must be [G, N={n}], got shape {sc.shape}")
    g = sc.shape[0]
    sc = as_fp16(sc, "scales", (g, n))
    qz = as_int_words(qzeros, "qzeros", (g, n // 8))
    gs_param = group_size_for(k, g)
    codes = _unpack_awq(qw, n).T                                # [N, K]
    zeros = _unpack_awq(qz, n).T                                # [N, G]
    all8 = bool(np.all(zeros == 8))
    if sym is None:
        sym = all8
    elif sym and not all8:
        raise ValueError("sym=True but the AWQ zero points are not all 8")
    return int4_from_parts(codes, sc.T, zeros, gs_param, sym)


def to_awq(qt: QTensor) -> dict:
    """int4 QTensor -> dict(qweight int32 [K, N/8], qzeros int32 [G, N/8], scales fp16 [G, N])."""
    codes, scales, zeros, _ = int4_parts(qt)
    n = qt.shape[0]
    if qt.perm is not None:
        raise ValueError("AWQ has no g_idx: a QTensor with an input permutation (act-order) cannot be exported")
    if n % 8:
        raise ValueError(f"AWQ packs 8 output channels per int32: N={n} must be a multiple of 8")
    return {"qweight": np.ascontiguousarray(_pack_awq(np.ascontiguousarray(codes.T))).view(np.int32),
            "qzeros": np.ascontiguousarray(_pack_awq(np.ascontiguousarray(zeros.T))).view(np.int32),
            "scales": np.ascontiguousarray(scales.T)}
