"""Format table and byte layout of a quantized tensor (one source for every backend).

A QTensor of shape [N, K] holds its canonical bytes as consecutive sections, each row-major:

    q  [N, rq]  codes; for ggml formats exactly the ggml block bytes of each row
    s  [N, rs]  scales (int2/3/4: fp16 per group; nf4/fp4: fp32 absmax per block; int8: fp32 per row)
    z  [N, rz]  zero points (int4 asymmetric: one uint8 per group)

nf4 / fp4 with double quantization replace the fp32 absmax section by bitsandbytes' nested
statistics: uint8 codes [N*K/bs], nested absmax fp32 [ceil(N*K/bs/256)], offset fp32 [1]
and the 256-entry fp32 code map.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

FORMAT_IDS = {"q4_0": 0, "q4_1": 1, "q8_0": 2, "q4_k": 3, "q6_k": 4, "iq4_nl": 5, "nf4": 6, "int4": 7, "int8": 8,
              "int2": 9, "int3": 10, "fp4": 11}


@dataclass(frozen=True)
class FormatInfo:
    name: str
    block: int          # K must be a multiple of this (0: depends on params)
    ggml: bool          # stored as ggml blocks
    origin: str


FORMATS = {
    "q4_0": FormatInfo("q4_0", 32, True, "ggml/llama.cpp Q4_0 (18 bytes / 32 weights)"),
    "q4_1": FormatInfo("q4_1", 32, True, "ggml/llama.cpp Q4_1 (20 bytes / 32 weights)"),
    "q8_0": FormatInfo("q8_0", 32, True, "ggml/llama.cpp Q8_0 (34 bytes / 32 weights)"),
    "q4_k": FormatInfo("q4_k", 256, True, "ggml/llama.cpp Q4_K (144 bytes / 256 weights)"),
    "q6_k": FormatInfo("q6_k", 256, True, "ggml/llama.cpp Q6_K (210 bytes / 256 weights)"),
    "iq4_nl": FormatInfo("iq4_nl", 32, True, "ggml/llama.cpp IQ4_NL (18 bytes / 32 weights)"),
    "nf4": FormatInfo("nf4", 0, False, "bitsandbytes NF4, fp32 absmax per block (default 64)"),
    "int4": FormatInfo("int4", 0, False, "group-wise int4, fp16 scales, uint8 zero points (GPTQ rounding)"),
    "int8": FormatInfo("int8", 0, False, "symmetric per-output-channel int8, fp32 scales"),
    "int2": FormatInfo("int2", 0, False, "group-wise int2 like int4 (4 codes per byte, low bits first)"),
    "int3": FormatInfo("int3", 0, False, "group-wise int3 like int4 (little-endian 3-bit stream)"),
    "fp4": FormatInfo("fp4", 0, False, "bitsandbytes FP4, fp32 absmax per block (default 64)"),
}

# group-wise integer formats (GPTQ's quantizer): bits per code
INTN_BITS = {"int2": 2, "int3": 3, "int4": 4}
# formats with a group / block-size parameter
GROUPED = ("nf4", "fp4", "int2", "int3", "int4")
# bitsandbytes 4-bit formats: fp32 absmax per block, optional double quantization
BNB4 = ("nf4", "fp4")

DEFAULT_GROUP = {"nf4": 64, "fp4": 64, "int2": 128, "int3": 128, "int4": 128}


def resolve_params(fmt: str, k: int, group=None, sym=None, double_quant=False) -> dict:
    """Validated format parameters with defaults filled in. Raises ValueError naming the problem."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
    for name, v in (("sym", sym), ("double_quant", double_quant)):  # "no" would be truthy
        if v is not None and not isinstance(v, (bool, np.bool_)) and v not in (0, 1):
            raise ValueError(f"{fmt}: {name} must be True or False, got {v!r}")
    info = FORMATS[fmt]
    if fmt not in GROUPED:
        if group not in (None, 0):
            raise ValueError(f"{fmt}: group size is fixed, got group={group}")
        if sym not in (None, False, 0):
            raise ValueError(f"{fmt}: 'sym' applies to int2/int3/int4 only")
        if double_quant:
            raise ValueError(f"{fmt}: double_quant applies to nf4/fp4 only")
        if info.block and k % info.block:
            raise ValueError(f"{fmt}: K={k} is not a multiple of the block size {info.block}")
        return {"group": 0, "sym": 0}
    try:
        g = DEFAULT_GROUP[fmt] if group in (None, 0) else operator.index(group)  # not 64.5 -> 64, not "64"
    except TypeError:
        raise ValueError(f"{fmt}: group must be an integer, got {group!r}") from None
    if fmt in BNB4:
        if sym not in (None, False, 0):
            raise ValueError(f"{fmt}: 'sym' applies to int2/int3/int4 only")
        if g < 32 or g > 4096 or g & (g - 1):
            raise ValueError(f"{fmt}: block size must be a power of two in [32, 4096], got {g}")
        if k % g:
            raise ValueError(f"{fmt}: K={k} is not a multiple of the block size {g}")
        return {"group": g, "sym": 0, "double_quant": bool(double_quant)}
    # int2 / int3 / int4
    if double_quant:
        raise ValueError(f"{fmt}: double_quant applies to nf4/fp4 only")
    bits = INTN_BITS[fmt]
    unit = 8 if bits == 3 else 8 // bits  # codes per whole number of bytes
    if g == -1:
        if k % unit:
            raise ValueError(f"{fmt}: K={k} must be a multiple of {unit} ({bits}-bit codes fill whole bytes)")
    elif g < 16 or g & (g - 1):
        raise ValueError(f"{fmt}: group size must be a power of two >= 16 or -1 (per-channel), got {g}")
    elif k % g:
        raise ValueError(f"{fmt}: K={k} is not a multiple of the group size {g}")
    return {"group": g, "sym": 1 if sym else 0}


def row_bytes(fmt: str, k: int, params: dict) -> tuple[int, int, int]:
    """(rq, rs, rz): bytes per row of each section (before nf4/fp4 double quantization)."""
    if fmt in ("q4_0", "iq4_nl"):
        return k // 32 * 18, 0, 0
    if fmt == "q4_1":
        return k // 32 * 20, 0, 0
    if fmt == "q8_0":
        return k // 32 * 34, 0, 0
    if fmt == "q4_k":
        return k // 256 * 144, 0, 0
    if fmt == "q6_k":
        return k // 256 * 210, 0, 0
    if fmt in BNB4:
        return k // 2, k // params["group"] * 4, 0
    if fmt in INTN_BITS:
        groups = 1 if params["group"] == -1 else k // params["group"]
        return k * INTN_BITS[fmt] // 8, groups * 2, 0 if params["sym"] else groups
    if fmt == "int8":
        return k, 4, 0
    raise ValueError(fmt)
