"""Shared benchmark fixtures (pytest-benchmark).

    pytest bench/bench_quantize.py --benchmark-only           # 4096 x 4096 weights
    PYQKERN_BENCH_QUICK=1 pytest bench --benchmark-only       # small shapes, a quick look

Every benchmark records in ``benchmark.extra_info`` the CPU, the implementation ("native",
"numba", "gguf-numpy"), the kernel variant that ran, the thread count, the shape and the
throughput in GB/s (of float32 weight bytes), and a GB/s table is printed at the end of the run.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import pyqkern as pq

QUICK = os.environ.get("PYQKERN_BENCH_QUICK", "") not in ("", "0")
SHAPE = (512, 2048) if QUICK else (4096, 4096)

_RESULTS: list = []


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py when a directory is given (pytest's default pattern is test_*.py)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def shape() -> tuple:
    return SHAPE


@pytest.fixture(scope="session")
def weights(shape) -> np.ndarray:
    """Weight-like float32 [N, K]: gaussian, std 0.02, a few outliers."""
    r = np.random.default_rng(0)
    w = (r.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
    w[:: max(1, shape[0] // 64), :: 97] *= 20
    return w


@pytest.fixture(scope="session")
def cpu_name() -> str:
    return pq.info()["cpu"]


@pytest.fixture
def native_threads(request):
    """Sets the native thread count for one benchmark (param: n) and restores it after."""
    before = pq.get_num_threads()
    pq.set_num_threads(request.param)
    yield request.param
    pq.set_num_threads(before)


SLOW_CALL_S = 0.25   # a first call slower than this: 3 fixed rounds instead of calibrated ones


@pytest.fixture
def measure(benchmark, cpu_name, shape):
    """measure(fn, op=, fmt=, impl=, variant=, threads=) -> fn's result.

    Calls ``fn`` once untimed first (warms caches and JITs; NotImplementedError -> skip, for
    kernels not written yet), then runs it under pytest-benchmark: calibrated rounds, or 3 fixed
    rounds when one call takes longer than SLOW_CALL_S. Groups the table by op and format and
    records GB/s of the float32 weight bytes (median and best round), CPU, variant, threads."""
    import time

    def run(fn, *, op, fmt, impl, variant, threads):
        nbytes = shape[0] * shape[1] * 4
        t0 = time.perf_counter()
        try:
            fn()
        except NotImplementedError as e:
            pytest.skip(f"{impl} {variant} {op} {fmt}: {e}")
        first = time.perf_counter() - t0
        benchmark.group = f"{op} {fmt} {shape[0]}x{shape[1]}"
        benchmark.extra_info.update(cpu=cpu_name, op=op, format=fmt, impl=impl, variant=variant,
                                    threads=threads, shape=list(shape), float32_bytes=nbytes)
        if first > SLOW_CALL_S:
            out = benchmark.pedantic(fn, rounds=3, iterations=1)
        else:
            out = benchmark(fn)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:          # None with --benchmark-disable
            s = stats.stats
            gbs, best = nbytes / s.median / 1e9, nbytes / s.min / 1e9
            benchmark.extra_info["GB/s"] = round(gbs, 3)
            benchmark.extra_info["GB/s best"] = round(best, 3)
            _RESULTS.append((op, fmt, impl, variant, threads, gbs, best, s.median))
        return out

    return run


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section(f"pyqkern throughput, GB/s of float32 weights ({SHAPE[0]}x{SHAPE[1]}; "
               f"cpu: {pq.info()['cpu']})")
    tr.write_line(f"{'op':<11}{'format':<18}{'impl':<14}{'variant':<12}{'threads':>7}{'GB/s':>9}"
                  f"{'best':>9}{'ms':>10}")
    for op, fmt, impl, variant, threads, gbs, best, med in sorted(_RESULTS, key=lambda r: (r[0], r[1], -r[5])):
        tr.write_line(f"{op:<11}{fmt:<18}{impl:<14}{variant:<12}{threads:>7}{gbs:>9.2f}{best:>9.2f}"
                      f"{med * 1e3:>10.2f}")
