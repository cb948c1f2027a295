"""Code grids of the quantized formats, for quantizers that choose codes themselves (GPTQ, the
MSE scale search of ``pq.quantize(..., search="mse")``).

A *grid* is what a format can represent in one block or group: its parameters (scale, zero
point, min) and the rule that maps a weight to a code and the code to the value that
``pq.dequantize`` returns. Everything here is vectorised over rows: a block is ``b`` [R, gs]
float32 (R rows of one block), parameters are arrays [R].

Parameter rules (``shrink`` p <= 1 scales the range the rule starts from; p = 1 is the
format's own round-to-nearest rule):

- int2/int3/int4: GPTQ's quantizer (``reference.intq_group_params``) on [p·min, p·max];
- int8: per row, scale = p·amax/127 (fp32), zero 0;
- q4_0: ggml's d = p·max/-8 (max = the value of largest magnitude), codes trunc(x/d + 8.5);
- q8_0: ggml's d = p·amax/127, codes rounded half away from zero;
- q4_1: d = p·(max - min)/15, m = p·min, both fp16; codes nearest on 0..15;
- nf4 / fp4: absmax·p (fp32), nearest code-book entry (fp4: of its 15 distinct values; table
  indices map to bitsandbytes' codes in ``encode``);
- iq4_nl: d from a search over candidate scales with a least-squares refit (as ggml's quantizer
  does, unweighted), fp16, or ggml's own x^2-weighted scale where that gives the smaller squared
  error; nearest of the 16 values. Shrinking scales the search's d.

``encode`` turns codes (stored order) and per-group parameter tables into a QTensor whose
bytes are the format's canonical ones, so ``dequantize`` returns exactly the chosen values.
"""
from __future__ import annotations

import numpy as np

from . import _formats, _qtensor
from .reference import FP4_CODE, IQ4NL_VALUES, NF4_CODE, bnb_recip, f16_values, intq_group_params, pack_codes

F32 = np.float32
INT_BITS = {"int2": 2, "int3": 3, "int4": 4, "int8": 8}
TARGETS = ("int2", "int3", "int4", "int8", "q4_0", "q4_1", "q8_0", "iq4_nl", "nf4", "fp4")
# code tables in ascending order; CODE_OF maps a table index to the stored code where they differ
# (fp4: its 15 distinct values, -0 left out, codes in bitsandbytes' bit-pattern order)
_FP4_ORDER = np.array(sorted((i for i in range(16) if i != 8), key=lambda i: float(FP4_CODE[i])), np.int32)
TABLES = {"q4_1": np.arange(16, dtype=F32), "nf4": NF4_CODE.astype(F32), "iq4_nl": IQ4NL_VALUES.astype(F32),
          "fp4": FP4_CODE[_FP4_ORDER].astype(F32)}
CODE_OF = {"fp4": _FP4_ORDER}
# GPTQ loop modes (pyqkern.numba_kernels.gptq_loop)
MODE = {"int2": 0, "int3": 0, "int4": 0, "int8": 0, "q4_0": 1, "q8_0": 2, "q4_1": 3, "nf4": 3, "iq4_nl": 3,
        "fp4": 3}


def block_size(fmt, k, group):
    """Elements sharing one set of parameters."""
    if fmt in ("int2", "int3", "int4"):
        return k if group == -1 else int(group)
    if fmt == "int8":
        return k
    if fmt in ("nf4", "fp4"):
        return int(group)
    return 32


def code_range(fmt):
    """(qlo, qhi) of mode-0 codes."""
    if fmt == "int8":
        return -127, 127
    return 0, (1 << INT_BITS[fmt]) - 1


def _f16(v):
    with np.errstate(over="ignore"):
        return np.asarray(v, F32).astype(np.float16).astype(F32)


def _inv(d):
    with np.errstate(divide="ignore", over="ignore"):  # 1 / subnormal d: Inf, as the reference's
        return np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)


def _iq4nl_scale(b):
    """Per row of b [R, 32]: the fp16-rounded scale d. Candidates as ggml's quantizer: codes
    nearest to b·(T[0] + t)/max for t = -7..7 (max = the value of largest magnitude); the
    candidate whose least-squares scale Σ T[c]·b / Σ T[c]² removes the most squared error wins
    (unweighted). Numba when installed (pyqkern.numba_kernels.grid), else NumPy; same result."""
    b = np.ascontiguousarray(b, F32)
    try:
        from .numba_kernels.grid import iq4nl_lsq_scale
    except ImportError:  # pragma: no cover - numba is optional
        return _f16(_iq4nl_lsq_numpy(b))
    return _f16(iq4nl_lsq_scale(b, TABLES["iq4_nl"]))


def _iq4nl_lsq_numpy(b):
    T = TABLES["iq4_nl"]
    r = b.shape[0]
    imax = np.abs(b).argmax(axis=1)
    mx = b[np.arange(r), imax]
    out = np.zeros(r, np.float64)
    best = np.full(r, -1.0)
    for t in range(-7, 8):
        with np.errstate(divide="ignore", invalid="ignore"):
            idv = np.where(mx != 0, (T[0] + F32(t)) / np.where(mx != 0, mx, F32(1)), F32(0)).astype(F32)
        v = T[nearest(T, b * idv[:, None])].astype(np.float64)
        sqx = (v * b).sum(axis=1)
        sq2 = (v * v).sum(axis=1)
        ok = (sq2 > 0) & (mx != 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(ok, sqx * sqx / np.where(ok, sq2, 1), -1.0)
            better = ok & (score > best)
            out = np.where(better, sqx / np.where(ok, sq2, 1), out)
        best = np.where(better, score, best)
    return out


def _ggml_iq4nl_d(b):
    """Per row of b [R, 32]: the block scale d that pq.quantize (ggml's x^2-weighted rule) stores."""
    from ._ops import quantize

    return f16_values(quantize(b, "iq4_nl", _range_check=False).data.reshape(len(b), 18)[:, :2])[:, 0]


def nearest(T, v):
    """Index of the nearest entry of the ascending table T (ties to the lower entry)."""
    mid = (T[1:] + T[:-1]) * F32(0.5)
    return np.searchsorted(mid, np.asarray(v, F32), side="left").astype(np.int32)


def params(fmt, b, sym=False, shrink=1.0):
    """Grid parameters of blocks b [R, gs] -> dict of [R] arrays: ``a`` (the loop's multiplier:
    scale for mode 0, 1/scale otherwise), ``b`` (value scale), ``m`` (min), ``z`` (zero point)."""
    b = np.asarray(b, F32)
    r = b.shape[0]
    p = F32(shrink)
    zero = np.zeros(r, np.int32)
    m = np.zeros(r, F32)
    if fmt in ("int2", "int3", "int4"):
        maxq = (1 << INT_BITS[fmt]) - 1
        if shrink == 1.0:
            sf, _, z = intq_group_params(b, sym, maxq)
        else:  # the same rule on the shrunk range [p·min, p·max] (a two-value group)
            ends = np.stack([np.minimum(b.min(axis=1), 0) * p, np.maximum(b.max(axis=1), 0) * p], axis=1)
            sf, _, z = intq_group_params(ends.astype(F32), sym, maxq)
        return {"a": sf.astype(F32), "b": sf.astype(F32), "m": m, "z": z.astype(np.int32)}
    if fmt == "int8":
        sc = (np.abs(b).max(axis=1) * p / F32(127)).astype(F32)
        return {"a": sc, "b": sc, "m": m, "z": zero}
    if fmt == "q4_0":
        imax = np.abs(b).argmax(axis=1)  # ggml: the first of largest magnitude; a zero block
        mx = b[np.arange(r), imax]        # has max +0 (so d = -0, as ggml stores it)
        mx = (np.where(mx == 0, F32(0), mx) * p).astype(F32)
        d = (mx / F32(-8)).astype(F32)
        return {"a": _inv(d), "b": _f16(d), "m": m, "z": zero}
    if fmt == "q8_0":
        d = (np.abs(b).max(axis=1) * p / F32(127)).astype(F32)
        return {"a": _inv(d), "b": _f16(d), "m": m, "z": zero}
    if fmt == "q4_1":
        mn = (b.min(axis=1) * p).astype(F32)
        mx = (b.max(axis=1) * p).astype(F32)
        with np.errstate(over="ignore"):  # a range beyond float32: Inf, then fp16's Inf as ggml stores
            d16 = _f16((mx - mn) / F32(15))
        return {"a": _inv(d16), "b": d16, "m": _f16(mn), "z": zero}
    if fmt in ("nf4", "fp4"):
        amax = (np.abs(b).max(axis=1) * p).astype(F32)
        return {"a": bnb_recip(amax), "b": amax, "m": m, "z": zero}  # as bitsandbytes and pq.quantize
    if fmt == "iq4_nl":
        if shrink != 1.0:
            d16 = _f16(_iq4nl_scale(b) * p)
            return {"a": _inv(d16), "b": d16, "m": m, "z": zero}
        # per block the better (squared error) of the unweighted search and ggml's own x^2-weighted
        # rule (what pq.quantize stores): the search alone lost to round-to-nearest on blocks
        # with an outlier (a review: GPTQ 0.44 vs RTN 0.37 relative output error)
        own, gg = ({"a": _inv(d), "b": d, "m": m, "z": zero} for d in (_iq4nl_scale(b), _ggml_iq4nl_d(b)))
        with np.errstate(invalid="ignore", over="ignore"):
            e = [np.where(np.isfinite(x), x, np.inf) for x in
                 (((codes_values(fmt, b, P)[1] - b).astype(np.float64) ** 2).sum(axis=1) for P in (own, gg))]
        take = e[1] < e[0]
        return {key: np.where(take, gg[key], own[key]) for key in own}
    raise ValueError(f"no code grid for format {fmt!r}")


def codes_values(fmt, x, P):
    """Codes and values of x [R, gs] on the grid P (the arithmetic of the GPTQ loop)."""
    qlo, qhi = code_range(fmt) if MODE[fmt] == 0 else (0, 0)
    return mode_codes_values(MODE[fmt], x, P, qlo, qhi, TABLES.get(fmt))


def mode_codes_values(mode, x, P, qlo=0, qhi=0, T=None):
    """codes_values by the GPTQ loop's mode number: mode 0 clamps codes to [qlo, qhi], mode 3
    reads the ascending table T (see pyqkern.numba_kernels.gptq_loop)."""
    x = np.asarray(x, F32)
    a, bb, m, z = (P[k][:, None] for k in ("a", "b", "m", "z"))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if mode == 0:
            t = np.clip(np.rint(x / a) + z.astype(F32), F32(qlo), F32(qhi))
            c = np.where(a == 0, z, t.astype(np.int32))
            v = (c - z).astype(F32) * a
        elif mode == 1:
            c = np.clip(np.trunc(x * a + F32(8.5)), F32(0), F32(15)).astype(np.int32)
            v = (c - 8).astype(F32) * bb
        elif mode == 2:
            y = x * a
            t = np.trunc(y)
            dd = y - t
            t = np.where(dd >= F32(0.5), t + F32(1), np.where(dd <= F32(-0.5), t - F32(1), t))
            c = np.clip(t, F32(-127), F32(127)).astype(np.int32)
            v = c.astype(F32) * bb
        else:
            c = nearest(T, (x - m) * a)
            v = (T[c] * bb + m).astype(F32)
    return c.astype(np.int32), v.astype(F32)


def search_params(fmt, b, sym=False, grid=100, maxshrink=0.8, norm=2.4):
    """MSE scale search (the GPTQ reference's ``mse`` option): try shrink factors
    p = 1 - i/grid for i < maxshrink·grid and keep, per row, the parameters whose values have
    the smallest sum |value - x|^norm (p = 1, the format's own rule, first; ties keep it)."""
    b = np.asarray(b, F32)
    best = params(fmt, b, sym)

    def err(v):  # a non-finite value (an fp16 scale that overflowed) is the worst error, not NaN
        with np.errstate(invalid="ignore", over="ignore"):
            e = (np.abs(v - b).astype(np.float64) ** norm).sum(axis=1)
        return np.where(np.isfinite(e), e, np.inf)

    if fmt == "iq4_nl":  # its rule is a scale search already: per block, the better of it and
        # ggml's own (weighted by x^2, what pq.quantize stores), so never worse than either
        d = _ggml_iq4nl_d(b)
        native = {"a": _inv(d), "b": d, "m": best["m"], "z": best["z"]}
        better = err(codes_values(fmt, b, native)[1]) <= err(codes_values(fmt, b, best)[1])
        return {key: np.where(better, native[key], best[key]) for key in best}

    _, v = codes_values(fmt, b, best)
    best_e = err(v)
    for i in range(1, int(maxshrink * grid)):
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # tiny blocks: 1/d overflows, err() takes it
            P = params(fmt, b, sym, shrink=1.0 - i / grid)
            _, v = codes_values(fmt, b, P)
        e = err(v)
        better = e < best_e
        if better.any():
            best_e = np.where(better, e, best_e)
            for key in best:
                best[key] = np.where(better, P[key], best[key])
    return best


def encode(fmt, codes, tables, n, k, group=None, sym=False):
    """QTensor from codes int [N, K] (stored column order) and parameter tables [G, N]
    (``tables`` = dict with ``a``/``b``/``m``/``z`` as from :func:`params`, stacked per group)."""
    codes = np.asarray(codes)
    prm = _formats.resolve_params(fmt, k, group if fmt in _formats.GROUPED else None,
                                  sym if fmt in _formats.INTN_BITS else None)
    empty = np.zeros((n, 0), np.uint8)
    T = {key: np.ascontiguousarray(np.asarray(v).T) for key, v in tables.items()}  # [N, G]
    if fmt in ("int2", "int3", "int4"):
        q = pack_codes(codes.astype(np.uint8), INT_BITS[fmt])
        s = np.ascontiguousarray(T["b"].astype(np.float16)).view(np.uint8).reshape(n, -1)
        z = empty if sym else T["z"].astype(np.uint8)
        return _qtensor.assemble(fmt, n, k, prm, q, s, z)
    if fmt == "int8":
        q = codes.astype(np.int8).view(np.uint8)
        s = np.ascontiguousarray(T["b"][:, :1].astype(F32)).view(np.uint8).reshape(n, 4)
        return _qtensor.assemble(fmt, n, k, prm, q, s, empty)
    if fmt in ("nf4", "fp4"):
        u = (CODE_OF[fmt][codes] if fmt in CODE_OF else codes).astype(np.uint8)
        q = ((u[:, 0::2] << 4) | u[:, 1::2]).astype(np.uint8)
        s = np.ascontiguousarray(T["b"].astype(F32)).view(np.uint8).reshape(n, -1)
        return _qtensor.assemble(fmt, n, k, prm, q, s, empty)
    nb = k // 32
    d16 = np.ascontiguousarray(T["b"].astype(np.float16)).reshape(n, nb, 1).view(np.uint8)
    cb = codes.reshape(n, nb, 32)
    if fmt == "q8_0":
        body = cb.astype(np.int8).view(np.uint8)
        parts = [d16, body]
    else:
        u = cb.astype(np.uint8)
        body = (u[:, :, :16] | (u[:, :, 16:] << 4)).astype(np.uint8)
        parts = [d16, body]
        if fmt == "q4_1":
            m16 = np.ascontiguousarray(T["m"].astype(np.float16)).reshape(n, nb, 1).view(np.uint8)
            parts = [d16, m16, body]
    q = np.concatenate(parts, axis=2).reshape(n, -1)
    return _qtensor.assemble(fmt, n, k, prm, q, empty, empty)


def quantize_search(w, fmt, group=None, sym=False, **search):
    """Round-to-nearest on the grid each block's MSE search picked. w float32 [N, K]."""
    w = np.ascontiguousarray(w, F32)
    n, k = w.shape
    if fmt not in TARGETS:
        raise ValueError(f"search='mse' supports {', '.join(TARGETS)}; got {fmt!r}")
    prm = _formats.resolve_params(fmt, k, group if fmt in _formats.GROUPED else None,
                                  sym if fmt in _formats.INTN_BITS else None)
    gs = block_size(fmt, k, prm.get("group", 0))
    blocks = w.reshape(n * (k // gs), gs)
    P = search_params(fmt, blocks, bool(prm.get("sym", 0)), **search)
    codes, _ = codes_values(fmt, blocks, P)
    tables = {key: v.reshape(n, k // gs).T for key, v in P.items()}
    return encode(fmt, codes.reshape(n, k), tables, n, k, prm.get("group"), bool(prm.get("sym", 0)))
