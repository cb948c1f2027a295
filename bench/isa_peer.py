"""pyqkern's AVX2 and AVX-VNNI (256-bit) int8 kernels against llama.cpp's ggml built for the same
ISA level, on this machine: what a CPU without AVX-512 (most laptops) gets from each.

    python bench/isa_peer.py                  # q4_0 at (1|8|128, 4096, 4096), 1 and 2 threads
    python bench/isa_peer.py --seconds 1      # shorter runs

ggml comes from the sdist bench/ggml_peer.py uses, built for the flavors "avx2" and "avxvnni"
(no AVX-512; ~1 min each on 2 cores, cached beside the native build). Each flavor runs in a
process of its own: the builds share library names and symbols. In that process pyqkern's
variant of the same name, pq.matmul(x, qt, compute="int8", isa=flavor, out=y) (weight packed
once, on the first call), and ggml's q4_0 mul_mat (weight repacked to q4_0_8x8, as llama.cpp
loads it; x quantized to q8_0 inside) are called in alternating blocks of calls, the first calls
of each block untimed, so neither pays for the other's thread pool still spinning or its weight
having left L3. Printed: median and min time per call and ggml / pyqkern of the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = [(1, 4096, 4096), (8, 4096, 4096), (128, 4096, 4096)]
THREADS = [1, 2]


def child(flavor: str, seconds: float):
    import pyqkern as pq
    from ggml_peer import GgmlUnavailable, MatMul, load

    if flavor not in pq.variants():
        print(json.dumps({"skip": f"this CPU does not run pyqkern's {flavor} variant"}))
        return
    try:
        gg = load(flavor)
    except GgmlUnavailable as e:
        print(json.dumps({"skip": f"ggml ({flavor}) not available: {e}"}))
        return
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        qt = pq.quantize(rng.standard_normal((n, k), dtype=np.float32), "q4_0")
        x = rng.standard_normal((m, k), dtype=np.float32)
        y = np.empty((m, n), np.float32)
        mm = MatMul(gg, "q4_0", qt.data, n, k, m)
        try:
            mm.set_x(x)
            for t in THREADS:
                pq.set_num_threads(t)
                fns = {"ggml": lambda: mm.run(t),
                       "pyqkern": lambda: pq.matmul(x, qt, compute="int8", isa=flavor, out=y)}
                for f in fns.values():
                    f()
                # the same product up to each side's int8 rounding of x: a misread layout would be far off
                ref = pq.matmul(x, qt, compute="float")
                err = float(np.abs(mm.result() - y).max() / np.abs(ref).max())
                if err > 0.05:
                    raise RuntimeError(f"ggml and pyqkern differ by {err:.3g} of max |y|")
                est = {}
                for nm, f in fns.items():
                    t0 = time.perf_counter()
                    for _ in range(3):
                        f()
                    est[nm] = (time.perf_counter() - t0) / 3
                block = {nm: max(3, min(200, int(0.02 / e))) for nm, e in est.items()}
                rounds = max(6, int(seconds / sum(block[nm] * est[nm] for nm in fns)))
                samples = {nm: [] for nm in fns}
                for r in range(rounds):
                    for nm in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                        f = fns[nm]
                        f()
                        f()
                        for _ in range(block[nm]):
                            t0 = time.perf_counter_ns()
                            f()
                            samples[nm].append(time.perf_counter_ns() - t0)
                print(json.dumps({"shape": [m, k, n], "threads": t, "rel_diff": err, "repacked": mm.repacked,
                                  **{nm: [float(np.median(v)) / 1e3, min(v) / 1e3, len(v)]
                                     for nm, v in samples.items()}}), flush=True)
        finally:
            mm.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per case (both sides)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.seconds)
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]))
    print(f"{'flavor':<9}{'shape (M,K,N)':<18}{'thr':>4}{'ggml us':>11}{'(min)':>9}{'pyqkern us':>12}{'(min)':>9}"
          f"{'ggml/pq':>9}")
    for flavor in ("avx2", "avxvnni"):
        p = subprocess.run([sys.executable, __file__, "--child", flavor, "--seconds", str(args.seconds)],
                           env=env, capture_output=True, text=True)
        if p.returncode != 0:
            print(f"{flavor:<9}failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
            continue
        for line in p.stdout.splitlines():
            r = json.loads(line)
            if "skip" in r:
                print(f"{flavor:<9}skipped: {r['skip']}")
                continue
            g, q = r["ggml"], r["pyqkern"]
            print(f"{flavor:<9}{str(tuple(r['shape'])):<18}{r['threads']:>4}{g[0]:>11.1f}{g[1]:>9.1f}{q[0]:>12.1f}"
                  f"{q[1]:>9.1f}{g[0] / q[0]:>9.2f}")


if __name__ == "__main__":
    main()
