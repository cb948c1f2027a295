"""The SIMD row kernels (avx2, avx512, and whatever builds on them) are bit-identical to the
scalar reference variant "ref": quantize gives the same bytes, dequantize the same float bits.

Inputs aim at the places where a vector kernel can drift from the scalar one: K at block and
vector edges (int4 per-channel and int8 take any K, so tails), odd N, ties that land exactly on
k + 0.5 after scaling, blocks so tiny that 1/d overflows to inf (x86 "integer indefinite"
conversions), subnormals, magnitudes around the fp16 limits of the scale, single outliers,
negative maxima and +-equal-magnitude ties, all-equal and signed-zero blocks, strided rows and
misaligned buffers. Also checks that each SIMD variant's slots really hold its own code.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

import pyqkern as pq
from pyqkern import _formats, _native, reference

F32 = np.float32
SIMD_VARIANTS = [v for v in pq.variants() if v != "ref"]
pytestmark = pytest.mark.skipif(not SIMD_VARIANTS, reason="no SIMD variant runs on this CPU / build")

# formats with SIMD quantize + dequantize, and their parameter sets
QUANT_CASES = [
    ("q8_0", {}), ("q4_0", {}), ("q4_1", {}),
    ("nf4", {"group": 32}), ("nf4", {"group": 64}), ("nf4", {"group": 128}), ("nf4", {"group": 4096}),
    ("int4", {"group": 16, "sym": False}), ("int4", {"group": 16, "sym": True}),
    ("int4", {"group": 32, "sym": False}), ("int4", {"group": 64, "sym": True}),
    ("int4", {"group": 128, "sym": False}), ("int4", {"group": 128, "sym": True}),
    ("int4", {"group": -1, "sym": False}), ("int4", {"group": -1, "sym": True}),
    ("int8", {}),
]
DEQUANT_ONLY = [("iq4_nl", {}), ("q4_k", {}), ("q6_k", {}), ("fp4", {"group": 32}), ("fp4", {"group": 256})]
CASE_IDS = [f + "".join(f"-{k}{v}" for k, v in o.items()) for f, o in QUANT_CASES]
DEQUANT_IDS = [f + "".join(f"-{k}{v}" for k, v in o.items()) for f, o in DEQUANT_ONLY]
# slot ownership: format -> (quantize, dequantize) filled by each SIMD folder
OWNED = {"q8_0": (True, True), "q4_0": (True, True), "q4_1": (True, True), "iq4_nl": (False, True),
         "nf4": (True, True), "int4": (True, True), "int8": (True, True)}
OWNED_AVX512 = dict(OWNED, q4_k=(False, True), q6_k=(False, True), fp4=(False, True))

NF4 = reference.NF4_CODE
NF4_MID = reference.NF4_MID    # the 15 fp32 midpoints the kernels compare against
# fp16 scale edges: max, the last value below the overflow-to-inf threshold, the threshold,
# subnormal / underflow-to-zero territory
F16_EDGES = [65504.0, 65519.996, 65520.0, 70000.0, 6.1035156e-05, 5.9604645e-08, 2.9802322e-08, 2.98e-08, 1e-9]


# ---------------------------------------------------------------- input construction
def unit_of(fmt, params, k):
    """Elements sharing one scale: ggml block, nf4 block, int4 group, int8 row."""
    if fmt in ("q8_0", "q4_0", "q4_1", "iq4_nl"):
        return 32
    if fmt in ("q4_k", "q6_k"):
        return 256
    g = params.get("group", 0)
    return k if (fmt == "int8" or g == -1) else g


def k_values(fmt, params):
    """K at block edges for the format (any even K for per-channel int4, any K for int8)."""
    if fmt == "int8":
        return st.sampled_from([1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 100, 127, 129]) | \
            st.integers(1, 700)
    if fmt == "int4" and params["group"] == -1:
        return st.sampled_from([2, 4, 6, 8, 14, 16, 18, 30, 32, 34, 46, 48, 62, 64, 66, 94, 96, 98, 126, 130]) | \
            st.integers(1, 350).map(lambda h: 2 * h)
    u = unit_of(fmt, params, 0)
    return st.integers(1, max(1, min(9, 8192 // u))).map(lambda nb: nb * u)


def _ties(rng, n, fmt, params):
    """n values whose scaled images land exactly on k + 0.5 (round) / integers (truncate)."""
    e = F32(2.0) ** int(rng.integers(-20, 12))
    if fmt == "q8_0":
        v = rng.integers(-127, 127, n) + 0.5
        v[rng.integers(n)] = 127 * rng.choice([-1, 1])          # amax: d = 2^e exactly
    elif fmt == "q4_0":
        v = rng.integers(-16, 17, n) * 0.5
        v[np.abs(v) >= 8] = 0
        v[rng.integers(n)] = 8 * rng.choice([-1, 1])            # max: d = -+2^e exactly
    elif fmt in ("q4_1", "iq4_nl"):
        v = rng.integers(0, 31, n) * 0.5
        v[rng.integers(n)] = 0
        v[rng.integers(n)] = 15                                 # mn 0, mx 15: d = 2^e
    elif fmt == "int4":
        if params["sym"]:
            v = rng.integers(-15, 16, n) * 0.5                  # a = 7.5: scale = 2^e
            v[rng.integers(n)] = 7.5 * rng.choice([-1, 1])
        else:
            v = rng.integers(-16, 15, n) * 0.5                  # [-8, 7]: scale = 2^e, zero 8
            v[rng.integers(n)] = -8
            v[rng.integers(n)] = 7
    elif fmt == "int8":
        v = rng.integers(-127, 127, n) + 0.5
        v[rng.integers(n)] = 127 * rng.choice([-1, 1])
    else:  # nf4: exact midpoints (tie -> lower code), their neighbours, the codes
        pool = np.concatenate([NF4_MID, np.nextafter(NF4_MID, F32(2)), np.nextafter(NF4_MID, F32(-2)), NF4])
        v = rng.choice(pool, n).astype(np.float64)
        v[rng.integers(n)] = rng.choice([-1.0, 1.0])            # absmax = 2^e
    v = v.astype(F32)
    if fmt != "nf4":  # and one ulp either side of the ties (0.49999997 rounds to 0)
        m = rng.random(n) < 0.3
        m[np.argmax(np.abs(v))] = False                         # keep the scale exact
        v[m] = np.nextafter(v[m], rng.choice([-np.inf, np.inf], int(m.sum())).astype(F32))
    return (v * e).astype(F32)


def _near_ties(rng, n, fmt, params):
    """n values at an arbitrary scale whose scaled images fall within a few ulps of a rounding
    boundary, with the scale computed the way the reference computes it: any deviation in how
    a kernel derives d / 1/d / the fp16 scale flips some of these codes."""
    f = F32
    M = f(rng.uniform(0.5, 1.0) * 10.0 ** rng.uniform(-3 if fmt == "int4" else -30, 4 if fmt == "int4" else 30))
    sgn = f(rng.choice([-1.0, 1.0]))
    lo, hi = -M, M
    if fmt == "q8_0":
        idv = f(1) / (M / f(127))
        x = f(rng.integers(-127, 127, n) + 0.5) / idv
    elif fmt == "q4_0":
        idv = f(1) / (sgn * M / f(-8))
        x = f(rng.integers(1, 17, n) - 8.5) / idv
    elif fmt == "q4_1":
        lo, hi = -M * f(rng.uniform(0, 1)), M
        idv = f(1) / ((hi - lo) / f(15))
        x = f(rng.integers(1, 16, n) - 0.5) / idv + lo
    elif fmt == "int4":
        if params["sym"]:
            scale = (M - (-M)) / f(15)
        else:
            lo = -M * f(rng.uniform(0, 1))
            scale = (hi - lo) / f(15)
        sf = f(np.float16(scale))
        x = f(rng.integers(int(lo / sf) - 1, int(hi / sf) + 1, n) + 0.5) * sf
    elif fmt == "int8":
        x = f(rng.integers(-127, 127, n) + 0.5) * (M / f(127))
    else:  # nf4
        x = rng.choice(NF4_MID, n) * M
    x = x.astype(f)
    x = (x + rng.integers(-2, 3, n).astype(f) * np.spacing(x)).astype(f)
    x = np.clip(x, lo, hi).astype(f)
    x[rng.integers(n)] = hi if sgn > 0 else lo
    if fmt in ("q4_1", "int4") and n > 1:
        x[rng.integers(n)], x[rng.integers(n)] = lo, hi
    return x


def block_values(rng, n, fmt, params):
    """One block of n values of a randomly chosen kind."""
    kind = int(rng.integers(13))
    if kind == 0:    # plain noise at a random scale
        return (rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 6)).astype(F32)
    if kind == 1:    # any finite magnitude (subnormal .. near FLT_MAX)
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(-44, 38)
        return np.clip(x, -3.4e38, 3.4e38).astype(F32)
    if kind == 2:    # subnormal blocks: d is subnormal / zero, 1/d may be inf
        return (rng.integers(-300, 301, n) * 1.401298464324817e-45).astype(F32)
    if kind == 3:    # tiny normal blocks: amax / 127 and friends become subnormal
        return (rng.uniform(-1, 1, n) * 10.0 ** rng.uniform(-38, -35)).astype(F32)
    if kind == 4:
        return _ties(rng, n, fmt, params)
    if kind == 11:
        return _near_ties(rng, n, fmt, params)
    if kind == 5:    # all equal (either sign), or all zero with random zero signs
        c = rng.choice([0.0, 1.0, -1.0, 3.7, -1e-40, 65504.0]) * rng.choice([1.0, 10.0 ** rng.uniform(-30, 30)])
        x = np.full(n, c, F32)
        if c == 0:
            x[rng.random(n) < 0.5] = -0.0
        return x
    if kind == 6:    # one outlier
        x = (rng.standard_normal(n) * 1e-3).astype(F32)
        x[rng.integers(n)] = rng.choice([-1, 1]) * 10.0 ** rng.uniform(0, 37)
        return x
    if kind == 7:    # negative maximum, and a +-equal-magnitude pair (first one wins in q4_0)
        x = rng.uniform(-1, 1, n).astype(F32)
        i, j = rng.choice(n, 2, replace=False) if n > 1 else (0, 0)
        x[j] = 2.0
        x[i] = -2.0
        return x
    if kind == 8:    # scale right at fp16 edges (overflow to inf, subnormal, underflow)
        t = rng.choice(F16_EDGES) * rng.choice([127.0, 8.0, 15.0, 7.5, 1.0])
        x = (rng.uniform(-1, 1, n) * t).astype(F32)
        x[rng.integers(n)] = F32(t) * rng.choice([-1, 1])
        return x
    if kind == 9:    # zeros with a few signed values
        x = np.zeros(n, F32)
        x[rng.random(n) < 0.5] = -0.0
        m = rng.random(n) < 0.2
        x[m] = rng.standard_normal(int(m.sum())).astype(F32)
        return x
    if kind == 10:   # +-65504-ish magnitudes
        return (rng.choice([-1, 1], n) * rng.uniform(60000, 65520, n)).astype(F32)
    return (rng.standard_normal(n)).astype(F32)


def special_matrix(seed, n, k, fmt, params):
    rng = np.random.default_rng(seed)
    u = unit_of(fmt, params, k)
    x = np.empty((n, k), F32)
    for i in range(n):
        for b in range(0, k, u):
            x[i, b:b + u] = block_values(rng, min(u, k - b), fmt, params)
    return x


# ---------------------------------------------------------------- comparison helpers
def assert_same_quantize(x, fmt, params):
    ref = pq.quantize(x, fmt, isa="ref", **params)
    for v in SIMD_VARIANTS:
        got = pq.quantize(x, fmt, isa=v, **params)
        if not np.array_equal(got.data, ref.data):
            bad = np.flatnonzero(got.data != ref.data)
            raise AssertionError(f"{fmt} {params} {v}: quantize bytes differ from ref at {bad[:8]} "
                                 f"(got {got.data[bad[:8]]}, want {ref.data[bad[:8]]})")
    return ref


def assert_same_floats(got, want, what, nan_payload=True):
    g, w = got.view(np.uint32), want.view(np.uint32)
    bad = g != w
    if not nan_payload:  # garbage scales: NaN payload choice between two NaN operands is not pinned
        bad &= ~(np.isnan(got) & np.isnan(want))
    if bad.any():
        idx = np.argwhere(bad)[:6]
        raise AssertionError(f"{what}: dequantize differs from ref at {idx.tolist()}: "
                             f"got {[hex(int(g[tuple(i)])) for i in idx]}, want {[hex(int(w[tuple(i)])) for i in idx]}")


def assert_same_dequantize(qt):
    want = pq.dequantize(qt, isa="ref")
    for v in SIMD_VARIANTS:
        assert_same_floats(pq.dequantize(qt, isa=v), want, f"{qt.format} {qt.params} {v}")


def native_dequantize(isa, fmt, params, q, s, z, n, k):
    p = _formats.resolve_params(fmt, k, params.get("group"), params.get("sym"))
    y = np.empty((n, k), F32)
    _native.dequantize(_native.isa_names().index(isa), _formats.FORMAT_IDS[fmt], q, s, z, n, k,
                       p["group"], p["sym"], y)
    return y


def misaligned_copy(a, offset):
    """Same values as `a`, C-contiguous, at a data address = offset (mod 64)."""
    raw = np.zeros(a.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    out = np.frombuffer(raw.data, dtype=a.dtype, count=a.size, offset=start).reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % 64 == offset
    return out


# ---------------------------------------------------------------- slot ownership
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_slots_run_own_code(isa):
    if isa not in pq.variants():
        pytest.skip(f"{isa} does not run here")
    src = _native.kernel_sources(_native.isa_names().index(isa))
    owned = OWNED_AVX512 if isa == "avx512" else OWNED
    for fmt, (has_q, has_d) in owned.items():
        want = (isa if has_q else src[fmt][0], isa if has_d else src[fmt][1])
        assert src[fmt] == want, f"{isa}: {fmt} slots come from {src[fmt]}"
    if "avx512vnni" in pq.variants() and isa == "avx512":
        above = _native.kernel_sources(_native.isa_names().index("avx512vnni"))
        for fmt, (has_q, has_d) in owned.items():
            assert (not has_q or above[fmt][0] in ("avx512", "avx512vnni")) and \
                (not has_d or above[fmt][1] in ("avx512", "avx512vnni")), (fmt, above[fmt])


# ---------------------------------------------------------------- quantize + dequantize
@pytest.mark.parametrize("fmt,params", QUANT_CASES, ids=CASE_IDS)
@given(data=st.data())
def test_special_blocks(fmt, params, data):
    k = data.draw(k_values(fmt, params), label="k")
    n = data.draw(st.sampled_from([1, 3, 5]) if k * unit_of(fmt, params, k) < 10 ** 6 else st.just(1), label="n")
    seed = data.draw(st.integers(0, 2 ** 32 - 1), label="seed")
    x = special_matrix(seed, n, k, fmt, params)
    assert_same_dequantize(assert_same_quantize(x, fmt, params))


@pytest.mark.parametrize("fmt,params", QUANT_CASES, ids=CASE_IDS)
@given(data=st.data())
def test_any_float32(fmt, params, data):
    """hypothesis' own float32 edge values (subnormals, +-0, huge), small shapes."""
    k = data.draw(k_values(fmt, params).filter(lambda v: v <= max(512, unit_of(fmt, params, 0))), label="k")
    n = data.draw(st.sampled_from([1, 3]), label="n")
    elems = st.floats(width=32, allow_nan=False, allow_infinity=False)
    x = data.draw(hnp.arrays(F32, (n, k), elements=elems), label="x")
    assert_same_dequantize(assert_same_quantize(x, fmt, params))


@pytest.mark.parametrize("fmt,params", QUANT_CASES, ids=CASE_IDS)
def test_bulk_random(fmt, params):
    """Many blocks: rounding differences that show once in thousands of blocks (a scale
    computed as amax * (1/127) instead of amax / 127, say) need volume, not cleverness."""
    rng = np.random.default_rng(zlib.crc32(f"{fmt}{params}".encode()))
    n, k = 48, 4096
    x = rng.standard_normal((n, k)).astype(F32)
    x *= (10.0 ** rng.uniform(-8, 8, (n, 1))).astype(F32)           # a scale per row
    x[::3] *= (2.0 ** rng.integers(-20, 20, (n // 3 + (n % 3 > 0), k // 32, 1))).astype(F32).repeat(32, 2).reshape(-1, k)
    x[1::4] = rng.uniform(-1, 1, (len(x[1::4]), k)).astype(F32)     # uniform: more near-ties
    assert_same_dequantize(assert_same_quantize(x, fmt, params))


@pytest.mark.parametrize("fmt,params", QUANT_CASES, ids=CASE_IDS)
def test_matches_numpy_reference(fmt, params):
    """The same special blocks against pyqkern.reference (the NumPy oracle), not only "ref"."""
    for seed in range(4):
        if fmt == "int8":
            k = 77 + seed
        elif params.get("group") == -1:
            k = 2 * (seed + 9)
        else:
            k = unit_of(fmt, params, 0) * (1 + seed % 3)
        x = special_matrix(1000 + seed, 3, k, fmt, params)
        with np.errstate(all="ignore"):   # the oracle's 1/d overflows on purpose for tiny blocks
            want = pq.quantize(x, fmt, backend="reference", **params)
            want_y = pq.dequantize(want, backend="reference")
        for v in SIMD_VARIANTS:
            got = pq.quantize(x, fmt, isa=v, **params)
            assert np.array_equal(got.data, want.data), (fmt, params, v, seed)
            assert_same_floats(pq.dequantize(want, isa=v), want_y, f"{fmt} {params} {v} vs numpy reference")


def test_q4_0_first_of_equal_magnitudes():
    # +a then -a: the reference keeps the first (d < 0); -a then +a: d > 0; all +-0: d = +0
    x = np.zeros((4, 32), F32)
    x[0, 3], x[0, 9] = 5.0, -5.0
    x[1, 3], x[1, 9] = -5.0, 5.0
    x[2, ::2] = -0.0
    x[3, 31] = -1e-45
    for fmt in ("q4_0", "q4_1", "q8_0"):
        assert_same_dequantize(assert_same_quantize(x, fmt, {}))


def test_tiny_blocks_integer_indefinite():
    # 1/d overflows to inf: x * id is +-inf (and NaN for the zeros), which x86 converts to
    # 0x80000000; the stored low byte is 0
    sub = F32(1.401298464324817e-45)
    rows = [np.full(32, sub), np.where(np.arange(32) % 3 == 0, F32(0), -sub * np.arange(32, dtype=F32)),
            np.full(32, F32(1.2e-38)) * np.linspace(-1, 1, 32, dtype=F32), np.linspace(-3e-37, 3e-37, 32, dtype=F32)]
    x = np.stack(rows).astype(F32)
    for fmt, params in QUANT_CASES:
        k = 32 if unit_of(fmt, params, 32) <= 32 else params["group"]
        xx = np.tile(x, (1, k // 32)) if k >= 32 else x[:, :k]
        assert_same_dequantize(assert_same_quantize(np.ascontiguousarray(xx), fmt, params))


# ---------------------------------------------------------------- memory layouts
@pytest.mark.parametrize("fmt,params", QUANT_CASES, ids=CASE_IDS)
def test_strided_and_misaligned_rows(fmt, params):
    rng = np.random.default_rng(7)
    k = {"int8": 77, "int4": 130 if params.get("group") == -1 else 0}.get(fmt, 0) or 2 * unit_of(fmt, params, 0)
    n = 5
    base = special_matrix(11, n, k, fmt, params)
    want = pq.quantize(base, fmt, isa="ref", **params)
    big = rng.standard_normal((n, k + 13)).astype(F32)
    big[:, 5:5 + k] = base
    strided = big[:, 5:5 + k]                      # row stride k + 13, start 20 bytes in
    assert not strided.flags.c_contiguous
    for v in SIMD_VARIANTS:
        assert np.array_equal(pq.quantize(strided, fmt, isa=v, **params).data, want.data), (v, "strided")
        for off in (1, 2, 3, 4, 8, 36):             # not even 4-byte aligned for 1..3
            mis = misaligned_copy(base, off)
            assert np.array_equal(pq.quantize(mis, fmt, isa=v, **params).data, want.data), (v, off)
    # dequantize from misaligned q / s / z
    q, s, z = want.sections()
    ref_y = native_dequantize("ref", fmt, params, q, s if s.size else None, z if z.size else None, n, k)
    for v in SIMD_VARIANTS:
        for off in (1, 3, 5):
            y = native_dequantize(v, fmt, params, misaligned_copy(np.ascontiguousarray(q), off),
                                  misaligned_copy(np.ascontiguousarray(s), off + 1) if s.size else None,
                                  misaligned_copy(np.ascontiguousarray(z), off + 2) if z.size else None, n, k)
            assert_same_floats(y, ref_y, f"{fmt} {v} misaligned {off}")


# ---------------------------------------------------------------- dequantize of arbitrary bytes
@pytest.mark.parametrize("fmt,params", QUANT_CASES + DEQUANT_ONLY,
                         ids=CASE_IDS + DEQUANT_IDS)
@given(data=st.data())
def test_dequantize_any_bytes(fmt, params, data):
    """Every code, zero point (even > 15) and scale bit pattern (fp16/fp32 subnormal, inf, NaN)."""
    k = data.draw(k_values(fmt, params).filter(lambda v: v <= 4096), label="k")
    n = data.draw(st.sampled_from([1, 2, 3]), label="n")
    seed = data.draw(st.integers(0, 2 ** 32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    p = _formats.resolve_params(fmt, k, params.get("group"), params.get("sym"))
    rq, rs, rz = _formats.row_bytes(fmt, k, p)
    q = rng.integers(0, 256, (n, rq), dtype=np.uint8)
    s = rng.integers(0, 256, (n, rs), dtype=np.uint8) if rs else None
    z = rng.integers(0, 256, (n, rz), dtype=np.uint8) if rz else None
    want = native_dequantize("ref", fmt, params, q, s, z, n, k)
    for v in SIMD_VARIANTS:
        got = native_dequantize(v, fmt, params, q, s, z, n, k)
        # q4_1 adds two possibly-NaN scales: which payload wins is the compiler's operand order
        assert_same_floats(got, want, f"{fmt} {v}", nan_payload=fmt != "q4_1")


def test_iq4_nl_dequantize_all_codes():
    n, nb = 3, 4
    q = np.zeros((n, nb, 18), np.uint8)
    q[..., 2:] = np.random.default_rng(3).integers(0, 256, (n, nb, 16), dtype=np.uint8)
    q[0, 0, 2:] = np.arange(16, dtype=np.uint8) * 17    # every code, low and high nibble
    d = np.array([1.0, -0.5, 6.1e-5, 65504.0, 5.96e-8, 0.0, -0.0, 3.14, 1e-3, 7.0, 2.0, 100.0], np.float16)
    q[..., 0:2] = d[: n * nb].reshape(n, nb, 1).view(np.uint8)
    q = q.reshape(n, nb * 18)
    want = native_dequantize("ref", "iq4_nl", {}, q, None, None, n, nb * 32)
    for v in SIMD_VARIANTS:
        assert_same_floats(native_dequantize(v, "iq4_nl", {}, q, None, None, n, nb * 32), want, f"iq4_nl {v}")
