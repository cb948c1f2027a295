"""The benchmarks' ceilings measured on this machine: read bandwidth (GB/s) and the int8
dot-product instruction peak (GOP/s)."""
from __future__ import annotations

import threading
import time

import numpy as np


def _buffer(nbytes: int) -> np.ndarray:
    """int64 words, 64-byte aligned, every page touched (no shared zero page)."""
    nbytes = max(4096, nbytes // 128 * 128)
    raw = np.ones(nbytes // 8 + 8, dtype=np.int64)
    off = (-raw.ctypes.data % 64) // 8
    a = raw[off:off + nbytes // 8]
    a[::512] = 3
    return a


def _native_probe(a: np.ndarray, threads: int, reps: int) -> float:
    """pqk_read_probe on the library's own thread pool (the one the kernels run on)."""
    from . import _native

    before = _native.get_num_threads()
    _native.set_num_threads(threads)
    try:
        return a.nbytes / _native.read_probe(a, reps + 1)[0] / 1e9   # best of reps + 1: one warms up
    finally:
        _native.set_num_threads(before)


def _numpy_probe(a: np.ndarray, threads: int, reps: int) -> float:
    """float32 max and int64 sum on Python threads (numpy releases the GIL in the reduction)."""
    best = 0.0
    for fn, arr in ((np.max, a.view(np.float32)), (np.add.reduce, a)):
        parts = np.array_split(arr, threads)

        def run(fn=fn, parts=parts):
            if threads == 1:
                fn(parts[0])
                return
            ts = [threading.Thread(target=fn, args=(p,)) for p in parts]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        run()
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def read_bandwidth(nbytes: int = 256 << 20, threads: int = 1, reps: int = 5) -> float:
    """Best GB/s of `reps` passes over a buffer of nbytes split over `threads`. Over more than
    the L3 it is the memory's bandwidth; over a layer's weight bytes, the ceiling of a GEMV whose
    weight stays in cache.

    Two probes, the better taken (each is a lower bound of what the hardware delivers):
    pqk_read_probe, the widest loads the CPU has (64-byte on AVX-512: on Zen 5 16-byte loads read
    a buffer from L3 ~25% slower) summed in independent chains on pyqkern's own thread pool, and numpy reductions (float32 max, int64 sum) on Python threads. Only the first can
    measure a cached buffer at 2 threads: starting Python threads costs about as long as
    reading 9 MB from L3 (numpy gave 45 GB/s there, the native probe ~200). numpy's int64 sum
    alone is compute-bound below the memory (30 GB/s at 2 threads where the max reads 67)."""
    threads, reps = max(1, int(threads)), max(1, int(reps))
    a = _buffer(int(nbytes))
    best = _numpy_probe(a, threads, reps)
    try:
        best = max(best, _native_probe(a, threads, reps))
    except ImportError:                    # no native library (numba-only use): numpy's figure
        pass
    return best


def _hw_peak(probe: str, threads: int, reps: int):
    from . import _native

    before = _native.get_num_threads()
    _native.set_num_threads(max(1, int(threads)))
    try:
        return getattr(_native, probe)(_native.active_isa(), reps)
    except (NotImplementedError, RuntimeError):
        return None
    finally:
        _native.set_num_threads(before)


def int8_hw_peak(threads: int, reps: int = 5):
    """The active variant's int8 dot-product instruction peak (GOP/s, pqk_int8_peak) at this many
    pool threads, or None where the variant has no such probe (or PYQKERN_ISA names none)."""
    return _hw_peak("int8_peak", threads, reps)


def fma_hw_peak(threads: int, reps: int = 5):
    """The active variant's fp32 FMA instruction peak (GFLOP/s, pqk_fma_peak) at this many pool
    threads, or None where the variant has no such probe (ref)."""
    return _hw_peak("fma_peak", threads, reps)
