"""quantize / dequantize throughput per format: every runnable native variant (1 and 2 threads),
the numba backend, and the peers: the gguf package's numpy implementation (its quantize for
q4_0 / q4_1 / q8_0, its dequantize for every ggml type) and bitsandbytes' CPU path for nf4 / fp4
(quantize_4bit / dequantize_4bit, when bitsandbytes is installed). int2 / int3 have no peer.

    pytest bench/bench_quantize.py --benchmark-only [--benchmark-columns=min,median]

GB/s is float32 weight bytes per second (N*K*4 / time) for both directions.
"""
from __future__ import annotations

import numpy as np
import pytest

import pyqkern as pq

FORMATS = [("q4_0", {}), ("q4_1", {}), ("q8_0", {}), ("q4_k", {}), ("q6_k", {}), ("iq4_nl", {}),
           ("nf4", {}), ("nf4", {"double_quant": True}), ("fp4", {}), ("int4", {}), ("int4", {"sym": True}),
           ("int3", {}), ("int2", {}), ("int8", {})]
FORMAT_IDS = [f + "".join(f"-{k}" if v is True else f"-{k}{v}" for k, v in o.items()) for f, o in FORMATS]
GGML = {"q4_0", "q4_1", "q8_0", "q4_k", "q6_k", "iq4_nl"}
GGUF_QUANTIZE = ["q4_0", "q4_1", "q8_0"]
VARIANTS = pq.variants()
THREADS = [pytest.param(1, id="t1"), pytest.param(2, id="t2")]


def _label(fmt, opts):
    return fmt + "".join(f"+{k}" if v is True else f"+{k}={v}" for k, v in opts.items())


def _gguf():
    quants = pytest.importorskip("gguf.quants")
    from gguf.constants import GGMLQuantizationType as T

    types = {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q8_0": T.Q8_0, "q4_k": T.Q4_K, "q6_k": T.Q6_K, "iq4_nl": T.IQ4_NL}
    return quants, types


def _random_ggml_blocks(fmt, shape):
    """Valid ggml bytes (finite fp16 scales) when no quantizer for ``fmt`` is available yet."""
    quants, types = _gguf()
    from gguf.constants import GGML_QUANT_SIZES

    bs, ts = GGML_QUANT_SIZES[types[fmt]]
    n, k = shape
    r = np.random.default_rng(1)
    buf = r.integers(0, 256, size=(n * k // bs, ts), dtype=np.uint8)
    offs = {"q4_1": (0, 2), "q4_k": (0, 2), "q6_k": (208,)}.get(fmt, (0,))
    for off in offs:   # small positive fp16 scales
        buf[:, off:off + 2] = (r.integers(0x1000, 0x2400, size=buf.shape[0]).astype(np.uint16)
                               .view(np.uint8).reshape(-1, 2))
    return pq.QTensor.from_bytes(fmt, shape, buf.reshape(-1))


@pytest.fixture(scope="session")
def qtensors(weights):
    """format label -> QTensor of the benchmark weights (quantized once, natively if possible)."""
    cache = {}

    def get(fmt, opts):
        key = _label(fmt, opts)
        if key not in cache:
            qt = None
            for backend in ("native", "reference"):
                try:
                    qt = pq.quantize(weights, fmt, backend=backend, **opts)
                    break
                except NotImplementedError:
                    continue
            if qt is None:
                if fmt not in GGML:
                    pytest.skip(f"{key}: no quantizer available to make the input")
                qt = _random_ggml_blocks(fmt, weights.shape)
            cache[key] = qt
        return cache[key]

    return get


# ---------------------------------------------------------------- native variants
@pytest.mark.parametrize("native_threads", THREADS, indirect=True)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt,opts", FORMATS, ids=FORMAT_IDS)
def test_quantize_native(measure, weights, fmt, opts, variant, native_threads):
    fn = lambda: pq.quantize(weights, fmt, isa=variant, **opts)   # noqa: E731
    measure(fn, op="quantize", fmt=_label(fmt, opts), impl="native", variant=variant, threads=native_threads)


@pytest.mark.parametrize("native_threads", THREADS, indirect=True)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt,opts", FORMATS, ids=FORMAT_IDS)
def test_dequantize_native(measure, qtensors, fmt, opts, variant, native_threads):
    qt = qtensors(fmt, opts)
    fn = lambda: pq.dequantize(qt, isa=variant)   # noqa: E731
    measure(fn, op="dequantize", fmt=_label(fmt, opts), impl="native", variant=variant, threads=native_threads)


# ---------------------------------------------------------------- numba backend
def _numba_threads():
    try:
        import numba

        return numba.get_num_threads()
    except ImportError:
        pytest.skip("numba is not installed")


@pytest.mark.parametrize("fmt,opts", FORMATS, ids=FORMAT_IDS)
def test_quantize_numba(measure, weights, fmt, opts):
    threads = _numba_threads()
    fn = lambda: pq.quantize(weights, fmt, backend="numba", **opts)   # noqa: E731
    measure(fn, op="quantize", fmt=_label(fmt, opts), impl="numba", variant="numba", threads=threads)


@pytest.mark.parametrize("fmt,opts", FORMATS, ids=FORMAT_IDS)
def test_dequantize_numba(measure, qtensors, fmt, opts):
    threads = _numba_threads()
    qt = qtensors(fmt, opts)
    fn = lambda: pq.dequantize(qt, backend="numba")   # noqa: E731
    measure(fn, op="dequantize", fmt=_label(fmt, opts), impl="numba", variant="numba", threads=threads)


# ---------------------------------------------------------------- peer: gguf (numpy)
@pytest.mark.parametrize("fmt", GGUF_QUANTIZE)
def test_quantize_gguf(measure, weights, fmt):
    quants, types = _gguf()
    fn = lambda: quants.quantize(weights, types[fmt])   # noqa: E731
    measure(fn, op="quantize", fmt=fmt, impl="gguf-numpy", variant="numpy", threads=1)


@pytest.mark.parametrize("fmt", sorted(GGML))
def test_dequantize_gguf(measure, qtensors, fmt):
    quants, types = _gguf()
    qt = qtensors(fmt, {})
    blocks = qt.data.reshape(qt.shape[0], -1)
    fn = lambda: quants.dequantize(blocks, types[fmt])   # noqa: E731
    measure(fn, op="dequantize", fmt=fmt, impl="gguf-numpy", variant="numpy", threads=1)


# ---------------------------------------------------------------- peer: bitsandbytes (torch, CPU)
def _bnb():
    try:
        import torch
        import bitsandbytes.functional as F
    except ImportError as e:
        pytest.skip(f"bitsandbytes is not installed ({e})")
    return torch, F


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_quantize_bnb(measure, weights, fmt):
    torch, F = _bnb()
    w = torch.from_numpy(weights)
    fn = lambda: F.quantize_4bit(w, blocksize=64, quant_type=fmt)   # noqa: E731
    measure(fn, op="quantize", fmt=fmt, impl="bitsandbytes", variant="torch-cpu", threads=torch.get_num_threads())


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_dequantize_bnb(measure, weights, fmt):
    torch, F = _bnb()
    q, state = F.quantize_4bit(torch.from_numpy(weights), blocksize=64, quant_type=fmt)
    fn = lambda: F.dequantize_4bit(q, state)   # noqa: E731
    measure(fn, op="dequantize", fmt=fmt, impl="bitsandbytes", variant="torch-cpu", threads=torch.get_num_threads())
