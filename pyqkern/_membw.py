"""Memory read bandwidth of this machine as the benchmarks' ceiling (GB/s)."""
from __future__ import annotations

import threading
import time

import numpy as np


def read_bandwidth(nbytes: int = 256 << 20, threads: int = 1, reps: int = 5) -> float:
    """Best of `reps` passes over a buffer of nbytes (use more than L3), split over `threads`
    Python threads (numpy releases the GIL in these loops), by two streaming reductions: float32
    max and int64 sum. Either alone can be compute-bound below the memory (a float64 sum reads
    ~20 GB/s on a Zen 4 core that streams ~38 GB/s; numpy's int64 sum ~34), so the better of
    the two is taken: a lower bound of what the memory delivers, not the hardware's peak."""
    threads = max(1, int(threads))
    a = np.ones(nbytes // 8, dtype=np.int64)
    a[::4096] = 3                                      # touched pages, no shared zero page
    views = [(np.max, a.view(np.float32)), (np.add.reduce, a)]
    best = 0.0
    for fn, arr in views:
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
