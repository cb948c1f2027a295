"""The code-book block of the Numba matmul (pyqkern.numba_kernels.lut) in each of its lowerings.

Each lowering that this CPU can run (avx512 vpermps, avx2 two vpermps and a select, generic
per-lane loads) must give the bits of the plain per-element loop, computed here in numpy float32
(one IEEE operation at a time: w = table[c] * scale, acc + w * x): codes over all 256 byte values,
tables, scales, x and acc with signed zeros, subnormals, infinities and NaN. The matmul itself is
checked per format in test_numba_matmul.py; this pins the lowerings it does not run here.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

numba = pytest.importorskip("numba")

from numba import njit  # noqa: E402

from pyqkern.numba_kernels import lut  # noqa: E402

F32 = np.float32


def _host_has(mode):
    """Whether Numba compiles for a CPU with this lowering's instructions (its target is the host's
    CPU unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say otherwise; LLVM aborts on an intrinsic the
    target lacks): the modes at or below the one lut picks for that target."""
    from numba.core.registry import cpu_target
    best = lut.target_mode(cpu_target.target_context)
    return lut.MODES.index(mode) >= lut.MODES.index(best)


_KERNELS = {}


def _kernel(hi_first, mode):
    """njit loop over (m, block) calls of the forced lowering: acc[m] over nb blocks of 32."""
    key = (hi_first, mode)
    if key not in _KERNELS:
        blk = lut.forced(hi_first, mode)

        @njit(cache=False)
        def run(q, table, scales, x, acc):
            for m in range(x.shape[0]):
                for b in range(scales.shape[0]):
                    blk(q, 0, 16 * b + 1, table, scales[b], x, m, 32 * b, acc, m)
        _KERNELS[key] = run
    return _KERNELS[key]


def _expected(q, table, scales, x, acc, hi_first):
    acc = acc.copy()
    codes = q[0, 1:1 + 16 * scales.shape[0]].reshape(-1, 16).astype(np.int64)
    first, second = (codes >> 4, codes & 15) if hi_first else (codes & 15, codes >> 4)
    with np.errstate(all="ignore"):
        for m in range(x.shape[0]):
            for b in range(scales.shape[0]):
                for half, c in enumerate((first[b], second[b])):
                    w = table[c] * scales[b]                      # float32 * float32
                    xs = x[m, 32 * b + 16 * half: 32 * b + 16 * half + 16]
                    acc[m, 16 * half:16 * half + 16] = acc[m, 16 * half:16 * half + 16] + w * xs
    return acc


SPECIAL = [0.0, -0.0, 1e-45, -3e-39, 1.0, -2.5, 3e38, np.inf, -np.inf, np.nan]
floats = st.one_of(st.sampled_from(SPECIAL), st.floats(-1e4, 1e4, width=32))


@pytest.mark.parametrize("mode", lut.MODES)
@pytest.mark.parametrize("hi_first", [True, False], ids=["hi_first", "lo_first"])
@given(seed=st.integers(0, 2**32 - 1), table=st.lists(floats, min_size=16, max_size=16),
       scale=floats, nb=st.integers(1, 3), m=st.integers(1, 3), specials=st.booleans())
@example(seed=0, table=[float(i) for i in range(16)], scale=1.0, nb=16, m=1, specials=False)
def test_lowering_matches_the_scalar_loop(mode, hi_first, seed, table, scale, nb, m, specials):
    if not _host_has(mode):
        pytest.skip(f"this CPU cannot run the {mode} lowering")
    rng = np.random.default_rng(seed)
    q = np.zeros((1, 16 * nb + 3), np.uint8)           # codes start at byte 1: unaligned loads
    q[0, 1:1 + 16 * nb] = (np.arange(16 * nb) * 7 + seed) % 256 if nb == 16 else rng.integers(0, 256, 16 * nb)
    t = np.array(table, F32)
    scales = np.full(nb, scale, F32)
    scales[::2] = rng.standard_normal((nb + 1) // 2).astype(F32)
    x = rng.standard_normal((m, 32 * nb)).astype(F32)
    acc = rng.standard_normal((m, 32)).astype(F32)
    if specials:
        pick = rng.integers(0, len(SPECIAL), (m, 32 * nb))
        x = np.where(rng.random((m, 32 * nb)) < 0.2, np.array(SPECIAL, F32)[pick], x).astype(F32)
        acc[:, ::5] = np.array(SPECIAL, F32)[rng.integers(0, len(SPECIAL), acc[:, ::5].shape)]
    want = _expected(q, t, scales, x, acc, hi_first)
    got = acc.copy()
    _kernel(hi_first, mode)(q, t, scales, x, got)
    # every value identical; NaN payload / sign aside (x86 keeps the first NaN operand of an add)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok].view(np.uint32), want[ok].view(np.uint32))


def test_every_code_reaches_its_table_entry():
    """All 256 byte values through every runnable lowering: one-hot x picks out table[c] * scale."""
    q = np.zeros((1, 16 * 16 + 1), np.uint8)
    q[0, 1:] = np.arange(256, dtype=np.uint8)
    t = (np.arange(16, dtype=F32) + F32(0.5)) * F32(1.25)
    for mode in lut.MODES:
        if not _host_has(mode):
            continue
        for hi_first in (True, False):
            for half in (0, 1):
                x = np.zeros((16, 32 * 16), F32)
                for j in range(16):        # row j: lane j of each block's first or second half
                    x[j, 16 * half + j::32] = 1.0
                acc = np.zeros((16, 32), F32)
                run = _kernel(hi_first, mode)
                # one block at a time so each acc lane holds one weight
                for b in range(16):
                    acc[:] = 0
                    sc = np.zeros(16, F32)
                    sc[b] = 2.0
                    run(q, t, sc, x, acc)
                    codes = np.arange(16 * b, 16 * b + 16)
                    c = (codes >> 4) if (hi_first == (half == 0)) else (codes & 15)
                    np.testing.assert_array_equal(acc[np.arange(16), 16 * half + np.arange(16)],
                                                  t[c] * F32(2.0), err_msg=f"{mode} hi_first={hi_first} half={half} b={b}")


def test_typing_rejects_wrong_arrays():
    blk = lut.forced(True, "generic")

    @njit(cache=False)
    def bad(q, table, x, acc):
        blk(q, 0, 0, table, F32(1), x, 0, 0, acc, 0)

    with pytest.raises(numba.core.errors.TypingError, match="C-contiguous"):
        bad(np.zeros((1, 16), np.uint8), np.zeros(16, np.float64), np.zeros((1, 32), F32), np.zeros((1, 32), F32))
    with pytest.raises(ValueError, match="mode"):
        lut.forced(True, "neon")
