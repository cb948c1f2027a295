"""ONNX Runtime ``com.microsoft.MatMulNBits`` (bits=4) <-> pyqkern int4 QTensor.

MatMulNBits: B uint8 [N, k_blocks, block_size/2], packed along K inside
each block, element 2i in the LOW nibble (the same bytes as pyqkern's int4 q section when
block_size == group); scales [N, k_blocks] (float or float16, the type of A); optional
zero_points packed uint8 [N, ceil(k_blocks/2)] (block 2j low nibble) or unpacked float
[N, k_blocks]; default zero point 8. Dequant (q - zp) * scale, Y = A @ dequant(B).T.

Lossless: to_ort_nbits always is (fp16 scales widen exactly to fp32). from_ort_nbits is lossless
when the scales are fp16-representable (otherwise ValueError, or round_scales=True to round them
to fp16 on purpose), zero points are integers 0..15, and K is a multiple of block_size (a single
padded block, k_blocks == 1, maps to a per-channel QTensor). A per-channel QTensor exports as
one padded block of size next_pow2(K).
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from .._qtensor import QTensor
from ._convert_common import as_fp16, int4_from_parts, int4_parts, integral

__all__ = ["from_ort_nbits", "to_ort_nbits", "to_onnx_matmulnbits"]


def _check_block(block_size):
    if not isinstance(block_size, (int, np.integer)) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")


def _rows(a, name, n, per_row, *shapes):
    """a [n, per_row] from ONNX's flat [n * per_row], [n, per_row] or one of shapes; any other shape
    (a transposed tensor has the same size) is refused."""
    if a.shape not in ((n * per_row,), (n, per_row)) + shapes:
        want = " or ".join(str(t) for t in ((n * per_row,), (n, per_row)) + shapes)
        raise ValueError(f"{name} has shape {a.shape}, expected {want}")
    return a.reshape(n, per_row)


def from_ort_nbits(B, scales, zero_points=None, *, K, N, block_size, bits=4, sym=None,
                   round_scales=False) -> QTensor:
    """MatMulNBits initializers -> int4 QTensor [N, K].

    sym: None => symmetric iff zero_points is None (so to_ort_nbits gives back the same inputs)."""
    if bits != 4:
        raise NotImplementedError(f"MatMulNBits bits={bits}: only 4-bit converts to pyqkern int4")
    _check_block(block_size)
    for name, v in (("K", K), ("N", N)):
        if not (isinstance(v, np.integer) or integral(v)):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    k, n, bs = int(K), int(N), int(block_size)
    if k <= 0 or n <= 0:
        raise ValueError(f"K and N must be positive, got K={K}, N={N}")
    nb = -(-k // bs)
    b = np.asarray(B)
    if b.dtype != np.uint8:
        raise ValueError(f"B must be uint8, got {b.dtype}")
    b = _rows(b, "B", n, nb * bs // 2, (n, nb, bs // 2))
    if k % bs:
        if nb != 1:
            raise ValueError(f"K={k} is not a multiple of block_size={bs}: a padded last block cannot be "
                             "represented by pyqkern int4 groups (only a single padded block, per-channel)")
        group = -1
    else:
        group = -1 if nb == 1 else bs
    if k % 2:
        raise ValueError(f"K={k} must be even for pyqkern int4")
    q = np.ascontiguousarray(b[:, : k // 2])
    codes = np.empty((n, k), np.uint8)
    codes[:, 0::2] = q & 0x0F
    codes[:, 1::2] = q >> 4

    sc = np.asarray(scales)
    sc = _rows(sc, "scales", n, nb)
    if round_scales and sc.dtype.kind == "f" and sc.dtype != np.float16:
        with np.errstate(over="ignore"):
            h = sc.astype(np.float16)
        if np.any(np.isinf(h) & np.isfinite(sc)):
            raise ValueError("MatMulNBits scales beyond float16's range (65504) cannot be rounded to float16")
        if not np.array_equal(h.astype(sc.dtype), sc):
            warnings.warn("MatMulNBits scales rounded to float16: the QTensor is not bit-exact", stacklevel=2)
        sc = h
    sc = as_fp16(sc, "scales", (n, nb))

    if zero_points is None:
        zeros = np.full((n, nb), 8, np.uint8)
        if sym is None:
            sym = True
    else:
        zp = np.asarray(zero_points)
        if zp.dtype == np.uint8:
            zp = _rows(zp, "packed zero_points", n, -(-nb // 2))
            nzb = zp.shape[1]
            zz = np.empty((n, nzb * 2), np.uint8)
            zz[:, 0::2] = zp & 0x0F
            zz[:, 1::2] = zp >> 4
            zeros = np.ascontiguousarray(zz[:, :nb])
        elif zp.dtype.kind == "f":
            zf = _rows(zp, "unpacked zero_points", n, nb)
            if not np.all((zf == np.round(zf)) & (zf >= 0) & (zf <= 15)):
                raise ValueError("unpacked float zero_points must be integers in 0..15 to map to int4")
            zeros = zf.astype(np.uint8)
        else:
            raise ValueError(f"zero_points must be packed uint8 or float, got {zp.dtype}")
        if sym is None:
            sym = False
        elif sym and not np.all(zeros == 8):
            raise ValueError("sym=True but the zero points are not all 8")
    return int4_from_parts(codes, sc, zeros, group, sym)


def to_ort_nbits(qt: QTensor, *, scales_dtype=np.float32, zero_points="auto") -> dict:
    """int4 QTensor -> dict(B, scales, zero_points (or None), K, N, block_size, bits).

    zero_points: "auto" (None for a symmetric QTensor, else packed uint8) | "packed" | "none"
    (only for symmetric tensors). A QTensor with an input permutation is refused (MatMulNBits'
    g_idx input is deprecated); to_onnx_matmulnbits handles it with a Gather on A."""
    if qt.perm is not None:
        raise ValueError("QTensor has an input permutation: MatMulNBits has no supported g_idx; "
                         "use to_onnx_matmulnbits (adds a Gather) or un-permute the input yourself")
    codes, scales, zeros, gs = int4_parts(qt)
    n, k = qt.shape
    if qt.group == -1:
        bs = max(16, 1 << (k - 1).bit_length())
    else:
        bs = gs
    nb = -(-k // bs)
    if bs * nb != k:
        codes = np.concatenate([codes, np.zeros((n, bs * nb - k), np.uint8)], axis=1)
    b = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).reshape(n, nb, bs // 2)
    if zero_points not in ("auto", "packed", "none"):
        raise ValueError(f"zero_points must be 'auto', 'packed' or 'none', got {zero_points!r}")
    if zero_points == "none" and not qt.sym:
        raise ValueError("zero_points='none' needs a symmetric QTensor")
    if zero_points == "none" or (zero_points == "auto" and qt.sym):
        zp = None
    else:
        z = zeros
        if nb % 2:
            z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
        zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    return {"B": np.ascontiguousarray(b), "scales": scales.astype(scales_dtype), "zero_points": zp,
            "K": k, "N": n, "block_size": bs, "bits": 4}


def to_onnx_matmulnbits(path, qt: QTensor, *, bias=None, accuracy_level=0, input_dtype="float32",
                        opset=21):
    """Write a one-node (plus a Gather for a permuted QTensor) ONNX model Y = A @ W.T (+ bias) with
    com.microsoft.MatMulNBits; A is [M, K] of input_dtype ("float32" | "float16"). Needs the
    ``onnx`` package. Returns the onnx ModelProto (also saved to path unless path is None)."""
    from onnx import TensorProto, helper, numpy_helper

    dt = np.dtype(input_dtype)
    if dt not in (np.float32, np.float16):
        raise ValueError(f"input_dtype must be float32 or float16, got {input_dtype!r}")
    tp = TensorProto.FLOAT if dt == np.float32 else TensorProto.FLOAT16
    perm = qt.perm
    base = qt if perm is None else QTensor(qt.format, qt.shape, qt.data, qt.params)
    d = to_ort_nbits(base, scales_dtype=dt)
    n, k = qt.shape
    inits = [numpy_helper.from_array(d["B"], "B"), numpy_helper.from_array(d["scales"], "scales")]
    nodes = []
    a_name = "A"
    if perm is not None:
        inits.append(numpy_helper.from_array(perm.astype(np.int64), "perm"))
        nodes.append(helper.make_node("Gather", ["A", "perm"], ["A_perm"], axis=-1))
        a_name = "A_perm"
    inputs = [a_name, "B", "scales"]
    if d["zero_points"] is not None:
        inits.append(numpy_helper.from_array(d["zero_points"], "zero_points"))
        inputs.append("zero_points")
    if bias is not None:
        bvec = np.asarray(bias, dt).reshape(-1)
        if bvec.shape != (n,):
            raise ValueError(f"bias must have {n} elements, got {np.asarray(bias).shape}")
        inits.append(numpy_helper.from_array(bvec, "bias"))
        while len(inputs) < 5:
            inputs.append("")                      # zero_points, g_idx optional slots
        inputs.append("bias")
    nodes.append(helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                                  block_size=d["block_size"], accuracy_level=int(accuracy_level)))
    graph = helper.make_graph(nodes, "pyqkern_matmulnbits", [helper.make_tensor_value_info("A", tp, ["M", k])],
                              [helper.make_tensor_value_info("Y", tp, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)])
    if path is not None:
        with open(os.fspath(path), "wb") as f:
            f.write(model.SerializeToString())
    return model


def _gather_perm(src, inits, producers, k):
    """The input-channel permutation of a Gather feeding MatMulNBits' A, as to_onnx_matmulnbits
    writes it (default domain, axis -1, constant 1-D indices that permute 0..K-1), else None: any
    other Gather (a row or token selection, an axis other than the last, a partial index list) is
    the model's own op, not part of the weight."""
    from onnx import helper

    if src is None or src.op_type != "Gather" or src.domain not in ("", "ai.onnx") or len(src.input) != 2:
        return None
    axis = {a.name: helper.get_attribute_value(a) for a in src.attribute}.get("axis", 0)
    if axis != -1:
        return None
    name = src.input[1]
    if name in inits:
        idx = _to_array(inits[name], f"Gather {src.name or '?'} indices")
    else:
        cst = producers.get(name)
        if cst is None or cst.op_type != "Constant":
            return None
        vals = [a for a in cst.attribute if a.name == "value"]
        if not vals:
            return None
        idx = _to_array(vals[0].t, f"Constant {cst.name or '?'} feeding Gather {src.name or '?'}")
    if idx.dtype.kind not in "iu" or idx.shape != (k,):
        return None
    idx = idx.astype(np.int64)
    if not np.array_equal(np.sort(idx), np.arange(k)):
        return None
    return idx


def _to_array(tensor, what):
    """numpy_helper.to_array with a ValueError naming the tensor for what a hostile file can hold
    (unknown data_type: KeyError, UNDEFINED: TypeError, raw_data of the wrong length: a bare
    reshape error, external data outside the model's folder: onnx's ValidationError)."""
    from onnx import numpy_helper

    try:
        return numpy_helper.to_array(tensor)
    except Exception as e:  # onnx raises several unrelated types here
        raise ValueError(f"{what}: tensor {tensor.name!r} (data_type {tensor.data_type}, dims {list(tensor.dims)}) "
                         f"cannot be read: {type(e).__name__}: {str(e)[:200]}") from None


def load_onnx_matmulnbits(model_or_path, *, round_scales=False):
    """Read every com.microsoft.MatMulNBits node of an .onnx model (path or ModelProto) back into
    QTensors: -> (weights {name: QTensor}, biases {name: ndarray}). name is the node's name, or its
    B initializer's name when the node has none. A Gather on the last axis whose constant indices
    permute 0..K-1, feeding input A (what to_onnx_matmulnbits writes for act-order weights), becomes
    qt.perm; other Gathers are the model's own ops and are left alone. 4-bit only; a
    non-empty g_idx input is refused (it is deprecated in ONNX Runtime). round_scales: as in
    from_ort_nbits (ONNX Runtime's own quantizer writes fp32 scales that fp16 does not hold exactly:
    round them to fp16 instead of refusing). Needs the onnx package."""
    import onnx

    if isinstance(model_or_path, (str, bytes, os.PathLike)):
        try:
            model = onnx.load(os.fspath(model_or_path))
        except Exception as e:  # protobuf decode errors, missing file, ...
            raise ValueError(f"{model_or_path}: not a readable ONNX model ({e})") from None
    elif isinstance(model_or_path, onnx.ModelProto):
        model = model_or_path
    else:
        raise TypeError(f"expected a path or an onnx.ModelProto, got {type(model_or_path).__name__}")
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: nd for nd in g.node for o in nd.output}

    def const(name, what, node):
        if name not in inits:
            raise ValueError(f"MatMulNBits {node.name or '?'}: {what} {name!r} is not an initializer")
        return _to_array(inits[name], f"MatMulNBits {node.name or '?'} {what}")

    weights, biases = {}, {}
    for nd in g.node:
        if nd.op_type != "MatMulNBits" or nd.domain != "com.microsoft":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nd.attribute}
        for req in ("K", "N", "block_size"):
            if req not in attrs:
                raise ValueError(f"MatMulNBits {nd.name or '?'}: attribute {req} missing")
        for a in ("K", "N", "block_size", "bits"):
            v = attrs.get(a, 4)
            if not integral(v):
                raise ValueError(f"MatMulNBits {nd.name or '?'}: attribute {a} must be an integer, got {v!r}")
        bits = int(attrs.get("bits", 4))
        if bits != 4:
            raise NotImplementedError(f"MatMulNBits {nd.name or '?'}: bits={bits}; only 4-bit is supported")
        ins = list(nd.input) + [""] * (6 - len(nd.input))
        if ins[4]:
            raise NotImplementedError(f"MatMulNBits {nd.name or '?'}: the g_idx input is not supported")
        zp = const(ins[3], "zero_points", nd) if ins[3] else None
        qt = from_ort_nbits(const(ins[1], "B", nd), const(ins[2], "scales", nd), zp, K=int(attrs["K"]),
                            N=int(attrs["N"]), block_size=int(attrs["block_size"]), bits=bits,
                            round_scales=round_scales)
        perm = _gather_perm(producers.get(ins[0]), inits, producers, int(attrs["K"]))
        if perm is not None:
            qt = qt.with_perm(perm)
        name = nd.name or ins[1]
        if name in weights:  # one would silently replace the other (review)
            raise ValueError(f"two MatMulNBits nodes are both named {name!r} (a node's name, or its B "
                             "initializer's when it has none)")
        weights[name] = qt
        if ins[5]:
            b = const(ins[5], "bias", nd)
            if b.size != qt.shape[0]:
                raise ValueError(f"MatMulNBits {name!r}: bias has {b.size} elements for N={qt.shape[0]}")
            biases[name] = b.reshape(-1)
    return weights, biases
