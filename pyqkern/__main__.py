"""Command line: `pyqkern bench [--quick] [--threads N] [--formats ...]`, `pyqkern info`,
`pyqkern quantize IN OUT --format F [--group G] [--sym] [--exclude REGEX] [--min-size N]`,
`pyqkern inspect FILE`."""
from __future__ import annotations

import argparse
import json
import os
import re
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


_FLOAT_DT = ("F32", "F16", "BF16")


def _shards(path):
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise ValueError(f"{path}: directory holds no *.safetensors files")
        return files
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: input must be a .safetensors file or a directory of shards")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    return [path]


def _rel_err(w, deq):
    nw = float(np.linalg.norm(w.astype(np.float64)))
    nd = float(np.linalg.norm(w.astype(np.float64) - deq))
    return nd / nw if nw else (0.0 if nd == 0 else float("inf"))


def quantize_files(src, dst, fmt, group=None, sym=False, exclude=None, min_size=0, out=None):
    """`pyqkern quantize`: returns the summary dict. Raises ValueError for bad arguments or files."""
    out = out or sys.stdout
    import pyqkern as pq
    from pyqkern import _formats, _qtensor
    from pyqkern.io import gguf as _gg, qsave, safetensors as st

    if fmt not in _formats.FORMATS:
        raise ValueError(f"unknown format {fmt!r}; supported: {', '.join(_formats.FORMATS)}")
    kind = "gguf" if dst.endswith(".gguf") else "safetensors" if dst.endswith(".safetensors") else None
    if kind is None:
        raise ValueError(f"{dst}: output must end in .gguf or .safetensors")
    if kind == "gguf" and fmt not in _gg.GGML_TYPES:
        raise ValueError(f"{fmt} is not a ggml format and cannot be written to GGUF "
                         f"(use {', '.join(_gg.GGML_TYPES)}, or a .safetensors output)")
    _formats.resolve_params(fmt, 1 << 12, group, sym)  # argument check (K = 4096 fits every block)
    pat = re.compile(exclude) if exclude else None
    plan, seen, meta_in = [], {}, {}
    for shard in _shards(src):
        hdr, meta = st.read_header(shard)
        if qsave.META_KEY in meta:
            raise ValueError(f"{shard}: already holds pyqkern QTensors")
        meta_in.update(meta)
        for name, e in hdr.items():
            if name in seen:
                raise ValueError(f"tensor {name!r} is in both {seen[name]} and {shard}")
            seen[name] = shard
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
            if kind == "gguf" and params is None:
                if dt not in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"):
                    raise ValueError(f"tensor {name!r}: dtype {dt} cannot be stored in GGUF")
                if not 1 <= len(shape) <= 4 or 0 in shape:
                    raise ValueError(f"tensor {name!r}: shape {list(shape)} cannot be stored in GGUF (1..4 dims)")
            plan.append((shard, name, dt, shape, params, why))
    if not plan:
        raise ValueError(f"{src}: no tensors")
    sw = None
    if kind == "gguf":
        sw = _gg.GGUFStreamWriter(dst, {k: v for k, v in meta_in.items()})
        for _, name, dt, shape, params, _ in plan:
            if params is not None:
                nb = _qtensor.total_bytes(fmt, shape[0], shape[1], params)
                sw.declare(name, nb, shape, getattr(_gg._gguf().GGMLQuantizationType, _gg.GGML_TYPES[fmt]))
            else:
                npdt = np.dtype(np.float32) if dt == "BF16" else st.DTYPES[dt]
                sw.declare(name, int(np.prod(shape)) * npdt.itemsize, shape, dtype=npdt)
        sw.begin()
    result, bf16_kept = {}, []
    nq = nk = before = after_q = after_k = 0
    errs = []
    try:
        cur, arrays = None, None
        for i, (shard, name, dt, shape, params, why) in enumerate(plan, 1):
            if shard != cur:
                cur, arrays = shard, st.load(shard, bf16="bits")[0]
            a = arrays[name]
            before += a.nbytes
            if params is not None:
                qt = pq.quantize(a, fmt, group=group, sym=sym)
                w = pq._ops.as_float32_2d(a)
                e = _rel_err(w, pq.dequantize(qt))
                errs.append(e)
                nq += 1
                after_q += qt.nbytes
                print(f"[{i}/{len(plan)}] {name} {list(shape)} {dt} -> {fmt} "
                      f"{qt.bits_per_weight:.2f} bpw  rel.err {e:.3e}", file=out, flush=True)
                if sw is not None:
                    sw.write(name, qt.data)
                else:
                    result[name] = qt
            else:
                if dt == "BF16":
                    if sw is not None:
                        a = (a.astype(np.uint32) << 16).view(np.float32)
                    else:
                        bf16_kept.append(name)
                nk += 1
                after_k += a.nbytes
                print(f"[{i}/{len(plan)}] {name} {list(shape)} {dt} kept ({why})", file=out, flush=True)
                if sw is not None:
                    sw.write(name, a)
                else:
                    result[name] = a
        if sw is not None:
            sw.finish()
        else:
            qsave.save(dst, result, meta_in or None, bf16=bf16_kept)
    except BaseException:
        if sw is not None:
            sw.abort()
        raise
    summary = dict(quantized=nq, kept=nk, bytes_before=before, bytes_after=after_q + after_k,
                   mean_rel_err=float(np.mean(errs)) if errs else None)
    print(f"\n{'':12s} {'tensors':>8s} {'bytes after':>14s}", file=out)
    print(f"{'quantized':12s} {nq:8d} {after_q:14d}", file=out)
    print(f"{'kept':12s} {nk:8d} {after_k:14d}", file=out)
    print(f"{'total':12s} {nq + nk:8d} {after_q + after_k:14d}   (before: {before} bytes, "
          f"ratio {before / max(after_q + after_k, 1):.2f}x)", file=out)
    me = summary["mean_rel_err"]
    print(f"mean relative error ||W - deq||/||W|| over quantized tensors: "
          f"{'n/a' if me is None else f'{me:.4e}'}", file=out)
    print(f"wrote {dst}", file=out)
    return summary


def inspect_file(path, out=None):
    """`pyqkern inspect`: list tensors (name, format/dtype, shape, bits per weight). Returns the rows."""
    out = out or sys.stdout
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
        perms = {d[3] for d in desc.values() if d[3]}
        for name, e in hdr.items():
            if name in perms:
                continue
            if name in desc:
                fmt, shape, params, perm = desc[name]
                nb = e["data_offsets"][1] - e["data_offsets"][0]
                extra = ",".join(f"{k}={v}" for k, v in params.items() if v) if fmt in ("nf4", "int4") else ""
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
    b.add_argument("--threads", type=int, nargs="*", help="thread counts to run (default: all CPUs)")
    b.add_argument("--formats", nargs="*", help="formats to run")
    b.add_argument("--json", help="also write the rows to this JSON file")
    sub.add_parser("info", help="print CPU features and kernel variants")
    q = sub.add_parser("quantize", help="quantize a .safetensors file (or a directory of shards) to .gguf or "
                                        ".safetensors (pyqkern layout)")
    q.add_argument("input", help=".safetensors file or directory of *.safetensors shards")
    q.add_argument("output", help=".gguf (ggml formats) or .safetensors")
    q.add_argument("--format", required=True, help="target format (q4_0, q4_k, int4, nf4, ...)")
    q.add_argument("--group", type=int, default=None, help="group / block size (int4, nf4)")
    q.add_argument("--sym", action="store_true", help="symmetric int4")
    q.add_argument("--exclude", default=None, help="keep tensors whose name matches this regex (re.search)")
    q.add_argument("--min-size", type=int, default=0, help="keep tensors with fewer elements")
    ins = sub.add_parser("inspect", help="list the tensors of a .gguf or .safetensors file")
    ins.add_argument("file")
    args = ap.parse_args(argv)
    if args.cmd in ("quantize", "inspect"):
        try:
            if args.cmd == "quantize":
                quantize_files(args.input, args.output, args.format, args.group, args.sym, args.exclude,
                               args.min_size)
            else:
                inspect_file(args.file)
        except (ValueError, TypeError, OSError, re.error) as e:
            print(f"pyqkern {args.cmd}: error: {e}", file=sys.stderr)
            return 1
        return 0
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
