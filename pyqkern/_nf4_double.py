"""bitsandbytes' double quantization of nf4 / fp4 absmax: 8-bit dynamic code, blocks of 256.

offset = mean(absmax); (absmax - offset) is quantized blockwise (256) against the signed
dynamic map (``create_dynamic_map``), keeping one fp32 absmax per 256-block. Dequantize:
``code[q] * nested_absmax + offset``. The mean is taken in float64 and rounded to float32
(bitsandbytes uses torch's float32 mean; the last bit may differ, which is why the offset and
the code map are stored with the tensor rather than recomputed).
"""
from __future__ import annotations

import numpy as np

F32 = np.float32
NESTED_BLOCK = 256


def _linspace_f32(start, end, steps):
    # torch.linspace's float32 kernel: start + step*i for the first half, end - step*(steps-1-i) after
    start, end = F32(start), F32(end)
    step = F32((end - start) / F32(steps - 1))
    i = np.arange(steps)
    half = steps // 2
    lo = (start + step * i.astype(F32)).astype(F32)
    hi = (end - step * (steps - 1 - i).astype(F32)).astype(F32)
    return np.where(i < half, lo, hi).astype(F32)


def dynamic_map(signed=True, max_exponent_bits=7, total_bits=8) -> np.ndarray:
    """bitsandbytes.functional.create_dynamic_map, float32 [256] sorted."""
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        b = _linspace_f32(0.1, 1, fraction_items)
        means = ((b[:-1] + b[1:]) / F32(2.0)).astype(F32)
        scale = F32(10 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).astype(F32).tolist()
        if signed:
            data += (-scale * means).astype(F32).tolist()
    if additional_items > 0:
        b = _linspace_f32(0.1, 1, additional_items + 1)
        means = ((b[:-1] + b[1:]) / F32(2.0)).astype(F32)
        scale = F32(10 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).astype(F32).tolist()
        if signed:
            data += (-scale * means).astype(F32).tolist()
    data.append(0)
    data.append(1.0)
    data += [0] * (256 - len(data))
    data.sort()
    return np.array(data, dtype=F32)


CODE = dynamic_map()


def compress(absmax: np.ndarray):
    """fp32 absmax [m] -> (codes uint8 [m], nested absmax fp32 [ceil(m/256)], offset fp32, code map)."""
    a = np.ascontiguousarray(absmax, dtype=F32).ravel()
    m = a.size
    offset = F32(a.astype(np.float64).mean())
    v = (a - offset).astype(F32)
    nb = -(-m // NESTED_BLOCK)
    pad = np.zeros(nb * NESTED_BLOCK, F32)
    pad[:m] = v
    blocks = pad.reshape(nb, NESTED_BLOCK)
    nested = np.abs(blocks).max(axis=1).astype(F32)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(nested[:, None] == 0, F32(0), blocks / np.where(nested == 0, F32(1), nested)[:, None])
    # nearest code (ties to the lower code), via the sorted map's midpoints
    mids = ((CODE[:-1] + CODE[1:]) * F32(0.5)).astype(F32)
    idx = np.searchsorted(mids, norm.ravel().astype(F32), side="left").astype(np.uint8)
    return idx[:m], nested, offset, CODE.copy()


def decompress(codes, nested, offset, code_map) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.uint8)
    m = codes.size
    scale = np.repeat(np.asarray(nested, F32), NESTED_BLOCK)[:m]
    return (np.asarray(code_map, F32)[codes] * scale + F32(offset)).astype(F32)
