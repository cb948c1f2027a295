"""GPTQ timing (pytest-benchmark), one measured round each (a GPTQ run takes seconds).

    pytest bench/bench_gptq.py --benchmark-only            # 4096 x 4096 layer
    PYQKERN_BENCH_QUICK=1 pytest bench/bench_gptq.py ...    # 512 x 2048

- gptq: int4 g128 asym (act_order off / on) and q4_0, with a ready Hessian H (random SPD, from
  2048 random tokens), Numba inner loop vs the plain NumPy float64 loop (backend="numpy");
  the other targets (int3 g128, int8, q4_1, iq4_nl, nf4, int4 g128 + MSE search) with Numba.
- hessian: GPTQ.add_batch over 128 x 2048 tokens (64 batches of 2 x 2048 tokens) in float64
  and in float32 (hessian_dtype="float32").
Seconds are printed at the end of the run (bar: 4096 x 4096 int4 g128 in <= 10 s on 2 cores).
"""
from __future__ import annotations

import time

import numpy as np
import pytest

import pyqkern as pq
from conftest import QUICK

_TIMES: list = []


@pytest.fixture(scope="module")
def hessian(shape):
    k = shape[1]
    r = np.random.default_rng(1)
    x = r.standard_normal((2048, 64)) @ r.standard_normal((64, k)) + 0.3 * r.standard_normal((2048, k))
    return 2.0 / 2048 * (x.T @ x)


def _one_round(benchmark, name, fn):
    benchmark.group = f"gptq {name}"
    t0 = time.perf_counter()
    out = benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    _TIMES.append((name, time.perf_counter() - t0))
    return out


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("case", ["int4_g128", "int4_g128_act_order", "q4_0"])
def test_gptq(benchmark, weights, hessian, case, backend):
    if backend == "numba":  # compile outside the timing
        pq.gptq.quantize(weights[:8, :256], H=hessian[:256, :256], format="q4_0" if case == "q4_0" else "int4")
    kw = {"int4_g128": dict(format="int4", group_size=128),
          "int4_g128_act_order": dict(format="int4", group_size=128, act_order=True),
          "q4_0": dict(format="q4_0")}[case]
    qt = _one_round(benchmark, f"{case} {backend} {weights.shape[0]}x{weights.shape[1]}",
                    lambda: pq.gptq.quantize(weights, H=hessian, backend=backend, **kw))
    assert qt.shape == weights.shape


@pytest.mark.parametrize("case", ["int3_g128", "int8", "q4_1", "iq4_nl", "nf4", "int4_g128_mse"])
def test_gptq_other_targets(benchmark, weights, hessian, case):
    kw = {"int3_g128": dict(format="int3", group_size=128), "int8": dict(format="int8"),
          "q4_1": dict(format="q4_1"), "iq4_nl": dict(format="iq4_nl"), "nf4": dict(format="nf4"),
          "int4_g128_mse": dict(format="int4", group_size=128, search="mse")}[case]
    pq.gptq.quantize(weights[:8, :256], H=hessian[:256, :256], **kw)  # compile outside the timing
    qt = _one_round(benchmark, f"{case} numba {weights.shape[0]}x{weights.shape[1]}",
                    lambda: pq.gptq.quantize(weights, H=hessian, act_order=True, **kw))
    assert qt.shape == weights.shape


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_hessian_accumulation(benchmark, shape, dtype):
    k = shape[1]
    r = np.random.default_rng(2)
    batch = r.standard_normal((2, 2048, k), dtype=np.float32)  # 2 sequences of 2048 tokens

    def run():
        g = pq.gptq.GPTQ(np.zeros((1, k), np.float32), hessian_dtype=dtype)
        for _ in range(_NBATCH):
            g.add_batch(batch)
        return g

    g = _one_round(benchmark, f"hessian {dtype} {g_tokens(shape)} tokens K={k}", run)
    assert g.nsamples == _NBATCH * 2 * 2048


_NBATCH = 8 if QUICK else 64  # 64 x 2 x 2048 = 128 x 2048 tokens


def g_tokens(shape):
    return _NBATCH * 2 * 2048


def teardown_module(module):
    if _TIMES:
        print("\nGPTQ seconds:")
        for name, t in _TIMES:
            print(f"  {name:<50}{t:8.2f}")
