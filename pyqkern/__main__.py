"""Command line: `pyqkern bench [--quick] [--threads N] [--formats ...] [--json F] [--plot F.png]`, `pyqkern info`,
`pyqkern quantize IN OUT --format F [--group G] [--sym] [--exclude REGEX] [--min-size N] [--quiet]
[--gptq --calib FILE.npz|.npy|.txt [--act-order] [--damp D] [--calib-max-length T]]`,
`pyqkern inspect FILE`."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings

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


def _blas_limits():
    """threadpoolctl's threadpool_limits (a dependency), or None where it is missing"""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits


def _numpy_time(fn, threads, limits):
    """numpy's best time at this many BLAS threads, or at its own count (None) without limits"""
    if limits is None:
        return _best_time(fn), None
    with limits(limits=threads, user_api="blas"):
        return _best_time(fn), threads


def bench(quick: bool, threads, formats, shapes=None, out=sys.stdout):
    import pyqkern as pq

    before = pq.get_num_threads()
    try:
        return _bench(pq, quick, threads, formats, shapes, out)
    finally:
        pq.set_num_threads(before)  # the rows set it (a review: left at the last row's count)


def _bench(pq, quick, threads, formats, shapes, out):
    info = pq.info()
    shapes = shapes or ([(1, 4096, 4096), (32, 4096, 4096)] if quick else
                        [(1, 4096, 4096), (1, 4096, 11008), (1, 11008, 4096), (8, 4096, 4096),
                         (32, 4096, 4096), (128, 4096, 4096)])
    formats = formats or (["q4_0", "int4", "q8_0"] if quick else
                          ["q4_0", "q4_1", "q8_0", "q4_k", "q6_k", "iq4_nl", "nf4", "int4", "int8"])
    from ._formats import FORMATS
    from ._matmul import streamed_weight_bytes

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown format(s) {', '.join(map(repr, unknown))} (formats: {', '.join(FORMATS)})")
    thread_list = threads or ([pq.get_num_threads()] if quick else sorted({1, pq.get_num_threads()}))
    # n <= 0 means one per CPU (as set_num_threads): the count the rows and the bandwidth run at
    thread_list = sorted({th if th > 0 else (os.cpu_count() or 1) for th in thread_list})
    from ._membw import fma_hw_peak, int8_hw_peak, read_bandwidth

    def ceilings(bws=None, peaks=None, fpeaks=None):
        """Another look at the read bandwidth and the int8 and fp32 FMA peaks per thread count,
        keeping the best of all looks: one look at a moment when another job held a core skewed
        whole columns."""
        nb = 256 << 20  # 8x the L3 of this machine class (64 MB, 2x, read partly from cache)
        bws2 = {th: max(read_bandwidth(nb, th), (bws or {}).get(th, 0.0)) for th in thread_list}

        def best(probe, seen):
            out = {}
            for th in thread_list:
                looks = [v for v in (probe(th), (seen or {}).get(th)) if v]
                out[th] = max(looks) if looks else None
            return out

        return bws2, best(int8_hw_peak, peaks), best(fma_hw_peak, fpeaks)

    bws, peaks, fpeaks = ceilings()

    def per_thread(peak, unit=""):
        """'1t 1150, 2t 2300' (unit after each value; n/a where the variant has no probe)"""
        return ", ".join(f"{th}t " + (f"{v:.0f}{unit}" if v else "n/a") for th, v in peak.items())

    print(f"pyqkern {info['version']}  cpu: {info['cpu']}  variant: {info['active_variant']}  "
          f"threads: {thread_list}", file=out)
    hdr = (f"{'format':7s} {'compute':7s} {'M':>4s} {'K':>6s} {'N':>6s} {'thr':>3s} {'time':>10s} "
           f"{'GFLOP/s':>8s} {'W GB/s':>7s} {'%bw':>5s} {'%bwW':>5s} {'%hw':>5s} {'%roof':>5s} {'np time':>10s} "
           f"{'vs np':>6s} {'max rel err':>11s}")
    limits = _blas_limits()
    np_at = ("its best at 1 up to the row's thread count (a BLAS at 2 threads beside a busy core can be "
             "several times slower than at 1)" if limits else
             "at numpy's own thread count (install threadpoolctl to match the row's)")
    print("W GB/s: bytes of the weight as the kernel reads it (int8, and float where a packed float kernel takes it: the packed copy) per second; %bw: of the "
          "read bandwidth printed under the shape's rows (a 256 MiB buffer: DRAM), at that thread count (above 100%: the weights are served from cache); %bwW: of "
          "the read bandwidth of a buffer the weight's size (from cache when it fits); both are what a probe reached, "
          "not a hard ceiling (a BLAS sgemv can read faster); %hw: of the instruction peak printed there (int8 rows: the "
          "int8 dot product's, float rows: the fp32 FMA's); %roof: of the roofline that binds the row, "
          "min(weight-sized read bandwidth x FLOP per weight byte, that peak) ('>100' where the row beats the "
          f"bandwidth probe); np time / vs np: numpy fp32 x @ W.T, {np_at}, and the speed-up over it; "
          "max rel err: vs x @ dequantize(W).T. Ceilings and numpy are measured before and after each shape's rows (the "
          "best of the looks), and a shape's rows are printed when it is done", file=out)
    bw_w: dict = {}
    print(hdr, file=out)
    rng = np.random.default_rng(0)
    rows = []
    for (m, k, n) in shapes:
        w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
        x = rng.standard_normal((m, k)).astype(np.float32)
        wf = w.copy()
        # the baseline at each row's thread count (numpy at its own count made 1-thread rows look
        # faster by the BLAS's parallel speed-up)
        np_threads_all = range(1, max(thread_list) + 1) if limits else thread_list
        t_np = {th: _numpy_time(lambda: x @ wf.T, th, limits) for th in np_threads_all}
        shape_rows = []
        for fmt in formats:
            qt = pq.quantize(w, fmt)
            ref = x @ pq.dequantize(qt).T
            scale = float(np.abs(ref).max()) or 1.0
            # numpy's OpenBLAS threads spin for ~0.1-0.2 s after a call, taking a core from
            # pyqkern's pool: a 2-thread GEMV timed right after ran at one thread's speed
            time.sleep(0.25)
            for compute in ("int8", "float"):
                if compute == "int8" and not pq._matmul.int8_supported(qt):
                    continue
                for th in thread_list:
                    pq.set_num_threads(th)
                    y = pq.matmul(x, qt, compute=compute)
                    err = float(np.abs(y - ref).max()) / scale
                    t = _best_time(lambda: pq.matmul(x, qt, compute=compute))
                    # the bytes the kernel streams: int8 (and the bf16 decode kernel) read the packed
                    # copy, for q6_k 1.31x the QTensor
                    nbytes = streamed_weight_bytes(qt, compute, m)
                    if (nbytes, th) not in bw_w:
                        bw_w[(nbytes, th)] = read_bandwidth(nbytes, th, reps=50)
                    shape_rows.append((fmt, compute, th, t, nbytes, err))
            qt.release_packed()
        # the second look, after the rows
        time.sleep(0.25)
        for th in np_threads_all:
            tn, np_threads = _numpy_time(lambda: x @ wf.T, th, limits)
            t_np[th] = (min(tn, t_np[th][0]), np_threads)
        if limits:  # numpy's best at up to the row's count (it may be slower at more)
            t_np = {th: min((t_np[c] for c in np_threads_all if c <= th), key=lambda v: v[0]) for th in thread_list}
        bws, peaks, fpeaks = ceilings(bws, peaks, fpeaks)
        for key in {(nb, th) for _, _, th, _, nb, _ in shape_rows}:
            bw_w[key] = max(bw_w[key], read_bandwidth(key[0], key[1], reps=50))
        for fmt, compute, th, t, nbytes, err in shape_rows:
            gflops = 2.0 * m * n * k / t / 1e9
            wgbs = nbytes / t / 1e9
            tn, np_threads = t_np[th]
            # the roofline: what the weight's reads allow, capped by the instruction peak (int8
            # rows: the int8 dot product's; float rows: the fp32 FMA's)
            peak = peaks[th] if compute == "int8" else fpeaks[th]
            roof = min(bw_w[(nbytes, th)] * (2.0 * m * n * k / nbytes), peak) if peak else None
            row = dict(format=fmt, compute=compute, M=m, K=k, N=n, threads=th, time_s=t, gflops=gflops,
                       weight_bytes=nbytes, weight_gbs=wgbs, pct_bw=100 * wgbs / bws[th],
                       pct_bw_wsize=100 * wgbs / bw_w[(nbytes, th)], roof_gflops=roof,
                       pct_roof=None if roof is None else 100 * gflops / roof,
                       numpy_time_s=tn, speedup_vs_numpy=tn / t,
                       numpy_threads=np_threads, max_rel_err=err, read_bw_gbs=bws[th],
                       int8_hw_peak_gops=peaks[th], fma_hw_peak_gflops=fpeaks[th])
            hw = f"{'-':>5s}"
            if peak:
                row["pct_int8_hw_peak" if compute == "int8" else "pct_fma_hw_peak"] = pct = 100 * gflops / peak
                hw = f"{pct:5.0f}"
            pr = (f"{'-':>5s}" if roof is None else f"{row['pct_roof']:5.0f}" if row["pct_roof"] <= 100
                  else f"{'>100':>5s}")
            rows.append(row)
            print(f"{fmt:7s} {compute:7s} {m:4d} {k:6d} {n:6d} {th:3d} {t * 1e6:8.1f}us {gflops:8.1f} "
                  f"{wgbs:7.1f} {row['pct_bw']:5.0f} {row['pct_bw_wsize']:5.0f} {hw} {pr} {tn * 1e3:8.2f}ms "
                  f"{tn / t:6.2f} {err:11.2e}", file=out)
        # the ceilings these rows' percentages used (later looks may find higher ones)
        print("  (these rows: read bandwidth " + ", ".join(f"{th}t {v:.1f}" for th, v in bws.items())
              + " GB/s, int8 peak " + per_thread(peaks) + " GOP/s, fp32 FMA peak " + per_thread(fpeaks)
              + " GFLOP/s)", file=out)
    print("read bandwidth: " + ", ".join(f"{th}t {v:.1f}" for th, v in bws.items())
          + " GB/s  int8 instruction peak: " + per_thread(peaks, " GOP/s")
          + "  fp32 FMA peak: " + per_thread(fpeaks, " GFLOP/s") + " (best of the looks)", file=out)
    return rows


def plot_roofline(rows, path):
    """Roofline picture of bench rows (needs matplotlib): GFLOP/s against arithmetic intensity
    (FLOP per weight byte), the measured read-bandwidth roofs (bw · intensity: a DRAM-sized buffer,
    and the best weight-sized one, from cache where the weight fits) and the measured int8 and
    fp32 FMA instruction peaks as flat lines; one colour per format, circles int8, squares float, filled at the highest thread count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from e
    if not rows:
        raise ValueError("nothing to plot")
    bw = max(r["weight_gbs"] * 100 / r["pct_bw"] for r in rows if r["pct_bw"] > 0)  # the best thread count's
    ai = [2.0 * r["M"] * r["N"] * r["K"] / (r["weight_gbs"] * r["time_s"] * 1e9) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = [min(ai) / 2, max(ai) * 2]
    ax.plot(xs, [bw * x for x in xs], "k--", lw=1, label=f"read bandwidth, DRAM {bw:.1f} GB/s")
    bw_c = max((r["weight_gbs"] * 100 / r["pct_bw_wsize"] for r in rows if r.get("pct_bw_wsize", 0) > 0), default=0)
    if bw_c > bw:
        ax.plot(xs, [bw_c * x for x in xs], "k:", lw=1, label=f"read bandwidth, weight-sized buffer {bw_c:.1f} GB/s")
    peak = max((r.get("int8_hw_peak_gops") or 0 for r in rows), default=0)
    if peak:  # the rows' ceiling, measured by a probe (not this run's best row)
        ax.axhline(peak, color="gray", ls="-.", lw=1, label=f"int8 instruction peak {peak:.0f} GOP/s")
    fpeak = max((r.get("fma_hw_peak_gflops") or 0 for r in rows), default=0)
    if fpeak:
        ax.axhline(fpeak, color="gray", ls=":", lw=1, label=f"fp32 FMA peak {fpeak:.0f} GFLOP/s")
    fmts = sorted({r["format"] for r in rows})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    tmax = max(r["threads"] for r in rows)
    for r, a in zip(rows, ai):
        c = colours[fmts.index(r["format"]) % len(colours)]
        ax.scatter([a], [r["gflops"]], marker="o" if r["compute"] == "int8" else "s", s=28, edgecolors=c,
                   facecolors=c if r["threads"] == tmax else "none")
    for f in fmts:
        ax.scatter([], [], color=colours[fmts.index(f) % len(colours)], label=f)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per weight byte)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title("pyqkern matmul roofline (o int8, s float; filled: most threads)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_FLOAT_DT = ("F32", "F16", "BF16")
_ERR_CHUNK = 1 << 18  # elements per row chunk in the error sums (small float64 temporaries)


def _shards(path):
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise ValueError(f"{path}: directory holds no *.safetensors files")
        return files
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: input must be a .safetensors file or a directory of shards")
    if not os.path.isfile(path):  # a FIFO or a device is no regular file either (a review: "no such file")
        raise ValueError(f"{path}: {'not a regular file' if os.path.exists(path) else 'no such file'}")
    return [path]


def _deq_rows(qt, r0, r1):
    """float64 dequantized rows r0:r1 of qt (dequantizes only those rows)."""
    import pyqkern as pq
    from pyqkern import _qtensor

    if qt.params.get("double_quant"):  # nested statistics span rows: no cheap row slice
        return pq.dequantize(qt)[r0:r1].astype(np.float64)
    q, s, z = qt.sections()
    sub = _qtensor.assemble(qt.format, r1 - r0, qt.shape[1], qt.params, q[r0:r1],
                            s[r0:r1] if s.size else None, z[r0:r1] if z.size else None)
    if qt.perm is not None:
        sub = sub.with_perm(qt.perm)
    return pq.dequantize(sub).astype(np.float64)


def _ratio(num, den):
    return float(np.sqrt(num / den)) if den > 0 else (0.0 if num == 0 else float("inf"))


def _errors(w, qts, H=None):
    """For each QTensor in qts: (relative weight error ||W - Ŵ||/||W||, relative layer-output error
    sqrt(tr(D H Dᵀ) / tr(W H Wᵀ)) with D = W - Ŵ, or None without H). With H = 2/n XᵀX the latter
    is ||X Dᵀ|| / ||X Wᵀ|| on the calibration inputs X. Summed over row chunks in float64, so the
    temporaries stay small next to the weight; W and every D of a chunk go through one GEMM with H."""
    n, k = w.shape
    m = len(qts) + 1
    step = max(1, _ERR_CHUNK // k)
    sq, sh = np.zeros(m), np.zeros(m)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        r = r1 - r0
        stack = np.empty((m, r, k))
        stack[0] = w[r0:r1]
        for i, qt in enumerate(qts, 1):
            np.subtract(stack[0], _deq_rows(qt, r0, r1), out=stack[i])
        flat = stack.reshape(m, -1)
        sq += np.einsum("ij,ij->i", flat, flat)
        if H is not None:
            sh += np.einsum("ij,ij->i", (stack.reshape(-1, k) @ H).reshape(m, -1), flat)
    return [(_ratio(sq[i], sq[0]), _ratio(sh[i], sh[0]) if H is not None else None) for i in range(1, m)]


class _Progress:
    """A tqdm bar on stderr when tqdm is installed and stderr is a terminal, else one line per
    tensor; nothing with quiet. Warnings are always printed (through the bar when there is one)."""

    def __init__(self, total, quiet, err):
        self.err, self.quiet, self.total, self.bar = err, quiet, total, None
        if not quiet and getattr(err, "isatty", lambda: False)():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, unit="tensor", file=err, desc="quantize", dynamic_ncols=True)

    def step(self, i, name, line):
        if self.bar is not None:
            self.bar.set_postfix_str(name, refresh=False)
            self.bar.update(1)
        elif not self.quiet:
            print(f"[{i}/{self.total}] {line}", file=self.err, flush=True)

    def warn(self, msg):
        if self.bar is not None:
            self.bar.write(msg, file=self.err)
        else:
            print(msg, file=self.err, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt_err(v):
    return "" if v is None else f"{v:.3e}"


def _print_summary(out, rows, dst, quiet, gptq_ran):
    q = [r for r in rows if r["format"] is not None]
    kept = [r for r in rows if r["format"] is None]
    if not quiet:
        w = max([len(r["name"]) for r in rows] + [4])
        hdr = (f"{'name':{w}s}  {'shape':>14s} {'dtype':>5s}  {'stored as':22s} {'bytes before':>13s} "
               f"{'bytes after':>12s} {'w.err':>9s}")
        if gptq_ran:
            hdr += f" {'out.err RTN':>11s} {'out.err GPTQ':>12s}"
        print(hdr, file=out)
        for r in rows:
            line = (f"{r['name']:{w}s}  {str(r['shape']):>14s} {r['dtype']:>5s}  {r['stored']:22s} "
                    f"{r['bytes_before']:13d} {r['bytes_after']:12d} {_fmt_err(r['w_err']):>9s}")
            if gptq_ran:
                line += f" {_fmt_err(r['out_err_rtn']):>11s} {_fmt_err(r['out_err_gptq']):>12s}"
            print(line.rstrip(), file=out)
        print(file=out)

    def total(label, rs):
        b, a = sum(r["bytes_before"] for r in rs), sum(r["bytes_after"] for r in rs)
        print(f"{label:14s} {len(rs):8d} {b:14d} {a:14d} {b / max(a, 1):7.2f}x", file=out)

    print(f"{'':14s} {'tensors':>8s} {'bytes before':>14s} {'bytes after':>14s} {'ratio':>8s}", file=out)
    total("quantized", q)
    if gptq_ran:
        total("  GPTQ", [r for r in q if r["method"] == "gptq"])
        total("  RTN", [r for r in q if r["method"] == "rtn"])
    total("kept", kept)
    total("total", rows)
    errs = [r["w_err"] for r in q]
    print(f"mean relative error ||W - deq||/||W|| over quantized tensors: "
          f"{f'{np.mean(errs):.4e}' if errs else 'n/a'}", file=out)
    g = [r for r in q if r["out_err_gptq"] is not None]
    if g:
        print(f"mean relative layer-output error ||X(W - deq)^T||/||XW^T|| on the calibration data over "
              f"{len(g)} GPTQ tensors: RTN {np.mean([r['out_err_rtn'] for r in g]):.4e}, "
              f"GPTQ {np.mean([r['out_err_gptq'] for r in g]):.4e}", file=out)
    print(f"wrote {dst}", file=out)


def quantize_files(src, dst, fmt, group=None, sym=False, exclude=None, min_size=0, out=None, *,
                   gptq=False, calib=None, act_order=False, damp=None, calib_max_length=None, quiet=False,
                   err=None):
    """`pyqkern quantize`: returns the summary dict. Raises ValueError for bad arguments or files.

    Streams one tensor at a time: each tensor is read (a plain read into a fresh array), quantized,
    written and dropped before the next one, so peak memory is about the largest tensor (plus, with
    GPTQ, that tensor's Hessian and GPTQ's work arrays), not the model. The output is the same bytes
    that :func:`pyqkern.io.save_gguf` / :func:`pyqkern.io.save` write for the same tensors.

    gptq: quantize each 2-D weight with GPTQ using calibration activations from ``calib`` (.npz by
    tensor name, .npy [tokens, K] shared by K, or .txt lines run through the input Hugging Face
    model directory; see :mod:`pyqkern._calib`); weights without calibration data fall back to
    round-to-nearest with a warning. Progress goes to ``err`` (stderr), the summary to ``out``."""
    out = out or sys.stdout
    err = err or sys.stderr
    import pyqkern as pq
    from pyqkern import _calib, _formats, _ops, _qtensor
    from pyqkern.io import _stream, gguf as _gg, qsave, safetensors as st

    if fmt not in _formats.FORMATS:
        raise ValueError(f"unknown format {fmt!r}; supported: {', '.join(_formats.FORMATS)}")
    kind = "gguf" if dst.endswith(".gguf") else "safetensors" if dst.endswith(".safetensors") else None
    if kind is None:
        raise ValueError(f"{dst}: output must end in .gguf or .safetensors")
    out_dir = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(out_dir):  # said up front, not as the temporary file's name after reading the input
        raise ValueError(f"{dst}: the output directory {out_dir} does not exist")
    if kind == "gguf" and fmt not in _gg.GGML_TYPES:
        raise ValueError(f"{fmt} is not a ggml format and cannot be written to GGUF "
                         f"(use {', '.join(_gg.GGML_TYPES)}, or a .safetensors output)")
    _formats.resolve_params(fmt, 1 << 12, group, sym)  # argument check (K = 4096 fits every block)
    if calib is not None and not gptq:
        raise ValueError("--calib is used by --gptq; add --gptq")
    if gptq:
        from pyqkern import gptq as _gptq

        if calib is None:
            raise ValueError("--gptq needs calibration activations: --calib FILE (.npz, .npy or .txt)")
        if fmt not in _gptq.FORMATS:
            raise ValueError(f"GPTQ does not support {fmt} (supported: {', '.join(_gptq.FORMATS)}); "
                             f"drop --gptq for round-to-nearest {fmt}")
    elif act_order or damp is not None or calib_max_length is not None:
        raise ValueError("--act-order, --damp and --calib-max-length apply to --gptq only")
    if calib_max_length is not None and not str(calib).endswith(".txt"):
        raise ValueError("--calib-max-length applies to .txt calibration (tokenized lines) only")
    if act_order and kind == "gguf":
        raise ValueError("--act-order permutes the input channels, which GGUF cannot store: "
                         "write a .safetensors output or drop --act-order")
    damp = 0.01 if damp is None else float(damp)
    if not (np.isfinite(damp) and damp >= 0):
        raise ValueError(f"--damp must be a finite number >= 0, got {damp}")
    try:
        pat = re.compile(exclude) if exclude else None
    except re.error as e:  # named: a bare "missing ), unterminated subpattern" did not say which option
        raise ValueError(f"--exclude {exclude!r} is not a regular expression: {e}") from None
    shards = _shards(src)
    if os.path.isdir(dst):  # found now, not at the final rename after all the work
        raise ValueError(f"{dst}: is a directory")
    for shard in shards:
        if os.path.exists(dst) and os.path.samefile(shard, dst):
            raise ValueError(f"{dst}: is the input {shard}; write the output to another file")
    plan, seen, meta_in = [], {}, {}
    for shard in shards:
        hdr, meta = st.read_header(shard)
        if qsave.META_KEY in meta:
            raise ValueError(f"{shard}: already holds pyqkern QTensors")
        meta_in.update(meta)
        for name, e in hdr.items():
            if name in seen:
                raise ValueError(f"tensor {name!r} is in both {seen[name]} and {shard}")
            seen[name] = shard
            if kind == "safetensors" and name.endswith(qsave.PERM_SUFFIX):
                raise ValueError(f"tensor {name!r}: the suffix {qsave.PERM_SUFFIX!r} is reserved by pyqkern")
            shape, dt = tuple(e["shape"]), e["dtype"]
            params, why = None, None
            if dt not in _FLOAT_DT:
                why = f"dtype {dt}"
            elif len(shape) != 2:
                why = f"{len(shape)}-D"
            elif int(np.prod(shape)) < min_size:
                why = "below --min-size"
            elif pat is not None and pat.search(name):
                why = "excluded"
            elif 0 in shape:
                why = "empty"
            else:
                try:
                    params = _formats.resolve_params(fmt, shape[1], group, sym)
                except ValueError:
                    why = f"K={shape[1]} does not fit {fmt}"
            if kind == "gguf":
                _gg._check_name(name)  # before any work (GGUFStreamWriter.declare checks it again)
            if kind == "gguf" and params is None:
                if dt not in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"):
                    raise ValueError(f"tensor {name!r}: dtype {dt} cannot be stored in GGUF")
                if not 1 <= len(shape) <= 4 or 0 in shape:
                    raise ValueError(f"tensor {name!r}: shape {list(shape)} cannot be stored in GGUF (1..4 dims)")
            plan.append((shard, name, dt, shape, params, why))
    if not plan:
        raise ValueError(f"{src}: no tensors")

    prog = _Progress(len(plan), quiet, err)
    source, have = None, set()
    sw = reader = None
    try:
        if gptq:
            source = _calib.open_source(calib, src, os.path.dirname(os.path.abspath(dst)),
                                        512 if calib_max_length is None else calib_max_length)
            targets = {name: shape for _, name, _, shape, params, _ in plan if params is not None}
            have = source.prepare(targets, prog.warn)
        if kind == "gguf":
            # the input's quantization version describes its own tensors, not the ones written here
            sw = _gg.GGUFStreamWriter(dst, {k: v for k, v in meta_in.items() if k != "general.quantization_version"})
            gtypes = _gg._gguf().GGMLQuantizationType
            for _, name, dt, shape, params, _ in plan:
                if params is not None:
                    nb = _qtensor.total_bytes(fmt, shape[0], shape[1], params)
                    sw.declare(name, nb, shape, getattr(gtypes, _gg.GGML_TYPES[fmt]))
                elif dt == "BF16":  # GGUF holds BF16 as it is (it was widened to F32: twice the bytes)
                    sw.declare(name, int(np.prod(shape)) * 2, shape, gtypes.BF16)
                else:
                    npdt = st.DTYPES[dt]
                    sw.declare(name, int(np.prod(shape)) * npdt.itemsize, shape, dtype=npdt)
            sw.begin()
        else:
            sw = _stream.QSaveStreamWriter(
                dst, [("q", name, fmt, shape, params, gptq and act_order and name in have) if params is not None
                      else ("a", name, dt, shape) for _, name, dt, shape, params, _ in plan], meta_in)
        rows = []
        for i, (shard, name, dt, shape, params, why) in enumerate(plan, 1):
            if reader is None or reader.path != shard:
                if reader is not None:
                    reader.close()
                reader = _stream.ShardReader(shard)
            a = reader.read(name)
            row = dict(name=name, shape=list(shape), dtype=dt, bytes_before=a.nbytes, format=None, method=None,
                       w_err=None, out_err_rtn=None, out_err_gptq=None)
            if params is not None:
                w = _ops.as_float32_2d(a)
                del a
                qt, method = None, "rtn"
                if name in have:
                    qt, H = _gptq_one(w, name, fmt, params, act_order, damp, source, prog)
                    method = "gptq" if qt is not None else "rtn"
                elif gptq:
                    prog.warn(f"warning: no calibration data for {name}: round-to-nearest {fmt}")
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        rtn = pq.quantize(w, fmt, group=group, sym=sym)
                    except ValueError as e:  # NaN / Inf weights: say which tensor
                        raise ValueError(f"{name}: {e}") from None
                for m in caught:  # scales the format cannot hold: the file would hold Inf / NaN
                    if "too large for the format" in str(m.message):
                        raise ValueError(f"{name}: {m.message}; nothing was written")
                    warnings.warn_explicit(m.message, m.category, m.filename, m.lineno)
                if qt is None:
                    qt = rtn
                    (row["w_err"], _), = _errors(w, [rtn])
                else:
                    (row["w_err"], row["out_err_gptq"]), (_, row["out_err_rtn"]) = _errors(w, [qt, rtn], H)
                    del H
                del w, rtn
                row.update(format=fmt, method=method, bytes_after=qt.nbytes,
                           stored=fmt + (" GPTQ" if method == "gptq" else "") + (" +perm" if qt.perm is not None
                                                                                  else ""))
                line = (f"{name} {list(shape)} {dt} -> {row['stored']} {qt.bits_per_weight:.2f} bpw  "
                        f"rel.err {row['w_err']:.3e}")
                if method == "gptq":
                    line += f"  out.err GPTQ {row['out_err_gptq']:.3e} (RTN {row['out_err_rtn']:.3e})"
                if kind == "gguf":
                    sw.write(name, qt.data)
                else:
                    sw.write_qtensor(name, qt)
                del qt
            else:
                row.update(bytes_after=a.nbytes, stored=f"kept ({why})")
                line = f"{name} {list(shape)} {dt} kept ({why})"
                if kind == "gguf":
                    sw.write(name, a)
                else:
                    sw.write_array(name, a)
                del a
            rows.append(row)
            prog.step(i, name, line)
        sw.finish()
    except BaseException:
        if sw is not None:
            sw.abort()
        raise
    finally:
        prog.close()
        if reader is not None:  # on error paths too (review: the input stayed open with the traceback)
            reader.close()
        if source is not None:
            source.close()
    q = [r for r in rows if r["format"] is not None]
    g = [r for r in q if r["method"] == "gptq"]
    summary = dict(quantized=len(q), kept=len(rows) - len(q), bytes_before=sum(r["bytes_before"] for r in rows),
                   bytes_after=sum(r["bytes_after"] for r in rows),
                   mean_rel_err=float(np.mean([r["w_err"] for r in q])) if q else None,
                   gptq=len(g), rtn=len(q) - len(g),
                   mean_out_err_gptq=float(np.mean([r["out_err_gptq"] for r in g])) if g else None,
                   mean_out_err_rtn=float(np.mean([r["out_err_rtn"] for r in g])) if g else None,
                   tensors=rows)
    _print_summary(out, rows, dst, quiet, gptq)
    return summary


def _gptq_one(w, name, fmt, params, act_order, damp, source, prog):
    """GPTQ of one weight with its calibration data -> (QTensor, Hessian), or (None, None) after a
    warning when GPTQ cannot factor the Hessian (the caller falls back to round-to-nearest)."""
    from pyqkern import gptq as _gptq

    g = _gptq.GPTQ(w)
    source.feed(name, g)
    kw = dict(format=fmt, act_order=bool(act_order), damp=damp)
    if params.get("group"):
        kw.update(group_size=params["group"], sym=bool(params["sym"]))
    try:
        with warnings.catch_warnings():  # scales out of range: the round-to-nearest check next names the tensor
            warnings.filterwarnings("ignore", message=".*too large for the format", category=UserWarning)
            qt = g.quantize(**kw)
    except (ValueError, np.linalg.LinAlgError) as e:
        prog.warn(f"warning: GPTQ failed for {name} ({e}): round-to-nearest {fmt}")
        return None, None
    return qt, g.H


def inspect_file(path, out=None):
    """`pyqkern inspect`: list tensors (name, format/dtype, shape, bits per weight). Returns the rows."""
    out = out or sys.stdout
    from pyqkern import _formats
    from pyqkern.io import gguf as _gg, qsave, safetensors as st

    rows = []
    if path.endswith(".gguf"):
        infos, meta = _gg.read_gguf_info(path)
        ours = {v: k for k, v in _gg.GGML_TYPES.items()}
        for name, t, shape, nb in infos:
            nel = int(np.prod(shape))
            rows.append((name, ours.get(t, t), list(shape), nb * 8.0 / nel))
        print(f"{path}: GGUF, {len(infos)} tensors, {len(meta)} metadata keys, "
              f"architecture {meta.get('general.architecture')!r}", file=out)
    elif path.endswith(".safetensors"):
        hdr, meta = st.read_header(path)
        desc = qsave.describe(meta, path)
        if desc:  # every check load makes (bytes, params, perms; the data stays mapped, unread)
            qsave.load(path)
        perms = {d[3] for d in desc.values() if d[3]}
        for name, e in hdr.items():
            if name in perms:
                continue
            if name in desc:
                fmt, shape, params, perm = desc[name]
                nb = e["data_offsets"][1] - e["data_offsets"][0]
                extra = ",".join(f"{k}={v}" for k, v in params.items() if v) if fmt in _formats.GROUPED else ""
                rows.append((name, fmt + (f"({extra})" if extra else "") + ("+perm" if perm else ""), list(shape),
                             nb * 8.0 / (shape[0] * shape[1])))
            else:
                rows.append((name, e["dtype"], e["shape"], st.DTYPES[e["dtype"]].itemsize * 8.0))
        print(f"{path}: safetensors, {len(rows)} tensors ({len(desc)} pyqkern QTensors)", file=out)
    else:
        raise ValueError(f"{path}: inspect reads .gguf and .safetensors files")
    w = max([len(r[0]) for r in rows] + [4])
    print(f"{'name':{w}s}  {'format':18s} {'shape':>18s} {'bits/w':>7s}", file=out)
    for name, f, shape, bpw in rows:
        print(f"{name:{w}s}  {f:18s} {str(shape):>18s} {bpw:7.3f}", file=out)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="pyqkern", description="pyqkern: CPU quantization kernels")
    sub = ap.add_subparsers(dest="cmd")
    b = sub.add_parser("bench", help="run the matmul kernels on built-in default shapes and print a table")
    b.add_argument("--quick", action="store_true", help="a short run (a few shapes and formats)")
    b.add_argument("--threads", type=int, nargs="*",
                   help="thread counts to run (default: 1 and the pool's count; --quick: the pool's count)")
    b.add_argument("--formats", nargs="*", help="formats to run")
    b.add_argument("--json", help="also write the rows to this JSON file")
    b.add_argument("--plot", help="also draw a roofline picture to this .png (needs matplotlib)")
    sub.add_parser("info", help="print CPU features and kernel variants")
    q = sub.add_parser("quantize", help="quantize a .safetensors file (or a directory of shards) to .gguf or "
                                        ".safetensors (pyqkern layout)")
    q.add_argument("input", help=".safetensors file or directory of *.safetensors shards")
    q.add_argument("output", help=".gguf (ggml formats) or .safetensors. The GGUF keeps the input's tensor names "
                                  "and metadata (general.architecture 'pyqkern'): a tensor file, not a llama.cpp "
                                  "model unless the input was one (llama.cpp's convert_hf_to_gguf.py makes those)")
    q.add_argument("--format", required=True, help="target format (q4_0, q4_k, int4, nf4, ...)")
    q.add_argument("--group", type=int, default=None, help="group / block size (int4, nf4)")
    q.add_argument("--sym", action="store_true", help="symmetric int4")
    q.add_argument("--exclude", default=None, help="keep tensors whose name matches this regex (re.search)")
    q.add_argument("--min-size", type=int, default=0, help="keep tensors with fewer elements")
    q.add_argument("--gptq", action="store_true", help="GPTQ with calibration activations (--calib) instead of "
                                                       "round-to-nearest")
    q.add_argument("--calib", default=None,
                   help="GPTQ calibration: .npz (activations [tokens, K] keyed by tensor name, with or without "
                        "'.weight'), .npy (one [tokens, K] array for every weight with that K) or .txt (one text "
                        "per line, run through the input Hugging Face model directory; needs transformers)")
    q.add_argument("--act-order", action="store_true", help="GPTQ: process columns by descending Hessian "
                                                            "diagonal (stores an input permutation; .safetensors only)")
    q.add_argument("--damp", type=float, default=None, help="GPTQ: dampening, fraction of mean(diag H) (default 0.01)")
    q.add_argument("--calib-max-length", type=int, default=None,
                   help="GPTQ .txt: tokens per line at most (default 512)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr and no per-tensor table")
    ins = sub.add_parser("inspect", help="list the tensors of a .gguf or .safetensors file")
    ins.add_argument("file")
    args = ap.parse_args(argv)
    try:
        return _run(ap, args)
    except KeyboardInterrupt:  # outputs are written to a temporary file and renamed at the end
        print(f"pyqkern {args.cmd or ''}: interrupted".replace("  ", " "), file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pyqkern info | head`: the reader left (outputs were complete by then)
        try:  # as the Python docs advise: no second error when the interpreter flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0


def _bench_outputs_error(json_path, plot_path):
    """Why bench's --json / --plot paths cannot be written (checked before the run), or None (a
    review: --json was opened, so emptied, first and deleted on any error, an existing file with
    it; --json and --plot naming one file made a corrupt file and exit status 0; a --plot type
    matplotlib cannot write failed only after the run)."""
    for opt, path in (("--json", json_path), ("--plot", plot_path)):
        if path and (os.path.isdir(path) or not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK)):
            return f"{opt}: cannot write {path}"
    if json_path and plot_path and os.path.abspath(json_path) == os.path.abspath(plot_path):
        return "--json and --plot name the same file"
    if plot_path:
        try:
            import matplotlib

            matplotlib.use("Agg")
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            return "--plot needs matplotlib (pip install matplotlib)"
        kinds = FigureCanvasBase.get_supported_filetypes()
        ext = os.path.splitext(plot_path)[1].lower().lstrip(".")
        if ext not in kinds:
            return (f"--plot: cannot write a {ext or 'file without an extension'!r} picture "
                    f"(types: {', '.join(sorted(kinds))})")
    return None


def _run(ap, args):
    if os.environ.get("PYQKERN_ISA"):  # a variant this CPU cannot run is an error, not a crash
        from pyqkern import _ops

        try:
            _ops._native().active_isa()
        except (RuntimeError, ValueError) as e:
            print(f"pyqkern: error: {e}", file=sys.stderr)
            return 1
    if args.cmd in ("quantize", "inspect"):
        old_term = None
        if args.cmd == "quantize":  # SIGTERM cleans up as Ctrl-C does (no partial .tmp file left)
            import signal

            def _term(signum, frame):
                raise KeyboardInterrupt

            try:
                old_term = signal.signal(signal.SIGTERM, _term)
            except ValueError:  # not the main thread (main() called from a thread)
                pass
        try:
            if args.cmd == "quantize":
                quantize_files(args.input, args.output, args.format, args.group, args.sym, args.exclude,
                               args.min_size, gptq=args.gptq, calib=args.calib, act_order=args.act_order,
                               damp=args.damp, calib_max_length=args.calib_max_length, quiet=args.quiet)
            else:
                inspect_file(args.file)
        except BrokenPipeError:  # stdout's reader left; the table is printed after the file is complete
            raise
        except (ValueError, TypeError, OSError, re.error, NotImplementedError) as e:
            print(f"pyqkern {args.cmd}: error: {e}", file=sys.stderr)
            return 1
        finally:
            if old_term is not None:  # main() called in-process (tests, a host script): its handler back
                signal.signal(signal.SIGTERM, old_term)
        return 0
    if args.cmd == "info":
        import pyqkern as pq

        try:
            print(json.dumps(pq.info(), indent=2), flush=True)
        except BrokenPipeError:
            raise
        except OSError as e:  # `pyqkern info > /dev/full` (a review: a traceback)
            print(f"pyqkern info: error: cannot write the output: {e}", file=sys.stderr)
            return 1
        return 0
    if args.cmd == "bench":
        why = _bench_outputs_error(args.json, args.plot)  # fail before the run, not after it
        if why:
            print(f"pyqkern bench: error: {why}", file=sys.stderr)
            return 1
        try:
            rows = bench(args.quick, args.threads, args.formats)
            if args.plot:
                plot_roofline(rows, args.plot)
            if args.json:  # written whole and renamed: a failed run leaves an existing file as it was
                from .io.safetensors import write_replacing

                write_replacing(args.json, lambda f: json.dump(rows, f, indent=1), text=True)
        except (ValueError, OSError) as e:
            print(f"pyqkern bench: error: {e}", file=sys.stderr)
            return 1
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
