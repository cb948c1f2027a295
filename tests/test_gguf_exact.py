"""Golden bytes: ggml formats are bit-exact with the ``gguf`` package's numpy implementation.

quantize (q4_0, q4_1, q8_0): every native variant (``isa=``), numba and reference produce
exactly the bytes of ``gguf.quants.quantize``, on random data with per-block scales spanning
the float32 range and on adversarial blocks. One corner is pinned to ggml's C reference
instead: the sign of a zero scale / min (blocks of signed zeros), where gguf's result depends
on how numpy's argmax / min treat -0.0 and +0.0 (see ``gguf_quantize``).

dequantize (q4_0, q4_1, q8_0, q4_k, q6_k, iq4_nl): identical bits (compared as uint32, NaN
equal to NaN) to ``gguf.quants.dequantize`` on arbitrary block bytes with any finite fp16 scale.

An implementation that is missing raises NotImplementedError, which fails these tests on
purpose: every backend must carry every ggml format.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pyqkern as pq

gguf_quants = pytest.importorskip("gguf.quants")
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

F32 = np.float32
QTYPE = {
    "q4_0": GGMLQuantizationType.Q4_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_k": GGMLQuantizationType.Q4_K,
    "q6_k": GGMLQuantizationType.Q6_K,
    "iq4_nl": GGMLQuantizationType.IQ4_NL,
}
QUANT_FORMATS = ("q4_0", "q4_1", "q8_0")
DEQUANT_FORMATS = tuple(QTYPE)
# byte offsets of the fp16 fields (d, dmin / m) inside one block
FP16_FIELDS = {"q4_0": (0,), "q4_1": (0, 2), "q8_0": (0,), "iq4_nl": (0,), "q4_k": (0, 2), "q6_k": (208,)}


def block_geometry(fmt):
    return GGML_QUANT_SIZES[QTYPE[fmt]]  # (weights per block, bytes per block)


# ---------------------------------------------------------------- helpers
def _ggml_c_zero_fields(b, fmt):
    """The fp16 fields ggml's C reference (quantize_row_*_ref) stores for one block, as floats:
    q4_0 keeps the first element of largest magnitude (strict ``amax < |x|``, starting from +0),
    q4_1 the first minimum / maximum (strict compares starting from x[0])."""
    if fmt == "q4_0":
        amax, mx = F32(0), F32(0)
        for v in b:
            if amax < abs(v):
                amax, mx = abs(v), v
        return [F32(mx / F32(-8))]
    if fmt == "q4_1":
        mn = mx = b[0]
        for v in b[1:]:
            mn = v if v < mn else mn
            mx = v if v > mx else mx
        return [F32((mx - mn) / F32(15)), mn]
    return None


def gguf_quantize(x, fmt):
    """gguf's bytes, with one correction: where gguf stores a zero scale / min, its sign comes
    from numpy's argmax / min on signed zeros (an implementation detail of numpy), while ggml's
    C reference is deterministic. There the sign ggml's C code gives is expected instead."""
    x = np.ascontiguousarray(x, dtype=F32)
    out = gguf_quants.quantize(x, QTYPE[fmt])
    if fmt not in ("q4_0", "q4_1"):
        return out
    bs, ts = block_geometry(fmt)
    blocks, ob = x.reshape(-1, bs), out.reshape(-1, ts)
    h = ob[:, :2 * len(FP16_FIELDS[fmt])].copy().view(np.uint16)      # [blocks, fields]
    for i in np.flatnonzero(((h & 0x7FFF) == 0).any(axis=1)):         # gguf stored a +-0 field
        for j, c in enumerate(_ggml_c_zero_fields(blocks[i], fmt)):
            if h[i, j] & 0x7FFF == 0 and c == 0:
                off = FP16_FIELDS[fmt][j]
                ob[i, off:off + 2] = np.array([c], np.float16).view(np.uint8)
    return out


def run_quantize(impl, x, fmt):
    backend, isa = impl
    qt = pq.quantize(x, fmt, backend=backend, isa=isa)
    assert qt.format == fmt and qt.shape == x.shape
    assert qt.data.dtype == np.uint8 and qt.data.ndim == 1
    return qt.data.reshape(x.shape[0], -1)


def run_dequantize(impl, buf, fmt, n, k):
    backend, isa = impl
    qt = pq.QTensor.from_bytes(fmt, (n, k), buf)
    y = pq.dequantize(qt, backend=backend, isa=isa)
    assert y.dtype == np.float32 and y.shape == (n, k)
    return y


def assert_same_blocks(got, want, x, fmt, what=""):
    """Byte equality, reporting the first differing block with its input."""
    assert got.shape == want.shape, f"{fmt}{what}: shape {got.shape} != {want.shape}"
    if np.array_equal(got, want):
        return
    bs, ts = block_geometry(fmt)
    gb, wb = got.reshape(-1, ts), want.reshape(-1, ts)
    bad = np.flatnonzero((gb != wb).any(axis=1))
    i = int(bad[0])
    xb = np.ascontiguousarray(x, dtype=F32).reshape(-1, bs)[i]
    pytest.fail(f"{fmt}{what}: {bad.size} of {gb.shape[0]} blocks differ; first is block {i}\n"
                f"  input  {xb.tolist()}\n  input bits {[hex(v) for v in xb.view(np.uint32)]}\n"
                f"  got    {gb[i].tolist()}\n  gguf   {wb[i].tolist()}")


def assert_same_floats(got, want, fmt, buf, what=""):
    """Bitwise equality of float32 arrays (uint32 views); any NaN equals any NaN."""
    assert got.shape == want.shape and got.dtype == want.dtype == np.float32
    g, w = got.view(np.uint32), want.view(np.uint32)
    ok = (g == w) | (np.isnan(got) & np.isnan(want))
    if ok.all():
        return
    bs, ts = block_geometry(fmt)
    flat_ok = ok.reshape(-1, bs).all(axis=1)
    i = int(np.flatnonzero(~flat_ok)[0])
    j = int(np.flatnonzero(~ok.reshape(-1, bs)[i])[0])
    pytest.fail(f"{fmt}{what}: {int((~ok).sum())} values differ; first in block {i} at index {j}: "
                f"got {got.reshape(-1, bs)[i, j]!r} ({hex(g.reshape(-1, bs)[i, j])}), "
                f"gguf {want.reshape(-1, bs)[i, j]!r} ({hex(w.reshape(-1, bs)[i, j])})\n"
                f"  block bytes {buf.reshape(-1, ts)[i].tolist()}")


# ---------------------------------------------------------------- adversarial blocks
H_MAX = 65504.0          # largest finite float16
H_OVER = 65520.0         # smallest float32 value that rounds to float16 inf
F_MAX = float(np.finfo(F32).max)
SUB_MIN = float(np.finfo(F32).smallest_subnormal)
N_MIN = float(np.finfo(F32).tiny)


def _blk(values, fill=0.0):
    b = np.full(32, fill, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64).ravel()
    b[: v.size] = v
    return b.astype(F32)


def adversarial_blocks() -> dict:
    """name -> one 32-value float32 block; each targets a rounding or overflow edge."""
    r = np.random.default_rng(1234)
    half = np.arange(32) - 16 + 0.5                     # -15.5 .. 15.5: exact .5 values
    ints = np.arange(32) - 16.0
    B = {}
    B["zeros"] = np.zeros(32, F32)
    B["neg_zeros"] = np.full(32, -0.0, F32)
    m = np.zeros(32, F32); m[::2] = -0.0
    B["pm0_neg_first"] = m
    m = np.full(32, -0.0, F32); m[::2] = 0.0
    B["pm0_pos_first"] = m
    B["pm0_zero_then_tiny"] = _blk([-0.0, 0.0, -SUB_MIN, SUB_MIN])
    # q8_0: d = amax/127 = 2^e exactly, x*id lands on k + 0.5
    for e in (0, -3, 5):
        B[f"ties_q8_e{e}"] = (_blk(np.r_[127.0, half[:31]]) * F32(2.0 ** e)).astype(F32)
        B[f"ties_q8_neg_e{e}"] = (_blk(np.r_[-127.0, -half[:31]]) * F32(2.0 ** e)).astype(F32)
    # q4_0: max = -8 -> d = 1 (id = 1) and max = 8 -> d = -1: x*id + 8.5 is an exact .5 / integer
    B["ties_q4_0_dpos"] = _blk(np.r_[-8.0, np.clip(half, -7.5, 7.5)[:31]])
    B["ties_q4_0_dneg"] = _blk(np.r_[8.0, np.clip(half, -7.5, 7.5)[:31]])
    B["ints_q4_0"] = _blk(np.r_[-8.0, np.clip(ints, -8, 7)[:31]])
    B["ties_q4_0_scaled"] = (B["ties_q4_0_dpos"] * F32(2.0 ** -7)).astype(F32)
    # q4_1: min = 0, max = 15 -> d = 1: (x - min)*id + 0.5 hits integers
    B["ties_q4_1"] = _blk(np.r_[0.0, 15.0, np.clip(half + 7.5, 0.5, 14.5)[:30]])
    B["ties_q4_1_offset"] = (B["ties_q4_1"] - F32(7.5)).astype(F32)
    B["ints_q4_1"] = _blk(np.r_[0.0, 15.0, np.clip(ints + 16, 0, 15)[:30]])
    # single outliers
    for v in (1000.0, -1000.0, 3.0e7, -2.5e-3):
        b = (r.standard_normal(32) * 1e-3).astype(F32)
        b[17] = v
        B[f"outlier_{v:g}"] = b
    b = np.zeros(32, F32); b[31] = -7.0
    B["outlier_last_in_zeros"] = b
    # equal magnitudes of both signs: the first one wins (q4_0 keeps its sign)
    B["absmax_tie_neg_first"] = _blk([1.0, -3.0, 0.5, 3.0, -1.0])
    B["absmax_tie_pos_first"] = _blk([1.0, 3.0, 0.5, -3.0, -1.0])
    # negative maxima
    B["all_negative"] = (-np.abs(r.standard_normal(32)) - 0.1).astype(F32)
    B["neg_max_abs"] = _blk(np.r_[-9.0, r.uniform(-8.9, 8.9, 31)])
    # all-equal blocks (q4_1: d = 0)
    for v in (1.0, -2.5, H_MAX, 1e-40, -3.0e38, N_MIN):
        B[f"all_equal_{v:g}"] = np.full(32, v, F32)
    # subnormals (no FTZ/DAZ: they must be handled like any float)
    B["subnormal_rand"] = (r.uniform(-1, 1, 32) * 1e-39).astype(F32)
    B["subnormal_min_only"] = _blk([SUB_MIN])
    B["subnormal_min_neg"] = _blk([-SUB_MIN, SUB_MIN])
    B["subnormal_mix_normal"] = _blk([N_MIN, -N_MIN / 2, 3 * SUB_MIN, 1e-44, -1e-40])
    B["subnormal_d_inf_id"] = _blk([1e-39, -5e-40, 2e-40, 0.0, -0.0, 1e-45])   # 1/d overflows to inf
    B["subnormal_all_rand_sign"] = (np.sign(r.standard_normal(32)) * SUB_MIN * r.integers(1, 9, 32)).astype(F32)
    # near float16 max: scales that just fit and just overflow fp16
    for name, v in (("h_max", H_MAX), ("h_over", H_OVER)):
        B[f"{name}_x1"] = _blk(np.r_[v, r.uniform(-v, v, 31)])
        B[f"{name}_x8"] = _blk(np.r_[-8 * v, r.uniform(-v, v, 31)])
        B[f"{name}_x8_pos"] = _blk(np.r_[8 * v, r.uniform(-v, v, 31)])
        B[f"{name}_x127"] = _blk(np.r_[127 * v, r.uniform(-v, v, 31)])
        B[f"{name}_x15_range"] = _blk(np.r_[0.0, 15 * v, r.uniform(0, 15 * v, 30)])
        B[f"{name}_m"] = _blk(np.r_[-v, -v + 1.0, r.uniform(-v, -v + 1, 30)])  # q4_1 min near -fp16 max
    B["h_just_below_over"] = _blk(np.r_[127 * 65519.0, r.uniform(-1, 1, 31)])
    # float32 extremes: max - min and x*id overflow
    B["f32_max_pm"] = _blk([F_MAX, -F_MAX, 1.0, -1.0])
    B["f32_max_pos"] = _blk([F_MAX, 0.5 * F_MAX, 1e30])
    B["f32_huge_rand"] = (r.uniform(-1, 1, 32) * 1e38).astype(F32)
    B["f32_huge_tiny_mix"] = _blk([3e38, 1e-38, -1e-45, -2e38])
    # wide dynamic range inside one block
    B["dynamic_range"] = (np.sign(r.standard_normal(32)) * 10.0 ** r.uniform(-40, 38, 32)).astype(F32)
    for name, b in B.items():
        assert b.dtype == F32 and b.shape == (32,) and np.isfinite(b).all(), name
    return B


ADVERSARIAL = adversarial_blocks()


# ---------------------------------------------------------------- quantize: golden bytes
@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_quantize_adversarial_blocks_one_per_row(impl, fmt):
    names = list(ADVERSARIAL)
    x = np.stack([ADVERSARIAL[k] for k in names])          # [nblocks, 32]: one block per row
    got, want = run_quantize(impl, x, fmt), gguf_quantize(x, fmt)
    for i, name in enumerate(names):
        assert_same_blocks(got[i:i + 1], want[i:i + 1], x[i:i + 1], fmt, f" [{name}]")


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
@pytest.mark.parametrize("rows", [1, 3])
def test_quantize_adversarial_blocks_long_rows(impl, fmt, rows):
    """All adversarial blocks side by side in long rows (multi-block SIMD paths and tails)."""
    blocks = np.stack(list(ADVERSARIAL.values()))
    r = np.random.default_rng(rows)
    x = np.concatenate([blocks[r.permutation(len(blocks))].ravel()[None, :] for _ in range(rows)])
    assert_same_blocks(run_quantize(impl, x, fmt), gguf_quantize(x, fmt), x, fmt)


@st.composite
def scaled_blocks(draw):
    """[n, 32*nb] float32: each block its own distribution and power-of-two scale (2^-150..2^127)."""
    n = draw(st.integers(1, 4))
    nb = draw(st.integers(1, 11))
    seed = draw(st.integers(0, 2**32 - 1))
    r = np.random.default_rng(seed)
    kind = r.integers(0, 4, size=(n, nb, 1))
    base = np.where(kind == 0, r.standard_normal((n, nb, 32)),
                    np.where(kind == 1, r.uniform(-1, 1, (n, nb, 32)),
                             np.where(kind == 2, r.standard_cauchy((n, nb, 32)),
                                      np.round(r.uniform(-8, 8, (n, nb, 32)) * 2) / 2)))   # .5 grid: ties
    lo, hi = draw(st.sampled_from([(-10, 10), (-150, -120), (-30, 30), (100, 120), (-150, 120)]))
    e = r.integers(lo, hi + 1, size=(n, nb, 1)).astype(np.float64)
    x = base * np.exp2(e)
    x = np.clip(x, -F_MAX, F_MAX).astype(F32)
    return x.reshape(n, nb * 32)


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
@given(x=scaled_blocks())
def test_quantize_random_scaled(impl, fmt, x):
    assert_same_blocks(run_quantize(impl, x, fmt), gguf_quantize(x, fmt), x, fmt)


@st.composite
def any_finite_f32(draw):
    """Arbitrary finite float32 values (hypothesis favours 0, +-0, subnormals, extremes)."""
    n = draw(st.integers(1, 3))
    nb = draw(st.integers(1, 5))
    return draw(hnp.arrays(F32, (n, 32 * nb),
                           elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
@given(x=any_finite_f32())
def test_quantize_any_finite(impl, fmt, x):
    assert_same_blocks(run_quantize(impl, x, fmt), gguf_quantize(x, fmt), x, fmt)


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_quantize_typical_weights(impl, fmt, rng):
    """A weight-like matrix, several rows and blocks per row (threads split rows)."""
    x = (rng.standard_normal((37, 32 * 24)) * 0.02).astype(F32)
    x[5, 100] = 0.9
    assert_same_blocks(run_quantize(impl, x, fmt), gguf_quantize(x, fmt), x, fmt)


# ---------------------------------------------------------------- dequantize: golden floats
SPECIAL_F16 = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x83FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00, 0xBC00],
                       dtype=np.uint16)


def random_blocks(fmt, n, nb, seed, scale_mode):
    """n rows of nb random blocks; fp16 fields finite, drawn per scale_mode."""
    bs, ts = block_geometry(fmt)
    r = np.random.default_rng(seed)
    buf = r.integers(0, 256, size=(n * nb, ts), dtype=np.uint8)
    for off in FP16_FIELDS[fmt]:
        h = buf[:, off:off + 2].copy().view(np.uint16).ravel()
        if scale_mode == "special":
            h = SPECIAL_F16[r.integers(0, SPECIAL_F16.size, h.size)]
        elif scale_mode == "subnormal":
            h = h & np.uint16(0x83FF)
        elif scale_mode == "mixed":
            pick = r.integers(0, 3, h.size)
            h = np.where(pick == 0, SPECIAL_F16[r.integers(0, SPECIAL_F16.size, h.size)],
                         np.where(pick == 1, h & np.uint16(0x83FF), h)).astype(np.uint16)
        # any finite: an all-ones exponent (inf / NaN) becomes a finite value of the same sign
        h = np.where((h & 0x7C00) == 0x7C00, h & np.uint16(0xBFFF), h).astype(np.uint16)
        assert np.isfinite(h.view(np.float16)).all()
        buf[:, off:off + 2] = h.view(np.uint8).reshape(-1, 2)
    return buf.reshape(n, nb * ts), nb * bs


@pytest.mark.parametrize("fmt", DEQUANT_FORMATS)
@given(n=st.integers(1, 4), nb=st.integers(1, 9), seed=st.integers(0, 2**32 - 1),
       scale_mode=st.sampled_from(["random", "special", "subnormal", "mixed"]))
def test_dequantize_random_bytes(impl, fmt, n, nb, seed, scale_mode):
    if fmt in ("q4_k", "q6_k"):
        nb = (nb + 3) // 4     # 256-weight super-blocks: keep the sizes comparable
    buf, k = random_blocks(fmt, n, nb, seed, scale_mode)
    want = gguf_quants.dequantize(buf, QTYPE[fmt])
    got = run_dequantize(impl, buf, fmt, n, k)
    assert_same_floats(got, want, fmt, buf, f" [{scale_mode}]")


@pytest.mark.parametrize("fmt", DEQUANT_FORMATS)
def test_dequantize_all_codes_extreme_scales(impl, fmt):
    """Every byte value in every code position, with the extreme finite fp16 scales."""
    bs, ts = block_geometry(fmt)
    rows = []
    for hv in SPECIAL_F16:
        for shift in range(0, 256, 37):
            blk = ((np.arange(ts) * 7 + shift) % 256).astype(np.uint8)
            for off in FP16_FIELDS[fmt]:
                blk[off:off + 2] = np.array([hv], np.uint16).view(np.uint8)
            rows.append(blk)
    buf = np.stack(rows)
    want = gguf_quants.dequantize(buf, QTYPE[fmt])
    got = run_dequantize(impl, buf, fmt, buf.shape[0], bs)
    assert_same_floats(got, want, fmt, buf)


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_roundtrip_matches_gguf(impl, fmt, rng):
    """gguf bytes in, our dequantize out == gguf's dequantize of its own bytes."""
    x = (rng.standard_normal((9, 32 * 8)) * 3).astype(F32)
    buf = gguf_quantize(x, fmt)
    assert_same_floats(run_dequantize(impl, buf, fmt, *x.shape), gguf_quants.dequantize(buf, QTYPE[fmt]), fmt, buf)
