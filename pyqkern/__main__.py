"""Command line: `pyqkern bench [--quick] [--threads N] [--formats ...]`, `pyqkern info`."""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _best_time(fn, min_time=0.2, max_reps=200):
    fn()  # warm-up (packing, caches)
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < max_reps and (time.perf_counter() < t_end or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _read_bandwidth(nbytes=256 << 20):
    """Measured memory read bandwidth (GB/s) of this process: sum over a buffer larger than L3."""
    a = np.ones(nbytes // 8, dtype=np.float64)
    t = _best_time(lambda: a.sum(), min_time=0.3, max_reps=10)
    return nbytes / t / 1e9


def bench(quick: bool, threads, formats, shapes=None, out=sys.stdout):
    import pyqkern as pq

    info = pq.info()
    shapes = shapes or ([(1, 4096, 4096), (32, 4096, 4096)] if quick else
                        [(1, 4096, 4096), (1, 4096, 11008), (1, 11008, 4096), (8, 4096, 4096),
                         (32, 4096, 4096), (128, 4096, 4096)])
    formats = formats or (["q4_0", "int4", "q8_0"] if quick else
                          ["q4_0", "q4_1", "q8_0", "q4_k", "q6_k", "iq4_nl", "nf4", "int4", "int8"])
    thread_list = threads or ([pq.get_num_threads()] if quick else sorted({1, pq.get_num_threads()}))
    bw = _read_bandwidth(64 << 20 if quick else 256 << 20)
    print(f"pyqkern {info['version']}  cpu: {info['cpu']}  variant: {info['active_variant']}  "
          f"threads: {thread_list}  numpy read bandwidth: {bw:.1f} GB/s", file=out)
    hdr = (f"{'format':7s} {'compute':7s} {'M':>4s} {'K':>6s} {'N':>6s} {'thr':>3s} {'time':>10s} "
           f"{'GFLOP/s':>8s} {'W GB/s':>7s} {'%bw':>5s} {'vs np':>6s} {'max rel err':>11s}")
    print("W GB/s: weight bytes per second; %bw: of the read bandwidth above (above 100%: the weights "
          "are served from cache); vs np: speed-up over numpy fp32 x @ W.T; max rel err: vs x @ dequantize(W).T",
          file=out)
    print(hdr, file=out)
    rng = np.random.default_rng(0)
    rows = []
    for (m, k, n) in shapes:
        w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
        x = rng.standard_normal((m, k)).astype(np.float32)
        wf = w.copy()
        t_np = _best_time(lambda: x @ wf.T)
        for fmt in formats:
            qt = pq.quantize(w, fmt)
            ref = x @ pq.dequantize(qt).T
            scale = float(np.abs(ref).max()) or 1.0
            for compute in ("int8", "float"):
                if compute == "int8" and not pq._matmul.int8_supported(qt):
                    continue
                for th in thread_list:
                    pq.set_num_threads(th)
                    y = pq.matmul(x, qt, compute=compute)
                    err = float(np.abs(y - ref).max()) / scale
                    t = _best_time(lambda: pq.matmul(x, qt, compute=compute))
                    gflops = 2.0 * m * n * k / t / 1e9
                    wgbs = qt.nbytes / t / 1e9
                    row = dict(format=fmt, compute=compute, M=m, K=k, N=n, threads=th, time_s=t, gflops=gflops,
                               weight_gbs=wgbs, pct_bw=100 * wgbs / bw, speedup_vs_numpy=t_np / t, max_rel_err=err)
                    rows.append(row)
                    print(f"{fmt:7s} {compute:7s} {m:4d} {k:6d} {n:6d} {th:3d} {t * 1e6:8.1f}us {gflops:8.1f} "
                          f"{wgbs:7.1f} {row['pct_bw']:5.0f} {t_np / t:6.2f} {err:11.2e}", file=out)
            qt.release_packed()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="pyqkern", description="pyqkern: CPU quantization kernels")
    sub = ap.add_subparsers(dest="cmd")
    b = sub.add_parser("bench", help="run the matmul kernels on built-in default shapes and print a table")
    b.add_argument("--quick", action="store_true", help="a short run (a few shapes and formats)")
    b.add_argument("--threads", type=int, nargs="*", help="thread counts to run (default: all CPUs)")
    b.add_argument("--formats", nargs="*", help="formats to run")
    b.add_argument("--json", help="also write the rows to this JSON file")
    sub.add_parser("info", help="print CPU features and kernel variants")
    args = ap.parse_args(argv)
    if args.cmd == "info":
        import pyqkern as pq

        print(json.dumps(pq.info(), indent=2))
        return 0
    if args.cmd == "bench":
        rows = bench(args.quick, args.threads, args.formats)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
