"""GPTQ (AutoGPTQ / GPTQModel / transformers) 2/3/4/8-bit checkpoints <-> pyqkern int2 / int3 /
int4 / int8 QTensor.

GPTQ layout for a Linear with in=K, out=N, G groups, b bits:

    qweight int32 [K*b/32, N]  column n: the codes of input rows 0..K-1, packed low bits first
    qzeros  int32 [G, N*b/32]  row g: the stored zero points of columns 0..N-1, packed the same way
    scales  fp16  [G, N]
    g_idx   int32 [K]          group of each input channel (default k // group_size)
    W[k, n] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])

Packing: b = 2, 4, 8 put 32/b codes in each int32, code j of a word at bits b*j; b = 3 packs 32
codes into 3 consecutive words with codes straddling the word boundaries (10 codes, 2+1 bits of
code 10, 10 codes, 1+2 bits of code 21, 10 codes). Both are the same thing: the words, read as
little-endian bytes, form a bit stream in which code i sits at bits b*i..b*i+b-1 -- exactly
pyqkern's int2 / int3 / int4 row bytes. zero = stored + 1 for the v1 ("gptq") checkpoint format and
zero = stored for v2 ("gptq_v2"), at every bit width (symmetric: true zero 2^(b-1)).

pyqkern int2/int3/int4 are [N, K] (rows = output channels), fp16 scales [N, G], uint8 zero points
[N, G] or symmetric (zero 2^(b-1)): codes and scales map one to one, both directions are lossless.
pyqkern int8 is per output channel and symmetric with one fp32 scale per row (w = scale * c, c int8),
so an 8-bit GPTQ checkpoint converts exactly only when it has one group (group_size -1, or
group_size >= K) and every zero point is 128: then c = q - 128 and the fp16 scale is exact in fp32.
Anything else raises ValueError saying why (no silent loss); to_gptq of an int8 QTensor needs
scales that are exact in fp16.

Act-order (desc_act) checkpoints have a non-monotone g_idx. from_gptq sorts the input channels
by g_idx (stable), stores W[:, perm] with ordinary contiguous groups and returns
``qt.with_perm(perm)``; dequantize() gives back W in the original order exactly. This needs
every group to hold exactly K/G channels (true for GPTQ act-order). A g_idx holds each channel's
group, not its place within the group, so a QTensor whose perm orders a group's channels
otherwise (pyqkern.gptq keeps them ascending, as here) comes back from to_gptq -> from_gptq
with them ascending: the same dequantized values and float results, other stored bytes, and the
int8 path (activations quantized in 32-wide blocks of the stored order) may round differently.
"""
from __future__ import annotations

import glob
import os

import numpy as np

from .. import _formats
from .._qtensor import QTensor, assemble
from ..reference import pack_codes, unpack_codes
from . import safetensors as _st
from ._convert_common import (as_fp16, as_int_words, check_finite_scales, check_zero_points, group_size_for, integral,
                              json_object, perm_from_g_idx, unpermute)

__all__ = ["from_gptq", "to_gptq", "load_gptq_dir", "detect_gptq_format"]

BITS = (2, 3, 4, 8)
_FORMAT_OF = {2: "int2", 3: "int3", 4: "int4", 8: "int8"}


def _check_bits(bits):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in BITS:
        raise NotImplementedError(f"GPTQ bits={bits!r}: supported bit widths are 2, 3, 4 and 8")
    return int(bits)


def _unit(bits):
    """codes per whole number of int32 words (3-bit: 32 codes in 3 words)."""
    return 32 if bits == 3 else 32 // bits


def unpack_gptq_words(words, bits, count):
    """uint32 [R, W] -> codes uint8 [R, count]: the words as little-endian bytes form a bit stream,
    code i at bits bits*i (GPTQ's packing for 2, 3, 4 and 8 bits)."""
    w = np.ascontiguousarray(words, dtype="<u4")
    b = w.view(np.uint8).reshape(w.shape[0], -1)
    if bits == 8:
        return np.ascontiguousarray(b[:, :count])
    return unpack_codes(b, b.shape[1] * 8 // bits, bits)[:, :count].astype(np.uint8)


def pack_gptq_words(codes, bits):
    """codes [R, C] (C a multiple of 32/bits, 32 for 3 bits) -> uint32 [R, C*bits/32] (inverse of
    unpack_gptq_words)."""
    c = np.asarray(codes)
    b = c.astype(np.uint8) if bits == 8 else pack_codes(c, bits)
    return np.ascontiguousarray(b).view("<u4").astype(np.uint32)


def detect_gptq_format(stored_zeros, bits=4) -> str:
    """Guess "v1" or "v2" from the unpacked stored zero points (uint8 [G, N]) of a bits-wide checkpoint.

    Heuristic: a symmetric GPTQ checkpoint has every true zero point 2^(bits-1)
    (4-bit: 8), so all stored zeros 2^(bits-1) - 1 => v1 and all stored zeros 2^(bits-1) => v2.
    Anything else (an asymmetric checkpoint) cannot be told apart from the bytes alone; we then
    assume v1, the on-disk format AutoGPTQ and GPTQModel write (``checkpoint_format="gptq"``).
    Limits: an asymmetric v1 checkpoint whose zeros all happen to be 2^(bits-1) would be read as v2,
    and an asymmetric v2 checkpoint is read as v1 (off by one) unless format="v2" is given. Pass
    format explicitly whenever the checkpoint config says which it is."""
    z = np.asarray(stored_zeros)
    if z.size and np.all(z == 1 << (_check_bits(bits) - 1)):
        return "v2"
    return "v1"


def _intq_from_parts(bits, codes, scales16, zeros, group, sym) -> QTensor:
    """codes uint8 [N, K], scales fp16 [N, G], zeros uint8 [N, G] (ignored if sym) -> int2/3/4 QTensor."""
    fmt = _FORMAT_OF[bits]
    n, k = codes.shape
    params = _formats.resolve_params(fmt, k, group, sym)
    check_finite_scales(scales16)
    q = pack_codes(codes, bits)
    s = np.ascontiguousarray(scales16, np.float16).view(np.uint8).reshape(n, -1)
    z = None if sym else np.ascontiguousarray(zeros, np.uint8).reshape(n, -1)
    return assemble(fmt, n, k, params, q, s, z)


def _parts(qt: QTensor):
    """int2/3/4/8 QTensor -> (bits, codes uint8 [N, K] in stored column order (int8: c + 128),
    scales fp16 [N, G], zeros uint8 [N, G], group size in K units)."""
    if not isinstance(qt, QTensor) or qt.format not in ("int2", "int3", "int4", "int8"):
        raise ValueError(f"expected an int2, int3, int4 or int8 QTensor, got {qt!r}")
    n, k = qt.shape
    q, s, z = qt.sections()
    if qt.format == "int8":
        sc = np.ascontiguousarray(s).view(np.float32).reshape(n, 1)
        h = sc.astype(np.float16)
        if not np.array_equal(h.astype(np.float32), sc, equal_nan=True):
            raise ValueError("int8 scales (fp32) are not exactly representable in fp16, which GPTQ stores: the "
                             "conversion would be lossy")
        codes = (np.ascontiguousarray(q).view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return 8, codes, h, np.full((n, 1), 128, np.uint8), k
    bits = _formats.INTN_BITS[qt.format]
    codes = unpack_codes(q, k, bits).astype(np.uint8)
    scales = np.ascontiguousarray(s).view(np.float16).reshape(n, -1)
    g = scales.shape[1]
    zeros = np.full((n, g), 1 << (bits - 1), np.uint8) if qt.sym else np.ascontiguousarray(z).reshape(n, g).copy()
    check_zero_points(zeros, bits)
    return bits, codes, scales, zeros, (k if qt.group == -1 else qt.group)


_CHECKPOINT_FORMATS = {"gptq": "v1", "gptq_v2": "v2"}


def from_gptq(qweight, qzeros, scales, g_idx=None, bits=4, format="auto", sym=None,
              checkpoint_format=None) -> QTensor:
    """GPTQ tensors -> int2 / int3 / int4 / int8 QTensor [N, K] for bits 2 / 3 / 4 / 8 (with an
    input permutation for act-order g_idx).

    format: "v1" (zero = stored + 1), "v2" (zero = stored) or "auto" (see detect_gptq_format).
    checkpoint_format: GPTQModel's config value, "gptq" (v1) or "gptq_v2" (v2), which "auto"
    then follows (to_gptq's dict carries it, so ``from_gptq(**to_gptq(qt)) == qt`` unless qt's
    perm orders a group's channels other than ascending: see the module notes on act-order).
    sym: None detects (all zero points 2^(bits-1) => symmetric QTensor); True requires every zero
    to be 2^(bits-1); False keeps explicit zero points (not possible for bits=8).
    Raises ValueError for wrong shapes/dtypes, v1 stored zeros of 2^bits - 1 (the v1 asymmetric
    overflow bug: the true zero 2^bits cannot exist), an unsupported g_idx / group size, or an
    8-bit checkpoint that pyqkern int8 cannot hold exactly (several groups, zero points other
    than 128)."""
    bits = _check_bits(bits)
    if format not in ("auto", "v1", "v2"):
        raise ValueError(f"format must be 'auto', 'v1' or 'v2', got {format!r}")
    if checkpoint_format is not None:
        if checkpoint_format not in _CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
        said = _CHECKPOINT_FORMATS[checkpoint_format]
        if format not in ("auto", said):
            raise ValueError(f"format={format!r} contradicts checkpoint_format={checkpoint_format!r}")
        format = said
    unit, maxq, half = _unit(bits), (1 << bits) - 1, 1 << (bits - 1)
    wpu = unit * bits // 32                               # int32 words per packing unit
    qw = np.asarray(qweight)
    if qw.ndim != 2:
        raise ValueError(f"qweight must be 2-D [K*{bits}/32, N], got shape {qw.shape}")
    if qw.shape[0] % wpu:
        raise ValueError(f"{bits}-bit qweight has {qw.shape[0]} rows, not a multiple of {wpu} "
                         f"({unit} codes per {wpu} int32 words)")
    k, n = qw.shape[0] // wpu * unit, qw.shape[1]
    qw = as_int_words(qw, "qweight", qw.shape)
    sc = np.asarray(scales)
    if sc.ndim != 2 or sc.shape[1] != n:
        raise ValueError(f"scales must be [G, N={n}], got shape {sc.shape}")
    g = sc.shape[0]
    sc = as_fp16(sc, "scales", (g, n))
    if n % unit:
        raise ValueError(f"N={n} must be a multiple of {unit} (qzeros packs {unit} {bits}-bit columns per "
                         f"{wpu} int32 word{'s' if wpu > 1 else ''})")
    qz = as_int_words(qzeros, "qzeros", (g, n // unit * wpu))
    if bits == 8 and g != 1:
        raise ValueError(f"8-bit GPTQ with {g} groups: pyqkern int8 keeps one scale per output channel, so only "
                         "group_size -1 (one group) converts losslessly")
    gs_param = group_size_for(k, g)
    gs = k if gs_param == -1 else gs_param

    codes = unpack_gptq_words(qw.T, bits, k)              # [N, K]: column n's words -> its K codes
    stored = unpack_gptq_words(qz, bits, n)               # [G, N]
    fmt = detect_gptq_format(stored, bits) if format == "auto" else format
    if fmt == "v1":
        if np.any(stored == maxq):
            raise ValueError(f"GPTQ v1 qzeros hold the stored zero {maxq}, i.e. a true zero point of {maxq + 1}: "
                             "this is the v1 asymmetric overflow bug (zero 0 was stored as -1) and cannot be "
                             "represented; if the checkpoint is really v2 (gptq_v2), pass format='v2'")
        zeros = (stored.astype(np.int32) + 1).astype(np.uint8)
    else:
        zeros = stored.astype(np.uint8)
    all_half = bool(np.all(zeros == half))
    if sym is None:
        sym = all_half
    elif sym and not all_half:
        raise ValueError(f"sym=True but the zero points are not all {half} (check format='v1'/'v2')")

    perm = None if g_idx is None else perm_from_g_idx(g_idx, k, g, gs)
    if perm is not None:
        codes = codes[:, perm]
    if bits == 8:
        if not sym:
            bad = np.unique(zeros[zeros != half])[:4].tolist()
            why = f"zero points {bad} (format {fmt})" if bad else "sym=False"
            raise ValueError(f"8-bit GPTQ with {why}: pyqkern int8 is symmetric (zero point 128, w = scale * "
                             "(q - 128)) and cannot hold other zero points losslessly")
        check_finite_scales(sc)
        c = (codes.astype(np.int16) - 128).astype(np.int8)
        params = _formats.resolve_params("int8", k)
        s = np.ascontiguousarray(sc.T.astype(np.float32)).view(np.uint8).reshape(n, 4)
        qt = assemble("int8", n, k, params, c.view(np.uint8), s, None)
    else:
        qt = _intq_from_parts(bits, codes, sc.T, zeros.T, gs_param, sym)
    return qt.with_perm(perm) if perm is not None else qt


def to_gptq(qt: QTensor, format="v2") -> dict:
    """int2 / int3 / int4 / int8 QTensor -> dict(qweight int32 [K*b/32, N], qzeros int32 [G, N*b/32],
    scales fp16 [G, N], g_idx int32 [K], bits b, checkpoint_format "gptq" (v1) or "gptq_v2"
    (v2), as GPTQModel's config names it). An input permutation becomes the g_idx
    (act-order). format "v1" stores zero - 1 and raises ValueError if a zero point is 0 (not
    representable in v1). int8 becomes one group with zero point 128 (its scales must be exact in
    fp16). K and N must be multiples of 32/b (32 for 3 bits)."""
    if format not in ("v1", "v2"):
        raise ValueError(f"format must be 'v1' or 'v2', got {format!r}")
    bits, codes, scales, zeros, gs = _parts(qt)
    n, k = qt.shape
    unit = _unit(bits)
    if k % unit or n % unit:
        raise ValueError(f"GPTQ {bits}-bit packing needs K and N multiples of {unit}, got N={n}, K={k}")
    if format == "v1":
        if np.any(zeros == 0):
            raise ValueError("a zero point is 0: GPTQ v1 stores zero - 1 and cannot represent it; use format='v2'")
        zeros = zeros - 1
    codes, g_idx = unpermute(codes, qt.perm, gs)
    qweight = pack_gptq_words(codes, bits).T              # [N, K*b/32] -> [K*b/32, N]
    qzeros = pack_gptq_words(np.ascontiguousarray(zeros.T), bits)   # [G, N*b/32]
    return {"qweight": np.ascontiguousarray(qweight).view(np.int32),
            "qzeros": np.ascontiguousarray(qzeros).view(np.int32),
            "scales": np.ascontiguousarray(scales.T),
            "g_idx": g_idx,
            "bits": bits,
            "checkpoint_format": "gptq" if format == "v1" else "gptq_v2"}


def _read_quant_config(path):
    qc_path = os.path.join(path, "quantize_config.json")
    if os.path.exists(qc_path):
        return json_object(qc_path)
    cfg_path = os.path.join(path, "config.json")
    if os.path.exists(cfg_path):
        cfg = json_object(cfg_path)
        if "quantization_config" in cfg:
            qc = cfg["quantization_config"]
            if not isinstance(qc, dict):
                raise ValueError(f"{cfg_path}: quantization_config must be a JSON object, got {type(qc).__name__}")
            return qc
    raise ValueError(f"{path}: no quantize_config.json and no quantization_config in config.json")


def _config_int(cfg, key, default, path):
    v = cfg.get(key, default)
    if not integral(v):
        raise ValueError(f"{path}: quantization config {key!r} must be an integer, got {v!r}")
    return int(v)


def _tensor(tensors, name, path):
    if name not in tensors:
        raise ValueError(f"{path}: module {name.rsplit('.', 1)[0]!r} lacks tensor {name.rsplit('.', 1)[1]!r}")
    return tensors[name]


def load_gptq_dir(path) -> dict:
    """Load every quantized Linear of a GPTQ (bits 2, 3, 4, 8; also AutoAWQ GEMM or compressed-tensors
    pack_quantized 4-bit) checkpoint directory ->
    {module name: QTensor}. Reads quantize_config.json (or config.json quantization_config) and all
    *.safetensors files (tensors may be sharded over several files). Biases and non-quantized
    tensors are not returned.

    checkpoint_format "gptq_v2" => v2; "gptq" (the default) => v1, except that symmetric configs
    sniff the zeros (all 2^(bits-1), 4-bit: 8 => v2) because v2-style zeros mislabelled "gptq"
    occur in the wild. bits comes from the config (2, 3, 4 or 8); an 8-bit checkpoint that pyqkern
    int8 cannot hold exactly (group_size other than -1, asymmetric zeros) raises ValueError naming
    the module."""
    path = os.fspath(path)
    cfg = _read_quant_config(path)
    method = str(cfg.get("quant_method", "gptq")).lower()
    bits = _config_int(cfg, "bits", _config_int(cfg, "w_bit", 4, path), path)
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))  # the name literally ("[GPTQ]")
    if not files:
        raise ValueError(f"{path}: no *.safetensors files")
    # a shard index (model.safetensors.index.json) names the files the model needs: one missing
    # lost its modules without a word (review)
    for idx in sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors.index.json"))):
        wm = json_object(idx).get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise ValueError(f"{idx}: weight_map must map tensor names to file names")
        missing = sorted({v for v in wm.values() if not os.path.isfile(os.path.join(path, v))})
        if missing:
            raise ValueError(f"{idx} names shard(s) that are not in {path}: {missing[:3]}")
    tensors, seen = {}, {}
    for fn in files:
        t, _ = _st.load(fn)
        for name in t:
            if name in seen:  # which copy is meant is unknown: refuse, as `pyqkern quantize` does
                raise ValueError(f"{path}: tensor {name!r} is in both {seen[name]} and {os.path.basename(fn)}")
            seen[name] = os.path.basename(fn)
        tensors.update(t)
    mods = sorted(name[: -len(".qweight")] for name in tensors if name.endswith(".qweight"))
    out = {}
    if method == "awq":
        from .convert_awq import from_awq
        version = str(cfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise NotImplementedError(f"AWQ version {version!r}: only the GEMM layout is supported")
        if bits != 4:
            raise NotImplementedError(f"AWQ bits={bits}: only 4-bit AWQ checkpoints are supported")
        for m in mods:
            try:
                out[m] = from_awq(*(_tensor(tensors, m + t, path) for t in (".qweight", ".qzeros", ".scales")))
            except ValueError as e:
                raise ValueError(f"{path}: module {m!r}: {e}") from None
        return _found(out, path, "*.qweight")
    if method == "compressed-tensors":
        from .convert_ct import from_compressed_tensors
        groups = cfg.get("config_groups", {})
        if not isinstance(groups, dict) or not all(isinstance(g, dict) and isinstance(g.get("weights", {}), dict)
                                                   for g in groups.values()):
            raise ValueError(f"{path}: compressed-tensors config_groups must map names to objects with a 'weights' "
                             "object")
        fmts = {str(f) for f in [cfg.get("format")] + [g.get("format") for g in groups.values()] if f is not None}
        if fmts - {"pack-quantized"}:
            raise NotImplementedError(f"{path}: compressed-tensors format {', '.join(sorted(fmts))}: only "
                                      "'pack-quantized' (weight_packed int32 words) is read")
        nbits = [grp.get("weights", {}).get("num_bits", 4) for grp in groups.values()]
        if any(b != 4 for b in nbits):
            raise NotImplementedError(f"compressed-tensors num_bits {nbits}: only 4-bit is supported")
        for name in sorted(t for t in tensors if t.endswith(".weight_packed")):
            m = name[: -len(".weight_packed")]
            try:
                out[m] = from_compressed_tensors(tensors[name], _tensor(tensors, m + ".weight_scale", path),
                                                 tensors.get(m + ".weight_zero_point"),
                                                 tensors.get(m + ".weight_g_idx"), tensors.get(m + ".weight_shape"))
            except ValueError as e:
                raise ValueError(f"{path}: module {m!r}: {e}") from None
        return _found(out, path, "*.weight_packed")
    if method != "gptq":
        raise NotImplementedError(f"quant_method {method!r} is not a GPTQ checkpoint")
    bits = _check_bits(bits)
    ckpt = str(cfg.get("checkpoint_format", cfg.get("format", "gptq"))).lower()
    if ckpt == "gptq_v2":
        fmt = "v2"
    elif ckpt == "gptq":
        sym = cfg.get("sym", True)
        if not isinstance(sym, bool):  # "false" as a string read as true
            raise ValueError(f"{path}: quantization config 'sym' must be true or false, got {sym!r}")
        fmt = "auto" if sym else "v1"
    else:
        raise NotImplementedError(f"checkpoint_format {ckpt!r} is not supported (only 'gptq' and 'gptq_v2')")
    for m in mods:
        try:
            out[m] = from_gptq(tensors[m + ".qweight"], tensors[m + ".qzeros"], tensors[m + ".scales"],
                               tensors.get(m + ".g_idx"), bits=bits, format=fmt)
        except KeyError as e:
            raise ValueError(f"{path}: module {m!r} lacks tensor {e}") from None
        except ValueError as e:
            raise ValueError(f"{path}: module {m!r} ({bits}-bit): {e}") from None
    return _found(out, path, "*.qweight")


def _found(out, path, what):
    """out, or ValueError when a quantized checkpoint gave no module (an empty dict read as 'done')."""
    if not out:
        raise ValueError(f"{path}: the config says quantized, but no {what} tensor is in its safetensors files")
    return out
