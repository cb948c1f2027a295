"""GPTQ (AutoGPTQ / GPTQModel / transformers) 4-bit checkpoints <-> pyqkern int4 QTensor.

GPTQ layout for a Linear with in=K, out=N, G groups (see formats.md section 3):

    qweight int32 [K/8, N]   word (r, n): input rows 8r..8r+7 of column n, row 8r+j at bits 4j
    qzeros  int32 [G, N/8]   packed along N the same LSB-first way
    scales  fp16  [G, N]
    g_idx   int32 [K]        group of each input channel (default k // group_size)
    W[k, n] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])

with zero = stored + 1 for the v1 ("gptq") checkpoint format and zero = stored for v2 ("gptq_v2").
pyqkern int4 is [N, K] (rows = output channels), element 2i in the low nibble, fp16 scales
[N, G], uint8 zero points [N, G] or symmetric (zero 8). The codes and scales map one to one, so
both directions are lossless (4-bit only; 2/3/8-bit GPTQ is not supported).

Act-order (desc_act) checkpoints have a non-monotone g_idx. from_gptq sorts the input channels
by g_idx (stable), stores W[:, perm] with ordinary contiguous groups and returns
``qt.with_perm(perm)``; dequantize() gives back W in the original order exactly. This needs
every group to hold exactly K/G channels (true for GPTQ act-order).
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np

from .._qtensor import QTensor
from . import safetensors as _st
from ._convert_common import (as_fp16, as_int_words, group_size_for, int4_from_parts, int4_parts,
                              pack_nibbles_u32, perm_from_g_idx, unpack_nibbles_u32, unpermute)

__all__ = ["from_gptq", "to_gptq", "load_gptq_dir", "detect_gptq_format"]


def _check_bits(bits):
    if bits != 4:
        raise NotImplementedError(f"GPTQ bits={bits}: only 4-bit checkpoints convert to pyqkern int4 "
                                  "(2/3/8-bit GPTQ is not supported)")


def detect_gptq_format(stored_zeros) -> str:
    """Guess "v1" or "v2" from the unpacked stored zero nibbles (uint8 [G, N]).

    Heuristic (formats.md 3.5): a symmetric 4-bit GPTQ checkpoint has every true zero point 8, so
    all stored nibbles 7 => v1 and all stored nibbles 8 => v2. Anything else (an asymmetric
    checkpoint) cannot be told apart from the bytes alone; we then assume v1, the on-disk format
    AutoGPTQ and GPTQModel write (``checkpoint_format="gptq"``). Limits: an asymmetric v1
    checkpoint whose zeros all happen to be 8 (true zero 9) would be read as v2, and an asymmetric
    v2 checkpoint is read as v1 (off by one) unless format="v2" is given. Pass format explicitly
    whenever the checkpoint config says which it is."""
    z = np.asarray(stored_zeros)
    if z.size and np.all(z == 8):
        return "v2"
    return "v1"


def from_gptq(qweight, qzeros, scales, g_idx=None, bits=4, format="auto", sym=None) -> QTensor:
    """GPTQ tensors -> int4 QTensor [N, K] (with an input permutation for act-order g_idx).

    format: "v1" (zero = stored + 1), "v2" (zero = stored) or "auto" (see detect_gptq_format).
    sym: None detects (all zero points 8 => symmetric QTensor); True requires every zero to be 8;
    False keeps explicit zero points.
    Raises ValueError for wrong shapes/dtypes, v1 zero nibbles of 15 (the v1 asymmetric overflow
    bug: the true zero 16 cannot exist), or an unsupported g_idx / group size."""
    _check_bits(bits)
    if format not in ("auto", "v1", "v2"):
        raise ValueError(f"format must be 'auto', 'v1' or 'v2', got {format!r}")
    qw = np.asarray(qweight)
    if qw.ndim != 2:
        raise ValueError(f"qweight must be 2-D [K/8, N], got shape {qw.shape}")
    k, n = qw.shape[0] * 8, qw.shape[1]
    qw = as_int_words(qw, "qweight", (k // 8, n))
    sc = np.asarray(scales)
    if sc.ndim != 2 or sc.shape[1] != n:
        raise ValueError(f"scales must be [G, N={n}], got shape {sc.shape}")
    g = sc.shape[0]
    sc = as_fp16(sc, "scales", (g, n))
    if n % 8:
        raise ValueError(f"N={n} must be a multiple of 8 (qzeros packs 8 columns per int32)")
    qz = as_int_words(qzeros, "qzeros", (g, n // 8))
    gs_param = group_size_for(k, g)
    gs = k if gs_param == -1 else gs_param

    codes_kn = unpack_nibbles_u32(qw.T, k).T              # [K, N]: word row r, bits 4j -> k = 8r + j
    stored = unpack_nibbles_u32(qz, n)                     # [G, N]
    fmt = detect_gptq_format(stored) if format == "auto" else format
    if fmt == "v1":
        if np.any(stored == 15):
            raise ValueError("GPTQ v1 qzeros hold the nibble 15, i.e. a true zero point of 16: this is the v1 "
                             "asymmetric overflow bug (zero 0 was stored as -1) and cannot be represented; "
                             "if the checkpoint is really v2 (gptq_v2), pass format='v2'")
        zeros = (stored + 1).astype(np.uint8)
    else:
        zeros = stored.astype(np.uint8)
    all8 = bool(np.all(zeros == 8))
    if sym is None:
        sym = all8
    elif sym and not all8:
        raise ValueError("sym=True but the zero points are not all 8 (check format='v1'/'v2')")

    perm = None if g_idx is None else perm_from_g_idx(g_idx, k, g, gs)
    codes = codes_kn.T                                     # [N, K]
    if perm is not None:
        codes = codes[:, perm]
    qt = int4_from_parts(codes, sc.T, zeros.T, gs_param, sym)
    return qt.with_perm(perm) if perm is not None else qt


def to_gptq(qt: QTensor, format="v2") -> dict:
    """int4 QTensor -> dict(qweight int32 [K/8, N], qzeros int32 [G, N/8], scales fp16 [G, N],
    g_idx int32 [K]). An input permutation becomes the g_idx (act-order). format "v1" stores
    zero - 1 and raises ValueError if a zero point is 0 (not representable in v1)."""
    if format not in ("v1", "v2"):
        raise ValueError(f"format must be 'v1' or 'v2', got {format!r}")
    codes, scales, zeros, gs = int4_parts(qt)
    n, k = qt.shape
    if k % 8 or n % 8:
        raise ValueError(f"GPTQ packing needs K and N multiples of 8, got N={n}, K={k}")
    if format == "v1":
        if np.any(zeros == 0):
            raise ValueError("a zero point is 0: GPTQ v1 stores zero - 1 and cannot represent it; use format='v2'")
        zeros = zeros - 1
    codes, g_idx = unpermute(codes, qt.perm, gs)
    qweight = pack_nibbles_u32(codes).T                    # [N, K/8] -> [K/8, N]
    qzeros = pack_nibbles_u32(np.ascontiguousarray(zeros.T))  # [G, N/8]
    return {"qweight": np.ascontiguousarray(qweight).view(np.int32),
            "qzeros": np.ascontiguousarray(qzeros).view(np.int32),
            "scales": np.ascontiguousarray(scales.T),
            "g_idx": g_idx}


def _read_quant_config(path):
    qc_path = os.path.join(path, "quantize_config.json")
    if os.path.exists(qc_path):
        with open(qc_path) as f:
            return json.load(f)
    cfg_path = os.path.join(path, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        if "quantization_config" in cfg:
            return cfg["quantization_config"]
    raise ValueError(f"{path}: no quantize_config.json and no quantization_config in config.json")


def load_gptq_dir(path) -> dict:
    """Load every quantized Linear of a GPTQ (also AutoAWQ GEMM or compressed-tensors pack_quantized 4-bit)
    checkpoint directory ->
    {module name: QTensor}. Reads quantize_config.json (or config.json quantization_config) and all
    *.safetensors files (tensors may be sharded over several files). Biases and non-quantized
    tensors are not returned.

    checkpoint_format "gptq_v2" => v2; "gptq" (the default) => v1, except that symmetric configs
    sniff the zeros (all 8 => v2) because v2-style zeros mislabelled "gptq" occur in the wild."""
    path = os.fspath(path)
    cfg = _read_quant_config(path)
    method = str(cfg.get("quant_method", "gptq")).lower()
    bits = int(cfg.get("bits", cfg.get("w_bit", 4)))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files")
    tensors = {}
    for fn in files:
        t, _ = _st.load(fn)
        tensors.update(t)
    mods = sorted(name[: -len(".qweight")] for name in tensors if name.endswith(".qweight"))
    out = {}
    if method == "awq":
        from .convert_awq import from_awq
        version = str(cfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise NotImplementedError(f"AWQ version {version!r}: only the GEMM layout is supported")
        _check_bits(bits)
        for m in mods:
            out[m] = from_awq(tensors[m + ".qweight"], tensors[m + ".qzeros"], tensors[m + ".scales"])
        return out
    if method == "compressed-tensors":
        from .convert_ct import from_compressed_tensors
        nbits = [grp.get("weights", {}).get("num_bits", 4) for grp in cfg.get("config_groups", {}).values()]
        if any(b != 4 for b in nbits):
            raise NotImplementedError(f"compressed-tensors num_bits {nbits}: only 4-bit is supported")
        for name in sorted(t for t in tensors if t.endswith(".weight_packed")):
            m = name[: -len(".weight_packed")]
            out[m] = from_compressed_tensors(tensors[name], tensors[m + ".weight_scale"],
                                             tensors.get(m + ".weight_zero_point"), tensors.get(m + ".weight_g_idx"),
                                             tensors.get(m + ".weight_shape"))
        return out
    if method != "gptq":
        raise NotImplementedError(f"quant_method {method!r} is not a GPTQ checkpoint")
    _check_bits(bits)
    ckpt = str(cfg.get("checkpoint_format", cfg.get("format", "gptq"))).lower()
    if ckpt == "gptq_v2":
        fmt = "v2"
    elif ckpt == "gptq":
        fmt = "auto" if cfg.get("sym", True) else "v1"
    else:
        raise NotImplementedError(f"checkpoint_format {ckpt!r} is not supported (only 'gptq' and 'gptq_v2')")
    for m in mods:
        try:
            out[m] = from_gptq(tensors[m + ".qweight"], tensors[m + ".qzeros"], tensors[m + ".scales"],
                               tensors.get(m + ".g_idx"), bits=bits, format=fmt)
        except KeyError as e:
            raise ValueError(f"{path}: module {m!r} lacks tensor {e}") from None
    return out
