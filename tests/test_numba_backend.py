"""Numba backend: the same bytes as reference.py (and the C++ scalar kernels) for every format.

- fp16 <-> fp32 helpers against numpy: every half value, and every float32 near a rounding
  boundary (ties in the normal and subnormal range, 65504 / 65520, inf, underflow to zero).
- x86 conversion helpers (cvtt / roundf / round-half-even) against the reference's numpy ones.
- quantize: hypothesis draws a shape, the format options and one "kind" per 32-value segment
  (gguf-style adversarial blocks: zeros, exact .5 ties, subnormals, single outliers,
  fp16-limit magnitudes, negative maxima, values whose 1/d overflows, all-equal, raw
  hypothesis floats); the q/s/z bytes must equal reference.py's and the native ref kernel's,
  and dequantizing them must give the same float32 bits.
- dequantize of random bytes (NaN / inf / subnormal scales included): same float32 bits.
"""
from __future__ import annotations

import os
import sys
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("numba")

import pyqkern as pq  # noqa: E402
from numba import njit  # noqa: E402
from pyqkern import _formats, reference  # noqa: E402
from pyqkern import numba_kernels as nk  # noqa: E402
from pyqkern.numba_kernels import simple  # noqa: E402

F32 = np.float32

# (format, group, sym) for every parameterisation the backend supports
CASES = [("q4_0", 0, 0), ("q4_1", 0, 0), ("q8_0", 0, 0), ("int8", 0, 0),
         ("nf4", 32, 0), ("nf4", 64, 0), ("nf4", 128, 0),
         ("int4", 16, 0), ("int4", 16, 1), ("int4", 32, 0), ("int4", 64, 1), ("int4", 128, 0),
         ("int4", -1, 0), ("int4", -1, 1)]
CASE_IDS = [f"{f}-g{g}" + ("-sym" if s else "") for f, g, s in CASES]
DEQ_ONLY = [("iq4_nl", 0, 0)]


def _bits(y):
    return np.ascontiguousarray(y, dtype=F32).view(np.uint32)


def _assert_same_floats(got, want):
    """Same float32 bits, except that any NaN equals any NaN: which NaN payload survives
    ``d * c + m`` when both d and m are NaN depends on operand order, which the compiler
    (LLVM, GCC, numpy's loops) may commute; IEEE 754 leaves it unspecified."""
    nan = np.isnan(got)
    np.testing.assert_array_equal(nan, np.isnan(want))
    np.testing.assert_array_equal(_bits(got)[~nan], _bits(want)[~nan])


# ---------------------------------------------------------------- scalar helpers
@njit(cache=True)
def _to_f16_all(bits, out):
    f = bits.view(np.float32)
    for i in range(f.size):
        out[i] = simple.fp32_to_fp16(f[i])


@njit(cache=True)
def _from_f16_all(h, out):
    for i in range(h.size):
        out[i] = simple.fp16_to_fp32(h[i])


@njit(cache=True)
def _conv_all(v, a, b, c):
    for i in range(v.size):
        a[i] = simple.cvtt_i32(v[i])
        b[i] = simple.round_away_i32(v[i])
        c[i] = simple.round_even_i32(v[i])


def _f16_boundary_bits():
    """float32 bit patterns around every fp16 rounding decision."""
    exps = np.arange(256, dtype=np.uint32)
    # normal range: the 13 dropped bits below / at / above the tie, with even and odd kept lsb
    low = np.array([0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x2FFF, 0x3000, 0x3001, 0x7FF000,
                    0x7FEFFF, 0x7FF001, 0x7FFFFF, 0x400000, 0x3FFFFF], dtype=np.uint32)
    parts = [(exps[:, None] << 23 | low[None, :]).ravel()]
    # subnormal results (float32 exponents 102..112): ties at every shift 14..24
    for e in range(100, 114):
        shift = 126 - e
        if 1 <= shift < 32:
            half = np.uint32(1) << np.uint32(min(shift - 1, 22))
            ms = np.array([0, 1, half - 1, half, half + 1, 3 * half, 3 * half - 1, 3 * half + 1,
                           0x7FFFFF], dtype=np.uint32) & np.uint32(0x7FFFFF)
            parts.append(np.uint32(e) << np.uint32(23) | ms)
    # every float32 from 65504 to 65536, and from the largest fp16 subnormal to the smallest normal
    parts.append(np.arange(0x477FE000, 0x47800001, dtype=np.uint32))
    parts.append(np.arange(0x387F0000, 0x38810000, dtype=np.uint32))
    parts.append(np.random.default_rng(1).integers(0, 2**32, 1 << 18, dtype=np.uint64).astype(np.uint32))
    b = np.concatenate(parts)
    return np.concatenate([b, b | np.uint32(0x80000000)])


def test_fp16_to_fp32_every_half():
    h = np.arange(65536, dtype=np.uint16)
    out = np.empty(65536, F32)
    _from_f16_all(h, out)
    np.testing.assert_array_equal(_bits(out), h.view(np.float16).astype(F32).view(np.uint32))


def test_fp32_to_fp16_rounding_boundaries():
    bits = _f16_boundary_bits()
    f = bits.view(F32)
    out = np.empty(bits.size, np.uint16)
    _to_f16_all(bits, out)
    nan = np.isnan(f)
    with np.errstate(over="ignore", invalid="ignore"):
        want = f[~nan].astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(out[~nan], want)
    # NaN -> quiet NaN with the sign kept (common.h fp32_to_fp16)
    np.testing.assert_array_equal(out[nan], ((bits[nan] >> 16) & 0x8000 | 0x7E00).astype(np.uint16))
    named = {65504.0: 0x7BFF, 65519.996: 0x7BFF, 65520.0: 0x7C00, np.inf: 0x7C00,
             2.0 ** -24: 0x0001, 2.0 ** -25: 0x0000, 1.5 * 2.0 ** -25: 0x0001, 2.0 ** -14: 0x0400}
    for v, h in named.items():
        o = np.empty(2, np.uint16)
        _to_f16_all(np.array([v, -v], F32).view(np.uint32), o)
        assert o.tolist() == [h, h | 0x8000], v


def test_x86_conversions_match_reference():
    rng = np.random.default_rng(2)
    v = np.concatenate([
        np.arange(-40, 40, dtype=F32) * F32(0.25),  # .5 ties of both parities, both signs
        np.array([np.nan, np.inf, -np.inf, 2.0**31, -2.0**31, -2147483904.0, 2147483520.0,
                  -2147483520.0, 2.0**23 + 1, -(2.0**23) - 1, 8388607.5, -8388607.5, 0.49999997,
                  -0.49999997, 1e-45, -0.0], dtype=F32),
        rng.standard_normal(4096).astype(F32) * F32(1e3),
        rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32).view(F32),
    ])
    a, b, c = (np.empty(v.size, np.int64) for _ in range(3))
    _conv_all(v, a, b, c)
    np.testing.assert_array_equal(a, reference.cvtt_i32(v))
    np.testing.assert_array_equal(b, reference.cvtt_i32(reference.round_away(v)))
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(c, reference.cvtt_i32(np.rint(v)))


# ---------------------------------------------------------------- adversarial weights
KINDS = ("normal", "zeros", "ties", "subnormal", "outlier", "fp16_limit", "neg_max", "tiny",
         "all_equal", "mixed_scale")


def _tie_segment(fmt, sym, rng, n):
    """Values exactly halfway between two codes, plus the anchors that make the scale 1."""
    if fmt == "nf4":
        v = rng.choice(np.concatenate([reference.NF4_MID, -reference.NF4_MID, reference.NF4_CODE]), n)
        v[0] = 1.0
        return v
    if fmt == "q4_0":
        v, anchors = rng.integers(-8, 8, n) + 0.5, [-8.0]
    elif fmt == "q8_0":
        v, anchors = rng.integers(-127, 127, n) + 0.5, [127.0]
    elif fmt == "int8":
        v, anchors = rng.integers(-127, 127, n) + 0.5, [127.0, -127.0]
    elif fmt == "int4" and sym:
        v, anchors = rng.integers(-8, 7, n) + 0.5, [7.5]
    else:  # q4_1, int4 asymmetric: min 0, max 15 -> scale 1, zero 0
        v, anchors = rng.integers(0, 15, n) + 0.5, [0.0, 15.0]
    v[: len(anchors)] = anchors
    return v


def _segment(kind, fmt, sym, rng, n):
    if kind == "normal":
        return rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)
    if kind == "zeros":
        return np.zeros(n) * rng.choice([1.0, -1.0])
    if kind == "ties":
        return _tie_segment(fmt, sym, rng, n) * 2.0 ** rng.integers(-4, 5)
    if kind == "subnormal":
        return rng.integers(-2000, 2000, n) * 2.0 ** -149
    if kind == "outlier":
        v = rng.standard_normal(n) * 1e-3
        v[rng.integers(n)] = rng.choice([1.0, -1.0]) * 10.0 ** rng.uniform(0, 4)
        return v
    if kind == "fp16_limit":
        v = rng.uniform(-1, 1, n) * 65504.0
        v[rng.integers(n)] = rng.choice([65504.0, -65504.0, 65520.0, -65520.0, 524288.0, -1.0e6, 1e30, -3e38])
        return v
    if kind == "neg_max":
        v = rng.uniform(-1, 1, n)
        v[rng.integers(n)] = -rng.uniform(1, 2)
        return v
    if kind == "tiny":  # d is subnormal or 0 in fp32 / fp16: 1/d overflows
        return rng.standard_normal(n) * 10.0 ** rng.uniform(-44, -36)
    if kind == "all_equal":
        return np.full(n, rng.choice([1.0, -1.0, 0.5, 3e-8, -65504.0]))
    # mixed_scale: values spanning many binades in one block
    return rng.standard_normal(n) * 10.0 ** rng.uniform(-30, 30, n)


@st.composite
def adversarial_weights(draw, fmt, group):
    step = max(32, group) if group > 0 else 32
    n = draw(st.integers(1, 3))
    k = step * draw(st.integers(1, 4 if step <= 64 else 2))
    seed = draw(st.integers(0, 2**32 - 1))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=n * k // 32, max_size=n * k // 32))
    rng = np.random.default_rng(seed)
    return seed, kinds, n, k, rng


def _build(fmt, sym, n, k, kinds, rng, raw):
    x = np.concatenate([_segment(kd, fmt, sym, rng, 32) for kd in kinds]).reshape(n, k)
    with np.errstate(over="ignore"):
        x = x.astype(F32)
    x[~np.isfinite(x)] = F32(3e38)
    if raw:  # hypothesis' own float32 edge cases in the first segment
        x.reshape(-1)[: len(raw)] = np.array(raw, F32)
    return x


# fp16 fields (byte offset, block bytes) of the ggml formats whose reference.py sign of zero
# follows gguf/numpy's argmax / min on signed zeros instead of ggml's C code
_ZERO_SIGN_FIELDS = {"q4_0": ((0,), 18), "q4_1": ((0, 2), 20)}


def _clear_zero_signs(q, fmt):
    """Copy of q with -0.0 fp16 fields turned into +0.0 (q4_0 d, q4_1 d and m)."""
    if fmt not in _ZERO_SIGN_FIELDS:
        return q
    offs, bb = _ZERO_SIGN_FIELDS[fmt]
    q = q.copy()
    blocks = q.reshape(-1, bb)
    for o in offs:
        h = blocks[:, o:o + 2].copy().view(np.uint16)[:, 0]
        blocks[(h & 0x7FFF) == 0, o + 1] = 0
    return q


def _check_quantize(fmt, group, sym, x):
    """numba bytes == native scalar kernel bytes (the C++ oracle, ggml's C code for ggml formats)
    == reference.py bytes, except that reference.py takes the sign of a zero q4_0 / q4_1 scale
    or min from numpy (as gguf does) where ggml's C code is deterministic; then dequantize
    of those bytes == reference dequantize, bit for bit."""
    got = nk.QUANTIZE[fmt](x, group, sym)
    want = reference.QUANTIZE[fmt](x, group, sym)
    for name, g, w in zip("qsz", got, want):
        assert g.dtype == np.uint8 and g.shape == w.shape, (name, g.shape, w.shape)
        if name == "q":
            g, w = _clear_zero_signs(g, fmt), _clear_zero_signs(w, fmt)
        np.testing.assert_array_equal(g, w, err_msg=f"{fmt} section {name}")
    qt_native = pq.quantize(x, fmt, group=group or None, sym=bool(sym), isa="ref")
    qt_numba = pq.quantize(x, fmt, group=group or None, sym=bool(sym), backend="numba")
    np.testing.assert_array_equal(qt_numba.data, qt_native.data, err_msg=f"{fmt}: numba != native ref")
    k = x.shape[1]
    np.testing.assert_array_equal(_bits(nk.DEQUANTIZE[fmt](*got, k, group, sym)),
                                  _bits(reference.DEQUANTIZE[fmt](*got, k, group, sym)))


def test_signed_zero_blocks_follow_ggml_c():
    """All-zero blocks whose first largest |x| is +-0: ggml's C code starts from max = +0.0
    (q4_0 d = -0.0) and q4_1 keeps the first minimum -- pinned here as numbers."""
    x = np.zeros((2, 32), F32)
    x[0] = -0.0
    x[1, 1:] = -0.0
    assert nk.QUANTIZE["q4_0"](x)[0][:, :2].tolist() == [[0, 0x80], [0, 0x80]]
    q1 = nk.QUANTIZE["q4_1"](x)[0]
    assert q1[:, 2:4].tolist() == [[0, 0x80], [0, 0]]  # m = x[0]: -0.0, then +0.0


@pytest.mark.parametrize("fmt,group,sym", CASES, ids=CASE_IDS)
@given(data=st.data(),
       raw=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), max_size=32))
def test_quantize_matches_reference(fmt, group, sym, data, raw):
    _, kinds, n, k, rng = data.draw(adversarial_weights(fmt, group))
    _check_quantize(fmt, group, sym, _build(fmt, sym, n, k, kinds, rng, raw))


@pytest.mark.parametrize("fmt,group,sym", CASES, ids=CASE_IDS)
def test_quantize_every_kind(fmt, group, sym):
    """Each adversarial kind as whole rows, deterministic (does not rely on hypothesis' draws)."""
    rng = np.random.default_rng(zlib.crc32(f"{fmt}{group}{sym}".encode()))
    k = max(256, group)
    for kind in KINDS:
        x = _build(fmt, sym, 2, k, [kind] * (2 * k // 32), rng, None)
        _check_quantize(fmt, group, sym, x)


def test_quantize_strided_and_wide_input():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((6, 512)).astype(F32)
    x = base[::2, ::2]  # non-contiguous
    for fmt, group, sym in CASES:
        if group > x.shape[1]:
            continue
        for a, b in zip(nk.QUANTIZE[fmt](x, group, sym), reference.QUANTIZE[fmt](np.ascontiguousarray(x), group, sym)):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- dequantize of arbitrary bytes
def _random_sections(fmt, group, sym, n, k, rng):
    params = {"group": group, "sym": sym}
    rq, rs, rz = _formats.row_bytes(fmt, k, params)
    q, s, z = (rng.integers(0, 256, (n, r), dtype=np.uint8) for r in (rq, rs, rz))
    if fmt in ("q4_0", "q4_1", "q8_0", "iq4_nl") and rng.random() < 0.5:
        # bias the block scales towards interesting fp16 values (inf, NaN, subnormal, -0)
        bb = {"q4_1": 20, "q8_0": 34}.get(fmt, 18)
        special = np.array([0x7C00, 0xFC00, 0x7E01, 0x0001, 0x8000, 0x03FF, 0x7BFF], np.uint16).view(np.uint8)
        blocks = q.reshape(-1, bb)
        pick = rng.integers(0, 7, blocks.shape[0])
        blocks[:, 0:2] = special.reshape(-1, 2)[pick]
    return q, s, z


@pytest.mark.parametrize("fmt,group,sym", CASES + DEQ_ONLY, ids=CASE_IDS + ["iq4_nl"])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 3), mult=st.integers(1, 4))
def test_dequantize_random_bytes(fmt, group, sym, seed, n, mult):
    rng = np.random.default_rng(seed)
    k = (max(32, group) if group > 0 else 32) * mult
    q, s, z = _random_sections(fmt, group, sym, n, k, rng)
    got = nk.DEQUANTIZE[fmt](q, s, z, k, group, sym)
    with np.errstate(invalid="ignore", over="ignore"):
        want = reference.DEQUANTIZE[fmt](q, s, z, k, group, sym)
    assert got.dtype == F32 and got.shape == (n, k)
    _assert_same_floats(got, want)


def test_registry_covers_reference_formats():
    assert set(nk.QUANTIZE) >= {"q4_0", "q4_1", "q8_0", "nf4", "int4", "int8"}
    assert set(nk.DEQUANTIZE) >= {"q4_0", "q4_1", "q8_0", "iq4_nl", "nf4", "int4", "int8"}


def test_results_do_not_depend_on_thread_count():
    import numba

    x = np.random.default_rng(4).standard_normal((67, 256)).astype(F32)
    old = numba.get_num_threads()
    try:
        outs = []
        for t in sorted({1, old}):
            numba.set_num_threads(t)
            outs.append([nk.QUANTIZE[f](x, g, s)[0] for f, g, s in CASES])
        for a, b in zip(outs[0], outs[-1]):
            np.testing.assert_array_equal(a, b)
    finally:
        numba.set_num_threads(old)


@pytest.mark.parametrize("fmt,blk,nbytes", [("q4_0", 32, 18), ("q4_k", 256, 144), ("q6_k", 256, 210),
                                            ("iq4_nl", 32, 18)])
def test_registry_checks_k_and_sections(fmt, blk, nbytes):
    """The K-quant entries did not: a q too short for K was read past its end, and a partial last
    block was dropped from quantize"""
    with pytest.raises(ValueError, match=f"not a multiple of {blk}"):
        nk.QUANTIZE[fmt](np.ones((2, blk + blk // 2), F32))
    if fmt in nk.DEQUANTIZE:
        e = np.zeros((1, 0), np.uint8)
        for q in (np.zeros((1, nbytes), np.uint8), np.zeros((1, 3 * nbytes), np.uint8), np.zeros(2 * nbytes, np.uint8)):
            with pytest.raises(ValueError, match=f"needs {2 * nbytes} bytes per row"):
                nk.DEQUANTIZE[fmt](q, e, e, 2 * blk)


_NUMBA_CHILD = r"""
import os, sys, threading
import numpy as np
import pyqkern as pq
w = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32)
def run():
    qt = pq.quantize(w, "q4_k", backend="numba")
    y = pq.matmul(np.ones((3, 512), np.float32), qt, backend="numba")
    return qt.data.tobytes() + y.tobytes()
want = run()
# several Python threads in the kernels at once ("workqueue" aborted the process)
got = []
ts = [threading.Thread(target=lambda: got.append(run())) for _ in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
assert got == [want] * 4, "threads"
# a forked child after the parent ran parallel code (GNU OpenMP killed it), and its own child
pid = os.fork()
if pid == 0:
    ok = run() == want
    g = os.fork()
    if g == 0:
        os._exit(0 if run() == want else 5)
    _, gs = os.waitpid(g, 0)
    os._exit(0 if ok and os.WIFEXITED(gs) and os.WEXITSTATUS(gs) == 0 else 4)
_, st = os.waitpid(pid, 0)
assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0, st
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_concurrent_calls_and_forked_children(layer):
    import subprocess

    from test_threads_dispatch import child_env

    env, cwd = child_env()
    if layer != "default":
        env["NUMBA_THREADING_LAYER"] = layer
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", _NUMBA_CHILD], capture_output=True, text=True,
                       timeout=600, env=env, cwd=cwd)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


_NUMBA_LATE = r"""
import os, signal, sys
import numpy as np
import numba
import pyqkern as pq   # the Numba backend itself is not imported yet

@numba.njit(parallel=True)
def own(a):            # the user's own parallel code, before any pyqkern kernel
    s = 0.0
    for i in numba.prange(a.shape[0]):
        s += a[i]
    return s

own(np.ones(1000))
pid = os.fork()
if pid == 0:         # GNU OpenMP killed this child at the backend's first parallel kernel
    qt = pq.quantize(np.ones((4, 64), np.float32), "q4_0", backend="numba")
    os._exit(0 if pq.dequantize(qt).all() else 3)
_, st = os.waitpid(pid, 0)
assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0, st
# a signal handler calling a kernel while another kernel's first call compiles (a plain lock
# held across the compile hung here)
w = np.ones((4, 64), np.float32)
pq.quantize(w, "q8_0", backend="numba")
done = []
signal.signal(signal.SIGALRM, lambda *a: done.append(pq.quantize(w, "q8_0", backend="numba")))
signal.setitimer(signal.ITIMER_REAL, 0.2)
pq.quantize(np.ones((4, 256), np.float32), "q4_k", backend="numba")
signal.setitimer(signal.ITIMER_REAL, 0)
assert len(done) == 1  # the handler ran (during the compile, with a fresh cache)
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_fork_after_users_own_parallel_code_and_reentry_from_a_signal_handler(tmp_path):
    import subprocess

    from test_threads_dispatch import child_env

    env, cwd = child_env()
    env["NUMBA_CACHE_DIR"] = str(tmp_path)  # fresh: the q4_k kernel compiles while the timer fires
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", _NUMBA_LATE], capture_output=True, text=True,
                       timeout=600, env=env, cwd=cwd)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])
