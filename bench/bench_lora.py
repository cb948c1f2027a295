"""LoRA benchmarks: fused adapter vs base alone vs the unfused sequence, many adapters per batch.

    pytest bench/bench_lora.py --benchmark-only            # (1,4096,4096), ranks 8/16/64, 1 and 2 threads
    PYQKERN_BENCH_QUICK=1 pytest bench/bench_lora.py --benchmark-only

Rows (benchmark group per case):
- decode: (1, 4096, 4096) q4_0 and int4-g128, rank 8/16/64:
    base     QLinear(x)                         (no adapter)
    fused    QLinear(x) with the adapter added  (one call; shrink + expansion inside); fp32, bf16
             (fused-bf16) or fp16 (fused-fp16) A and B
    unfused  QLinear(x) + numpy (x @ A.T) @ B.T (what runtimes do today: base op + two GEMMs + add)
  extra_info["overhead_vs_base"] is reported on the fused/unfused rows (from the min times), and
  "overhead_paired": base and fused called alternately 400 times, median difference over median
  base (robust to the machine's drift between rows).
- decode stack: 8 different (4096, 4096) layers with their own rank-16 adapter called in turn (~75 MB,
  more than L3): base vs fused (fp32 / bf16 / fp16 adapters); extra_info["overhead_vs_base"] per layer,
  "overhead_paired" as above.
- multi: 32 rows, rank 16, fp32 and bf16 adapters: every row its own adapter (32 loaded) vs all rows sharing one;
  extra_info["ratio_vs_shared"] on the distinct row (min times of the two rows), and "ratio_paired":
  shared and distinct called alternately, 1 + median difference over median shared.
- decode_other_variants: rank 16, q4_0, fp32 / bf16 A and B, with each variant this CPU runs
    besides ref and the active one (pq.matmul(..., isa=v)); "overhead_paired" against that
    variant's base.
- decode_torch: the same through pyqkern.torch.QuantLinear (fp32 / bf16 module, frozen adapter):
  fused (the adapter attached) and unfused (PEFT's way beside a quantized base: the layer, then
  two torch matmuls, a scale and an add); "overhead_paired" against the layer without adapter.
- decode_ggml: llama.cpp's ggml on the same q4_0 bytes (repacked), the adapter applied as llama.cpp
  does (two more mul_mat, a scale and an add), fp32 / bf16 A and B; "overhead_paired" against
  ggml's own base. Skipped with the reason if ggml cannot be built here (bench/ggml_peer.py).
- backward (if pyqkern.lora.backward exists): M=512 step vs dequantize-then-numpy.

A summary table at the end lists every overhead row with its "floor": the adapter's bytes over
the base weight's (rank 16 at 4096x4096 on q4_0: 2.8% for bf16 or fp16 A and B, 5.6% for fp32). A GEMV
that reads its weight and the adapter from the same place at the same rate (the stack rows: both
from DRAM) cannot absorb the adapter for less. It is no bound where they come from different
places: a single layer called again and again has its weight partly in L3 while the adapter may
not be, and in quick mode (1024x1024) everything is in cache.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

import pyqkern as pq
from pyqkern._lora import LoRA

QUICK = os.environ.get("PYQKERN_BENCH_QUICK", "") not in ("", "0")
K = N = 1024 if QUICK else 4096
RANKS = [16] if QUICK else [8, 16, 64]
THREADS = [1] if QUICK else [1, 2]
_base_min: dict = {}
_shared_min: dict = {}


def _min_time(fn, reps=200):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _paired_times(base_fn, fn, pairs, warm=10):
    """times of base_fn and fn called alternately (arrays). Each pair runs both within
    milliseconds, so a noisy neighbour slows both sides alike, where separately timed rows of
    this shared machine drift apart by more than the effect measured."""
    def once(f):
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    for _ in range(warm):
        once(base_fn)
        once(fn)
    tb, tf = [], []
    for _ in range(pairs):
        tb.append(once(base_fn))
        tf.append(once(fn))
    return np.array(tb), np.array(tf)


def _paired_overhead(base_fn, fn, pairs=400):
    """median over alternating calls of (fn - base_fn) / median(base_fn)."""
    tb, tf = _paired_times(base_fn, fn, pairs)
    return float(np.median(tf - tb) / np.median(tb))


def _paired_ratios(base_fn, fn, pairs):
    """alternate calls: (median fn / median base_fn, min fn / min base_fn, min base_fn, min fn)."""
    tb, tf = _paired_times(base_fn, fn, pairs, warm=5)
    return float(np.median(tf) / np.median(tb)), float(tf.min() / tb.min()), float(tb.min()), float(tf.min())


@pytest.fixture(scope="module")
def layers():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((N, K)) * 0.02).astype(np.float32)
    return {"q4_0": pq.quantize(w, "q4_0"), "int4-g128": pq.quantize(w, "int4", group=128)}


def _adapter(r, seed):
    rng = np.random.default_rng(seed)
    return LoRA((rng.standard_normal((r, K)) * 0.01).astype(np.float32),
                (rng.standard_normal((N, r)) * 0.01).astype(np.float32), alpha=2 * r)


@pytest.fixture(params=THREADS, ids=lambda t: f"t{t}")
def threads(request):
    """pyqkern's pool and numpy's BLAS (the unfused sequence's products, the numpy baselines) at
    the row's thread count (review: the BLAS ran at its own count in 1-thread rows)."""
    from threadpoolctl import threadpool_limits

    before = pq.get_num_threads()
    pq.set_num_threads(request.param)
    with threadpool_limits(limits=request.param, user_api="blas"):
        yield request.param
    pq.set_num_threads(before)


def _info(benchmark, **kw):
    """cpu, variant (the active one unless kw names another) and kw into the row's extra_info."""
    benchmark.extra_info.update(dict(cpu=pq.info()["cpu"], variant=pq.info()["active_variant"]), **kw)


_STORAGE = {"fused": "float32", "fused-bf16": "bfloat16", "fused-fp16": "float16"}  # the adapter's, by mode
_AB = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # the summary's A,B column
_ROWS: list = []  # (benchmark, adapter storage, base weight bytes) of the overhead rows, for the summary
_MULTI: list = []  # extra_info of the distinct-adapter rows, for the summary


def _floor(storage, r, base_bytes):
    """the adapter's bytes over the base weight's: what reading A and B costs at the rate the
    base reads its weight (a fused kernel at the read ceiling cannot add less)."""
    return r * (K + N) * (4 if storage == "float32" else 2) / base_bytes


class _Summary:
    def pytest_terminal_summary(self, terminalreporter):
        tr = terminalreporter
        if _MULTI:
            tr.section(f"32 rows, each its own rank-16 adapter, vs 32 rows sharing one (cpu: {pq.info()['cpu']})")
            tr.write_line("alternate calls of the shared and the distinct batch: their min times, the ratios of "
                          "their medians and of their mins (target: <= 1.3x)")
            tr.write_line(f"{'A,B':<6}{'thr':>4}{'shared ms':>11}{'distinct ms':>13}{'median':>8}{'min':>7}")
            for e in _MULTI:
                tr.write_line(f"{_AB[e['storage']]:<6}{e['threads']:>4}"
                              f"{e['paired_shared_min_us'] / 1e3:>11.2f}{e['paired_distinct_min_us'] / 1e3:>13.2f}"
                              f"{e['ratio_paired']:>7.2f}x{e['ratio_paired_min']:>6.2f}x")
        rows = [(b.extra_info, st, nb) for b, st, nb in _ROWS if "overhead_paired" in b.extra_info]
        if not rows:
            return
        tr.section(f"LoRA overhead over the base matmul (cpu: {pq.info()['cpu']})")
        tr.write_line("paired: alternate calls of the base and of the layer with its adapter (pyqkern: a second "
                      "layer on the same packed weight; unfused: the base layer, then the sequence), median "
                      "difference / median base; min: the "
                      "rows' min times; floor: adapter bytes / base weight bytes, the least any implementation adds "
                      "when the base reads its weight at the read ceiling (target: <= 5% at rank 16)")
        tr.write_line(f"{'case':<15}{'impl':<9}{'variant':<12}{'format':<11}{'mode':<15}{'A,B':<6}{'rank':>5}"
                      f"{'thr':>4}{'us':>9}{'min':>8}{'paired':>8}{'floor':>7}")
        for e, st, nb in rows:
            us = e.get("min_us", e.get("min_us_per_layer", float("nan")))
            vs = e.get("overhead_vs_base")
            case = f"decode stack{e['layers']}" if "layers" in e else "decode"
            mode = e["mode"].split("@")[0].replace("-bf16", "").replace("-fp16", "").replace("-f32", "")
            tr.write_line(f"{case:<15}{e.get('impl', 'pyqkern'):<9}{e['variant']:<12}{e['format']:<11}{mode:<15}"
                          f"{_AB[st]:<6}{e['rank']:>5}{e['threads']:>4}{us:>9.1f}"
                          f"{'' if vs is None else f'{100 * vs:.1f}%':>8}{100 * e['overhead_paired']:>7.1f}%"
                          f"{100 * _floor(st, e['rank'], nb):>6.1f}%")


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    pm = request.config.pluginmanager
    if not pm.has_plugin("pyqkern_bench_lora_summary"):
        pm.register(_Summary(), "pyqkern_bench_lora_summary")


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("fmt", ["q4_0", "int4-g128"])
@pytest.mark.parametrize("mode", ["base", "fused", "fused-bf16", "fused-fp16", "unfused"])
def test_decode(benchmark, layers, fmt, r, mode, threads):
    """fused-bf16 / fused-fp16: the adapter kept in bf16 / fp16, as PEFT files ship it (half the
    adapter bytes)."""
    qt = layers[fmt]
    lin = pq.QLinear(qt)
    ad = _adapter(r, r)
    if mode in _STORAGE and mode != "fused":
        ad = LoRA(ad.A, ad.B, alpha=ad.alpha, storage=_STORAGE[mode])
    x = np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)
    y = np.empty((1, N), np.float32)
    A, B = ad.A, ad.B
    if mode == "base":
        fn = lambda: lin(x, out=y)  # noqa: E731
    elif mode in _STORAGE:
        lin.add_adapter("a", ad)
        fn = lambda: lin(x, out=y)  # noqa: E731
    else:
        def fn():
            lin(x, out=y)
            y.__iadd__((x @ A.T) @ B.T * np.float32(ad.scale))
    benchmark.group = f"lora decode {fmt} r{r} t{threads}"
    benchmark.pedantic(fn, rounds=200, iterations=1, warmup_rounds=5)
    key = (fmt, r, threads)
    t = benchmark.stats.stats.min
    if mode == "base":
        _base_min[key] = t
    _info(benchmark, format=fmt, mode=mode, rank=r, threads=threads, shape=(1, K, N), min_us=t * 1e6)
    _ROWS.append((benchmark, _STORAGE.get(mode, "float32"), qt.nbytes))
    if mode != "base":
        base = _base_min.get(key) or _min_time(lambda: pq.QLinear(qt)(x, out=y))
        benchmark.extra_info["overhead_vs_base"] = t / base - 1.0
        # the same, paired: base and this mode called alternately, so drift and the machine's
        # slow/fast phases hit both (the separate rows above are minutes apart in a full run).
        # The base is a second layer on the same QTensor, so both read the same packed weight
        # bytes (two weights alternating read twice the bytes and differ by where they sit), and
        # neither layer's adapters change between calls, as in serving (switching them every
        # call made the layer rebuild its adapter arguments each time)
        lb = pq.QLinear(qt)
        assert lb._packed is lin._packed
        benchmark.extra_info["overhead_paired"] = _paired_overhead(lambda: lb(x, out=y), fn)


_OTHER_VARIANTS = [v for v in pq.variants() if v not in ("ref", pq.info()["active_variant"])]


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", _OTHER_VARIANTS or [pytest.param(None, marks=pytest.mark.skip(
    reason="this CPU runs no variant besides ref and the active one"))])
def test_decode_other_variants(benchmark, layers, variant, storage, threads):
    """Rank 16 on q4_0 with the kernels of a variant this CPU runs but does not pick (avx2, avxvnni
    on an AVX-512 machine: what CPUs without AVX-512 run): pq.matmul(x, qt, lora=ad, isa=v),
    overhead against the same variant's base in alternating calls."""
    qt = layers["q4_0"]
    a = _adapter(16, 16)
    ad = LoRA(a.A, a.B, alpha=a.alpha, storage=storage)
    x = np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)
    y = np.empty((1, N), np.float32)
    fn = lambda: pq.matmul(x, qt, lora=ad, out=y, isa=variant)  # noqa: E731
    benchmark.group = f"lora decode q4_0 r16 t{threads} other variants"
    benchmark.pedantic(fn, rounds=100, iterations=1, warmup_rounds=5)
    _info(benchmark, format="q4_0", mode=f"fused@{variant}", variant=variant, storage=storage, rank=16, threads=threads, shape=(1, K, N),
          min_us=benchmark.stats.stats.min * 1e6)
    _ROWS.append((benchmark, storage, qt.nbytes))
    benchmark.extra_info["overhead_paired"] = _paired_overhead(
        lambda: pq.matmul(x, qt, out=y, isa=variant), fn, pairs=200)


@pytest.mark.parametrize("mode", ["fused", "unfused"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_torch(benchmark, layers, dtype, mode, threads):
    """Rank 16 on q4_0 through pyqkern.torch.QuantLinear (the module in dtype, its adapter frozen,
    as served): fused, the adapter attached to the layer (one call, its kernel operands kept
    between calls); unfused, the adapter as PEFT runs it beside a quantized base (the layer, then
    scale * (x @ A.T) @ B.T in torch). overhead_paired: against a layer without adapters on the
    same qdata tensor, alternating calls."""
    torch = pytest.importorskip("torch")
    import pyqkern.torch as pqt

    tdt = getattr(torch, dtype)
    a = _adapter(16, 16)
    q = pqt.QuantLinear.from_qtensor(layers["q4_0"])
    A, B = torch.from_numpy(a.A.copy()), torch.from_numpy(a.B.copy())
    q.add_adapter("a", A, B, alpha=a.alpha)
    q.to(tdt)
    A, B = A.to(tdt), B.to(tdt)
    # the base: a second layer on q's qdata tensor (one QTensor, one packed copy: the same bytes)
    qb = pqt.QuantLinear.from_qtensor(layers["q4_0"]).to(tdt)
    qb.qdata = q.qdata
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)).to(tdt)
    if mode == "fused":
        def fn():
            return q(x)
    else:
        q.set_adapter([])

        def fn():
            return q(x) + a.scale * ((x @ A.T) @ B.T)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            benchmark.group = f"lora decode q4_0 r16 t{threads} pyqkern.torch"
            benchmark.pedantic(fn, rounds=200, iterations=1, warmup_rounds=5)
            _info(benchmark, impl="torch", format="q4_0", mode=f"{mode}-{'bf16' if dtype == 'bfloat16' else 'f32'}",
                  rank=16, threads=threads, shape=(1, K, N), min_us=benchmark.stats.stats.min * 1e6)
            _ROWS.append((benchmark, dtype, layers["q4_0"].nbytes))
            benchmark.extra_info["overhead_paired"] = _paired_overhead(lambda: qb(x), fn, pairs=20 if QUICK else 400)
    finally:
        torch.set_num_threads(torch_threads)


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("ab", ["f32", "bf16"])
def test_decode_ggml(benchmark, layers, r, ab, threads):
    """llama.cpp's way, same q4_0 bytes: ggml's repacked q4_0 mul_mat plus the adapter as two more
    mul_mat, a scale and an add in the graph (fp32 or bf16 A/B), built from the llama-cpp-python
    sdist (bench/ggml_peer.py; skipped with the reason where it cannot be built).
    overhead_paired: against ggml's own base, alternating calls."""
    from ggml_peer import GgmlUnavailable, MatMul, load

    qt = layers["q4_0"]
    ad = _adapter(r, r)
    x = np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)
    base = None
    try:
        base = MatMul(load(), "q4_0", qt.data, N, K, 1)
        mm = MatMul(load(), "q4_0", qt.data, N, K, 1, lora=(ad.A, ad.B, ad.scale, ab))
    except GgmlUnavailable as e:
        if base is not None:
            base.close()
        pytest.skip(f"llama.cpp's ggml not available: {e}")
    try:
        base.set_x(x)
        mm.set_x(x)
        mm.run(threads)
        ref = pq.matmul(x, qt, lora=ad, compute="float")
        err = float(np.abs(mm.result() - ref).max() / np.abs(ref).max())
        assert err < 0.05, f"ggml's result is off by {err:.3g}"
        benchmark.group = f"lora decode q4_0 r{r} t{threads}"
        benchmark.pedantic(lambda: mm.run(threads), rounds=200, iterations=1, warmup_rounds=5)
        _info(benchmark, impl="ggml", variant="native", format="q4_0", mode=f"base+lora-{ab}", rank=r, threads=threads, shape=(1, K, N),
              min_us=benchmark.stats.stats.min * 1e6)
        _ROWS.append((benchmark, "float32" if ab == "f32" else "bfloat16", qt.nbytes))
        benchmark.extra_info["overhead_paired"] = _paired_overhead(lambda: base.run(threads), lambda: mm.run(threads))
    finally:
        base.close()
        mm.close()


_stack_base: dict = {}


@pytest.mark.parametrize("fmt", ["q4_0", "int4-g128"])
@pytest.mark.parametrize("mode", ["base", "fused", "fused-bf16", "fused-fp16"])
def test_decode_stack(benchmark, fmt, mode, threads):
    """Decode as in a model: 8 different layers (with their own rank-16 adapter) called in turn,
    ~75 MB in all, so weights and adapters come from DRAM each token, not from L3 (quick mode: 2
    layers of 1024x1024, ~1.2 MB, from cache: a smoke run only)."""
    layers_n = 2 if QUICK else 8
    rng = np.random.default_rng(5)
    lins = []
    for i in range(layers_n):
        w = (rng.standard_normal((N, K)) * 0.02).astype(np.float32)
        qt = pq.quantize(w, "q4_0") if fmt == "q4_0" else pq.quantize(w, "int4", group=128)
        lin = pq.QLinear(qt)
        if mode != "base":
            a = _adapter(16, 200 + i)
            lin.add_adapter("a", LoRA(a.A, a.B, alpha=a.alpha, storage=_STORAGE[mode]))
        lins.append(lin)
    x = np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)
    y = np.empty((1, N), np.float32)

    def run():
        for lin in lins:
            lin(x, out=y)

    benchmark.group = f"lora decode stack{layers_n} {fmt} r16 t{threads}"
    benchmark.pedantic(run, rounds=60, iterations=1, warmup_rounds=3)
    t = benchmark.stats.stats.min / layers_n
    _info(benchmark, format=fmt, mode=mode, rank=16, threads=threads, shape=(1, K, N), layers=layers_n, min_us_per_layer=t * 1e6)
    _ROWS.append((benchmark, _STORAGE.get(mode, "float32"), lins[0].weight.nbytes))
    if mode == "base":
        _stack_base[(fmt, threads)] = t
    else:
        if (fmt, threads) in _stack_base:
            benchmark.extra_info["overhead_vs_base"] = t / _stack_base[(fmt, threads)] - 1.0
        bases = [pq.QLinear(lin.weight) for lin in lins]

        def run_base():
            for lin in bases:
                lin(x, out=y)

        benchmark.extra_info["overhead_paired"] = _paired_overhead(run_base, run, pairs=20 if QUICK else 200)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["shared", "distinct"])
def test_multi_adapter_batch(benchmark, layers, case, storage, threads):
    qt = layers["q4_0"]
    lin = pq.QLinear(qt)
    m = 32
    for i in range(m):
        a = _adapter(16, 100 + i)
        lin.add_adapter(f"a{i}", LoRA(a.A, a.B, alpha=a.alpha, storage=storage))
    x = np.random.default_rng(2).standard_normal((m, K)).astype(np.float32)
    y = np.empty((m, N), np.float32)
    ids = np.zeros(m, np.int32) if case == "shared" else np.arange(m, dtype=np.int32)
    benchmark.group = f"lora 32 rows x rank 16 {storage} t{threads}"
    benchmark.pedantic(lambda: lin(x, adapter_ids=ids, out=y), rounds=30, iterations=1, warmup_rounds=2)
    t = benchmark.stats.stats.min
    _info(benchmark, case=case, storage=storage, threads=threads, min_us=t * 1e6)
    if case == "shared":
        _shared_min[(storage, threads)] = t
        return
    if (storage, threads) in _shared_min:
        benchmark.extra_info["ratio_vs_shared"] = t / _shared_min[(storage, threads)]
    shared = np.zeros(m, np.int32)
    med, mn, t_shared, t_distinct = _paired_ratios(lambda: lin(x, adapter_ids=shared, out=y), lambda: lin(x, adapter_ids=ids, out=y),
                             pairs=30 if QUICK else 100)
    benchmark.extra_info.update(ratio_paired=med, ratio_paired_min=mn, paired_shared_min_us=t_shared * 1e6,
                                paired_distinct_min_us=t_distinct * 1e6)
    _MULTI.append(benchmark.extra_info)


def test_backward_step(benchmark, layers):
    lora = pytest.importorskip("pyqkern.lora")
    if not hasattr(lora, "backward"):
        pytest.skip("pyqkern.lora.backward not available")
    qt = layers["q4_0"]
    ad = _adapter(16, 7)
    rng = np.random.default_rng(3)
    m = 128 if QUICK else 512
    x = rng.standard_normal((m, K)).astype(np.float32)
    dy = rng.standard_normal((m, N)).astype(np.float32)
    benchmark.group = "lora backward"
    benchmark.pedantic(lambda: lora.backward(x, dy, qt, ad), rounds=5, iterations=1, warmup_rounds=1)
    t = benchmark.stats.stats.min

    def numpy_way():
        W = pq.dequantize(qt)
        tt = x @ ad.A.T
        dt = np.float32(ad.scale) * (dy @ ad.B)
        return dy @ W + dt @ ad.A, dt.T @ x, np.float32(ad.scale) * (dy.T @ tt)

    t_np = _min_time(numpy_way, reps=5)
    _info(benchmark, m=m, min_us=t * 1e6, numpy_dequant_then_matmul_us=t_np * 1e6, ratio_vs_numpy=t_np / t)
