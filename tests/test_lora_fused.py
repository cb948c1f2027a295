"""Fused LoRA / DoRA forward: pq.matmul(..., lora=, adapter_ids=) and QLinear adapters against the
unfused float reference  x @ W.T + scale * (x @ A.T) @ B.T  (DoRA: PEFT's definition, float64).

The base part keeps its own contract (int8: bit-identical spec; float: fp32 bound); the adapter
part is fp32, so results are compared within
    4e-6 * ((|x| @ |W|.T) + scale * (|x| @ |A|.T) @ |B|.T + |bias|) * sqrt(K)
of the unfused reference computed the same way (all native variants, both compute modes).
"""
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

import pyqkern as pq
from pyqkern._lora import LoRA

VARIANTS = pq.variants()
FORMATS = ["q4_0", "q4_1", "q8_0", "q4_k", "q6_k", "iq4_nl", "nf4", "int4", "int8", "int2", "int3", "fp4"]


def make(fmt, n, k, rng):
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    return pq.quantize(w, fmt)


def adapter(n, k, r, rng, dora=False, rslora=False):
    A = (rng.standard_normal((r, k)) * 0.05).astype(np.float32)
    B = (rng.standard_normal((n, r)) * 0.05).astype(np.float32)
    mag = (np.abs(rng.standard_normal(n)) + 0.5).astype(np.float32) if dora else None
    return LoRA(A, B, alpha=2 * r, rslora=rslora, magnitude=mag)


def bound(x, qt, ads, bias):
    wd = np.abs(pq.dequantize(qt)).astype(np.float64)
    ax = np.abs(x).astype(np.float64)
    tot = ax @ wd.T
    for ad in ads:
        tot = tot + abs(ad.scale) * (ax @ np.abs(ad.A).T.astype(np.float64)) @ np.abs(ad.B).T.astype(np.float64)
    if bias is not None:
        tot = tot + np.abs(bias)
    return 4e-6 * np.sqrt(x.shape[1]) * tot + 1e-7


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("compute", ["int8", "float"])
@settings(max_examples=4)
@given(m=st.sampled_from([1, 3, 8, 17]), n=st.sampled_from([5, 16, 33]), r=st.sampled_from([1, 4, 16]),
       use_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fused_single_adapter(fmt, compute, m, n, r, use_bias, seed):
    rng = np.random.default_rng(seed)
    k = 256 if fmt in ("q4_k", "q6_k", "int2", "int3", "int4") else 64
    qt = make(fmt, n, k, rng)
    ad = adapter(n, k, r, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if use_bias else None
    ref = pq.matmul(x, qt, bias, lora=ad, compute=compute, backend="reference")
    lim = bound(x, qt, [ad], bias)
    for v in VARIANTS:
        y = pq.matmul(x, qt, bias, lora=ad, compute=compute, isa=v)
        assert (np.abs(y - ref) <= lim).all(), (v, np.abs(y - ref).max())
    # the base part alone is unchanged by the adapter machinery
    base = pq.matmul(x, qt, bias, compute=compute)
    t = (x @ ad.A.T) @ ad.B.T * np.float32(ad.scale)
    assert (np.abs(pq.matmul(x, qt, bias, lora=ad, compute=compute) - (base + t)) <= lim).all()


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=3, deadline=None)
@given(m=st.sampled_from([1, 2, 3, 9, 12, 33]), n=st.sampled_from([5, 16, 48]), seed=st.integers(0, 2**31 - 1))
def test_multi_adapter_batch_mixed_ranks_and_none_rows(fmt, m, n, seed):
    """Every format: adapters of ranks 1, 8, 16 and 3 in one batch, rows with -1, against the
    reference; -1 rows equal the base; each row equals itself run alone."""
    rng = np.random.default_rng(seed)
    k = 256 if fmt in ("q4_k", "q6_k", "int2", "int3", "int4") else 128
    qt = make(fmt, n, k, rng)
    ads = [adapter(n, k, r, rng) for r in (1, 8, 16, 3)]
    ids = rng.integers(-1, 4, m).astype(np.int32)
    ids[0] = -1 if m > 1 else ids[0]
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    for compute in ("int8", "float"):
        ref = pq.matmul(x, qt, bias, lora=ads, adapter_ids=ids, compute=compute, backend="reference")
        lim = bound(x, qt, ads, bias)
        for v in VARIANTS:
            y = pq.matmul(x, qt, bias, lora=ads, adapter_ids=ids, compute=compute, isa=v)
            assert (np.abs(y - ref) <= lim).all()
            # rows with -1 get exactly the base result of the same variant
            base = pq.matmul(x, qt, bias, compute=compute, isa=v)
            assert np.array_equal(y[ids == -1], base[ids == -1])
        # each row equals running that row alone with its own adapter (bit for bit with int8; for
        # float a lone row may take the decode kernel: within the bound)
        full = pq.matmul(x, qt, bias, lora=ads, adapter_ids=ids, compute=compute)
        for i in range(m):
            one = pq.matmul(x[i:i + 1], qt, bias, lora=ads[ids[i]] if ids[i] >= 0 else None, compute=compute)
            if compute == "int8":
                assert np.array_equal(one, full[i:i + 1])
            else:
                assert (np.abs(one - ref[i:i + 1]) <= lim[i:i + 1]).all()


def test_weighted_blend_equals_sum_of_scaled_terms():
    rng = np.random.default_rng(2)
    n, k = 40, 96
    qt = make("q8_0", n, k, rng)
    a, b = adapter(n, k, 4, rng), adapter(n, k, 8, rng, rslora=True)
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = pq.matmul(x, qt, lora=[a.scaled(0.7), b.scaled(0.3)], compute="float")
    want = (x.astype(np.float64) @ pq.dequantize(qt).T.astype(np.float64)
            + 0.7 * a.scale * (x @ a.A.T) @ a.B.T + 0.3 * b.scale * (x @ b.A.T) @ b.B.T)
    assert np.allclose(y, want, rtol=1e-5, atol=1e-5)
    assert b.scale == pytest.approx(b.alpha / np.sqrt(8))


@pytest.mark.parametrize("compute", ["int8", "float"])
def test_dora_matches_peft_definition(compute):
    rng = np.random.default_rng(3)
    n, k, r = 24, 64, 4
    qt = make("nf4", n, k, rng)
    ad = adapter(n, k, r, rng, dora=True)
    x = rng.standard_normal((5, k)).astype(np.float64)
    bias = rng.standard_normal(n).astype(np.float32)
    W = pq.dequantize(qt).astype(np.float64)
    delta = ad.scale * ad.B.astype(np.float64) @ ad.A.astype(np.float64)
    norm = np.linalg.norm(W + delta, axis=1)
    want = (ad.magnitude / norm) * (x @ W.T + x @ delta.T) + bias  # PEFT: bias after the rescale
    y = pq.matmul(x.astype(np.float32), qt, bias, lora=ad, compute=compute)
    tol = 2e-2 if compute == "int8" else 1e-4  # int8: activation rounding on the base part
    assert np.abs(y - want).max() <= tol * np.abs(want).max()
    with pytest.raises(ValueError, match="DoRA"):
        pq.matmul(x.astype(np.float32), qt, lora=[ad, adapter(n, k, 2, rng)])
    with pytest.raises(ValueError, match="DoRA"):
        ad.scaled(0.5)


def test_qlinear_adapters_api():
    rng = np.random.default_rng(4)
    n, k = 32, 64
    qt = make("q4_0", n, k, rng)
    bias = rng.standard_normal(n).astype(np.float32)
    lin = pq.QLinear(qt, bias)
    x = rng.standard_normal((4, k)).astype(np.float32)
    base = lin(x)
    a, b = adapter(n, k, 4, rng), adapter(n, k, 2, rng)
    lin.add_adapter("a", a)
    lin.add_adapter("b", b)
    assert lin.adapter_names == ["a", "b"]
    both = lin(x)
    assert np.array_equal(both, pq.matmul(x, qt, bias, lora=[a, b]))
    lin.set_adapter("a")
    assert np.array_equal(lin(x), pq.matmul(x, qt, bias, lora=a))
    ids = [0, 1, -1, 0]
    by_int = lin(x, adapter_ids=ids)
    by_name = lin(x, adapter_ids=["a", "b", None, "a"])
    assert np.array_equal(by_int, by_name)
    assert np.array_equal(by_int[2], base[2])
    lin.set_adapter([])
    assert np.array_equal(lin(x), base)
    lin.remove_adapter("a")
    assert lin.adapter_names == ["b"]
    with pytest.raises(KeyError):
        lin.remove_adapter("a")
    with pytest.raises(ValueError, match="already"):
        lin.add_adapter("b", b)
    with pytest.raises(KeyError, match="zzz"):
        lin(x, adapter_ids=["zzz"] * 4)
    assert np.array_equal(lin(x, adapter_ids=[0, None, -1, None]), lin(x, adapter_ids=["b", None, -1, None]))
    for ids in ([True, None, -1, 0], [np.bool_(False), "b", None, 0]):  # a bool array is refused: so are bools
        with pytest.raises(TypeError, match="not bools"):
            lin(x, adapter_ids=ids)


def test_qlinear_decode_path_follows_adapter_changes():
    """The one-row float32 path keeps its adapter's native arguments between calls: every change
    of the active adapters (set, remove, add, a copy's own registry, a pickled layer) is seen by
    the next call."""
    import copy
    import pickle

    rng = np.random.default_rng(42)
    n, k = 48, 128
    qt = make("q4_0", n, k, rng)
    a, b, d = adapter(n, k, 4, rng), adapter(n, k, 2, rng), adapter(n, k, 8, rng)
    x = rng.standard_normal((1, k)).astype(np.float32)
    lin = pq.QLinear(qt)
    lin.add_adapter("a", a)
    lin.add_adapter("b", b, active=False)
    want = {nm: pq.matmul(x, qt, lora=ad) for nm, ad in (("a", a), ("b", b), ("d", d))}
    assert np.array_equal(lin(x), want["a"])
    lin.set_adapter("b")
    assert np.array_equal(lin(x), want["b"])
    lin.set_adapter([])
    assert np.array_equal(lin(x), pq.matmul(x, qt))
    lin.set_adapter("a")
    assert np.array_equal(lin(x), want["a"])
    c = copy.copy(lin)
    c.remove_adapter("a")
    c.add_adapter("d", d)
    assert np.array_equal(c(x), want["d"]) and np.array_equal(lin(x), want["a"])
    lin.remove_adapter("a")
    assert np.array_equal(lin(x), pq.matmul(x, qt))
    lin.set_adapter("b")
    assert np.array_equal(pickle.loads(pickle.dumps(lin))(x), want["b"])


def test_qlinear_copy_compute_switch_and_fixed_weight():
    """A copy has its own adapter registry; switching compute repacks or drops the packed copy and
    the decode path follows; the weight cannot be swapped under the packed copy."""
    import copy

    rng = np.random.default_rng(41)
    n, k = 48, 128
    qt = make("q4_0", n, k, rng)
    a, b = adapter(n, k, 4, rng), adapter(n, k, 2, rng)
    x = rng.standard_normal((1, k)).astype(np.float32)
    lin = pq.QLinear(qt)
    lin.add_adapter("a", a)
    c = copy.copy(lin)
    c.add_adapter("b", b)
    c.remove_adapter("a")
    assert lin.adapter_names == ["a"] and c.adapter_names == ["b"]
    assert np.array_equal(lin(x), pq.matmul(x, qt, lora=a))
    assert np.array_equal(c(x), pq.matmul(x, qt, lora=b))
    assert lin.compute == "int8" and lin.packed_nbytes > 0
    lin.compute = "float"
    assert lin.compute == "float" and lin._packed is None
    assert np.array_equal(lin(x), pq.matmul(x, qt, lora=a, compute="float"))
    lin.compute = "int8"
    assert np.array_equal(lin(x), pq.matmul(x, qt, lora=a, compute="int8"))
    with pytest.raises(ValueError):
        lin.compute = "fast"
    with pytest.raises(AttributeError, match="new QLinear"):
        lin.weight = qt.with_perm(np.arange(k)[::-1].copy())


def test_bad_adapter_input():
    rng = np.random.default_rng(5)
    n, k = 16, 64
    qt = make("q4_0", n, k, rng)
    x = rng.standard_normal((3, k)).astype(np.float32)
    with pytest.raises(ValueError, match="rank mismatch"):
        LoRA(np.zeros((4, k), np.float32), np.zeros((n, 5), np.float32))
    with pytest.raises(ValueError, match="adapter is for"):
        pq.matmul(x, qt, lora=adapter(n + 1, k, 2, rng))
    with pytest.raises(ValueError, match="out of range"):
        pq.matmul(x, qt, lora=[adapter(n, k, 2, rng)], adapter_ids=[0, 1, 0])
    with pytest.raises(ValueError, match="entries"):
        pq.matmul(x, qt, lora=[adapter(n, k, 2, rng)], adapter_ids=[0, 0])
    with pytest.raises(TypeError):
        pq.matmul(x, qt, lora=[adapter(n, k, 2, rng)], adapter_ids=[0.0, 0.0, 0.0])
    with pytest.raises(TypeError):
        pq.matmul(x, qt, lora="nope")
    with pytest.raises(ValueError, match="NaN"):
        LoRA(np.full((2, k), np.nan, np.float32), np.zeros((n, 2), np.float32))
    with pytest.raises(TypeError):
        LoRA([[1.0]], [[1.0]])
    with pytest.raises(ValueError, match="magnitude"):
        LoRA(np.ones((2, k), np.float32), np.ones((n, 2), np.float32), magnitude=np.full(n, np.inf, np.float32))
    # float16 / bfloat16 adapters are accepted (kept as float32)
    import ml_dtypes
    a16 = LoRA(np.ones((2, k), np.float16), np.ones((n, 2), ml_dtypes.bfloat16))
    assert a16.A.dtype == np.float32 and a16.B.dtype == np.float32
    # alpha and blend weights are real numbers, not strings or bools that float() would take
    ad = adapter(n, k, 2, rng)
    for bad in ("16", True, np.bool_(False), [1.0, 2.0]):
        with pytest.raises(TypeError, match="alpha must be a real number"):
            LoRA(ad.A, ad.B, alpha=bad)
        with pytest.raises(TypeError, match="blend weight must be a real number"):
            ad.scaled(bad)
    with pytest.raises(ValueError, match="finite"):
        LoRA(ad.A, ad.B, alpha=np.inf)
    assert LoRA(ad.A, ad.B, alpha=np.float32(4)).scale == 2.0 and ad.scaled(np.float64(0.5)).alpha == ad.alpha / 2
    # a dict of adapters is not silently iterated by its keys
    with pytest.raises(TypeError, match="dict"):
        pq.matmul(x, qt, lora={"a": ad})
    # from a review: an empty batch with ids [] (float64 to NumPy) runs; a one-element alpha array
    # is a number; a torch magnitude is 1-D as a NumPy one must be; uint16 NaN patterns are named
    lin = pq.QLinear(qt)
    lin.add_adapter("a", ad)
    for f in (lambda x0: pq.matmul(x0, qt, lora=[ad], adapter_ids=[]), lambda x0: lin(x0, adapter_ids=[])):
        assert f(np.zeros((0, k), np.float32)).shape == (0, n)
    assert LoRA(ad.A, ad.B, alpha=np.array([4.0])).scale == 2.0
    torch = pytest.importorskip("torch")
    for mag in (torch.ones(4, 4), torch.ones(1, n), np.ones((1, n), np.float32)):
        with pytest.raises(ValueError, match=r"magnitude must be 1-D, got shape \((4, 4|1, 16)\)"):
            LoRA(ad.A, ad.B, magnitude=mag)
    with pytest.raises(ValueError, match=r"^A must be 2-D, got shape \(64,\)$"):
        LoRA(torch.ones(k), torch.ones(n, 2))
    with pytest.raises(ValueError, match="uint16 arrays are read as bfloat16 bit patterns"):
        LoRA(np.full((2, k), 0x7FC0, np.uint16), np.zeros((n, 2), np.uint16))


def test_lora_is_immutable():
    """alpha / scale / arrays cannot be reassigned: a new scale would miss the cached DoRA norms,
    and save_peft_adapter writes alpha (review: ad.alpha = 64 changed nothing in matmul but the
    saved file; ad.scale on a DoRA adapter gave 0.52 relative error)."""
    rng = np.random.default_rng(8)
    n, k = 32, 64
    qt = make("q4_0", n, k, rng)
    ad = LoRA(adapter(n, k, 4, rng).A, adapter(n, k, 4, rng).B, alpha=8,
              magnitude=rng.random(n).astype(np.float32) + 0.5)
    x = rng.standard_normal((2, k)).astype(np.float32)
    before = pq.matmul(x, qt, lora=ad, compute="float")
    for name, value in (("alpha", 64.0), ("scale", 3.0), ("rank", 2), ("A", ad.A * 2), ("magnitude", None),
                        ("_dora_cache", {}), ("new_attribute", 1)):
        with pytest.raises(AttributeError, match="immutable"):
            setattr(ad, name, value)
    with pytest.raises(AttributeError, match="immutable"):
        del ad.alpha
    assert ad.alpha == 8.0 and ad.scale == 2.0
    assert np.array_equal(pq.matmul(x, qt, lora=ad, compute="float"), before)
    # blends and colocated adapters are still built (through the instance dict)
    plain = adapter(n, k, 4, rng)
    half = plain.scaled(0.5)
    assert half.scale == plain.scale / 2 and plain.scale == 2.0
    with pytest.raises(AttributeError, match="immutable"):
        half.scale = 1.0
    import pickle
    back = pickle.loads(pickle.dumps(half))
    with pytest.raises(AttributeError, match="immutable"):
        back.alpha = 1.0
    assert np.array_equal(pq.matmul(x, qt, lora=back), pq.matmul(x, qt, lora=half))


def test_set_adapter_refuses_summed_dora_and_takes_name_arrays():
    rng = np.random.default_rng(9)
    n, k = 32, 64
    qt = make("q4_0", n, k, rng)
    lin = pq.QLinear(qt)
    plain = adapter(n, k, 4, rng)
    dora = LoRA(plain.A, plain.B, magnitude=rng.random(n).astype(np.float32) + 0.5)
    lin.add_adapter("lora", plain)
    # attaching it active beside "lora" would sum them: refused when added, not at the next call
    with pytest.raises(ValueError, match="active=False"):
        lin.add_adapter("dora", dora)
    assert lin.adapter_names == ["lora"]
    x = rng.standard_normal((3, k)).astype(np.float32)
    assert np.array_equal(lin(x), pq.matmul(x, qt, lora=plain))
    lin.add_adapter("dora", dora, active=False)
    assert np.array_equal(lin(x), pq.matmul(x, qt, lora=plain))  # still "lora" alone
    with pytest.raises(ValueError, match="DoRA adapter cannot be summed"):
        lin.set_adapter(["lora", "dora"])
    lin.set_adapter("dora")
    assert np.array_equal(lin(x), pq.matmul(x, qt, lora=dora))
    # adapter_ids as a NumPy array of names works like the list
    names = np.array(["dora", "lora", "lora"])
    assert np.array_equal(lin(x, adapter_ids=names), lin(x, adapter_ids=["dora", "lora", "lora"]))


def test_fused_lora_thread_count_independent():
    rng = np.random.default_rng(6)
    qt = make("q4_0", 300, 512, rng)
    ads = [adapter(300, 512, r, rng) for r in (8, 16)]
    x = rng.standard_normal((20, 512)).astype(np.float32)
    ids = (np.arange(20) % 3 - 1).astype(np.int32)
    before = pq.get_num_threads()
    try:
        outs = []
        for th in (1, 2, 3):
            pq.set_num_threads(th)
            outs.append(pq.matmul(x, qt, lora=ads, adapter_ids=ids))
        assert all(np.array_equal(o, outs[0]) for o in outs)
    finally:
        pq.set_num_threads(before)


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
@pytest.mark.parametrize("n,k,r,m", [(77, 128, 16, 1), (64, 256, 6, 3), (133, 96, 18, 2), (40, 128, 1, 5),
                                     (50, 64, 64, 8), (33, 32, 3, 9)])
def test_16bit_storage_same_bits_as_float32(storage, n, k, r, m):
    """Values a 16-bit dtype holds give the same result bits kept in it as kept in float32, on
    every variant and both computes (the kernels widen exactly and sum in the same order):
    pyqkern.torch keeps a frozen bf16 / fp16 adapter in 16 bits on that promise."""
    import ml_dtypes

    rng = np.random.default_rng(n * 1000 + r)
    dt = np.float16 if storage == "float16" else ml_dtypes.bfloat16
    qt = make("q4_0", n, k, rng)
    A = (rng.standard_normal((r, k)) * 0.1).astype(dt).astype(np.float32)
    B = (rng.standard_normal((n, r)) * 0.1).astype(dt).astype(np.float32)
    a32, a16 = (LoRA(A, B, alpha=1.7 * r, storage=st) for st in ("float32", storage))
    x = rng.standard_normal((m, k)).astype(np.float32)
    for compute in ("int8", "float"):
        for v in VARIANTS:
            assert np.array_equal(pq.matmul(x, qt, lora=a16, compute=compute, isa=v),
                                  pq.matmul(x, qt, lora=a32, compute=compute, isa=v)), (compute, v)


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
@pytest.mark.parametrize("compute", ["int8", "float"])
def test_16bit_adapter_storage(storage, compute):
    """Adapters kept in fp16 / bf16 (as PEFT files ship them): the kernels widen exactly, so the
    fused result matches the unfused reference built from the same (widened) A and B."""
    import ml_dtypes

    rng = np.random.default_rng(7)
    n, k, r = 40, 128, 8
    qt = make("q4_0", n, k, rng)
    A32 = (rng.standard_normal((r, k)) * 0.05).astype(np.float32)
    B32 = (rng.standard_normal((n, r)) * 0.05).astype(np.float32)
    dt = np.float16 if storage == "float16" else ml_dtypes.bfloat16
    ad = LoRA(A32.astype(dt), B32.astype(dt), alpha=16)  # storage="auto" keeps the input dtype
    assert ad.storage == storage
    assert np.array_equal(ad.A, A32.astype(dt).astype(np.float32))
    forced = LoRA(A32, B32, alpha=16, storage=storage)  # float32 input, rounded once on request
    assert forced.storage == storage and np.array_equal(forced.A, ad.A) and np.array_equal(forced.B, ad.B)
    x = rng.standard_normal((5, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    ids = np.array([0, -1, 1, 1, 0], np.int32)
    other = adapter(n, k, 3, rng)  # a float32 adapter in the same batch
    ref = pq.matmul(x, qt, bias, lora=[ad, other], adapter_ids=ids, compute=compute, backend="reference")
    lim = bound(x, qt, [ad, other], bias)
    for v in VARIANTS:
        y = pq.matmul(x, qt, bias, lora=[ad, other], adapter_ids=ids, compute=compute, isa=v)
        assert (np.abs(y - ref) <= lim).all(), v
    with pytest.raises(ValueError, match="storage"):
        LoRA(A32, B32, storage="int8")
    with pytest.raises(ValueError, match="overflows"):
        LoRA(np.full((2, k), 1e6, np.float32), np.ones((n, 2), np.float32), storage="float16")


def test_non_finite_scale_is_rejected():
    rng = np.random.default_rng(8)
    n, k = 16, 64
    with pytest.raises(ValueError, match="alpha"):
        LoRA(np.ones((2, k), np.float32), np.ones((n, 2), np.float32), alpha=float("nan"))
    ad = adapter(n, k, 2, rng)
    with pytest.raises(ValueError, match="finite"):
        ad.scaled(float("inf"))
    # the C ABI refuses it too (a caller that builds pqk_lora itself)
    from pyqkern import _native
    qt = make("q4_0", n, k, rng)
    x = rng.standard_normal((1, k)).astype(np.float32)
    y = np.empty((1, n), np.float32)
    bad = [(ad._native[0], ad._native[1], float("nan"), None, ad._native[2])]
    q, s, z = qt.sections()
    with pytest.raises(ValueError, match="scale"):
        _native.matmul_float(-1, 0, np.ascontiguousarray(q), None, None, n, k, 0, 0, x, None, y, bad, None)


# ---------------------------------------------------------------- Numba backend: fused forward
@pytest.mark.parametrize("fmt", FORMATS)
def test_numba_fused_single_and_multi(fmt):
    rng = np.random.default_rng(FORMATS.index(fmt))
    n, k, m = 37, 256, 9
    qt = make(fmt, n, k, rng)
    ads = [adapter(n, k, r, rng) for r in (1, 8, 16)]
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    ids = np.array([0, 1, 2, -1, 2, 1, 0, -1, 2], np.int32)
    for lora, aid in ((ads[1], None), (ads, None), (ads, ids)):
        ref = pq.matmul(x, qt, bias, lora=lora, adapter_ids=aid, compute="float", backend="reference")
        y = pq.matmul(x, qt, bias, lora=lora, adapter_ids=aid, backend="numba")
        lim = bound(x, qt, lora if isinstance(lora, list) else [lora], bias)
        assert (np.abs(y - ref) <= lim).all(), np.abs(y - ref).max()
    # rows without an adapter are exactly the numba base product
    y = pq.matmul(x, qt, bias, lora=ads, adapter_ids=ids, backend="numba")
    assert np.array_equal(y[ids == -1], pq.matmul(x, qt, bias, backend="numba")[ids == -1])


def test_numba_fused_dora_and_perm():
    rng = np.random.default_rng(11)
    n, k, r = 24, 128, 4
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    perm = rng.permutation(k)
    qt = pq.quantize(np.ascontiguousarray(w[:, perm]), "int4", group=64).with_perm(perm)
    x = rng.standard_normal((4, k)).astype(np.float32)
    for ad in (adapter(n, k, r, rng, dora=True), adapter(n, k, r, rng)):
        ref = pq.matmul(x, qt, lora=ad, compute="float", backend="reference")
        y = pq.matmul(x, qt, lora=ad, backend="numba")
        assert (np.abs(y - ref) <= bound(x, qt, [ad], None)).all()


@settings(max_examples=60, deadline=None)
# the multi-tile paths with each B dtype (16-bit ranks % 4 == 2 end on an extra pair)
@example(r=6, n=37, m=1, storage="bfloat16", mode="single", use_bias=False, seed=0)
@example(r=18, n=133, m=2, storage="float16", mode="sum", use_bias=True, seed=1)
@example(r=16, n=64, m=1, storage="float32", mode="dora", use_bias=False, seed=2)
@given(r=st.sampled_from([1, 2, 3, 6, 16, 18, 64, 130]), n=st.sampled_from([16, 37, 64, 133]),
       m=st.sampled_from([1, 2, 5]), storage=st.sampled_from(["float32", "float16", "bfloat16"]),
       mode=st.sampled_from(["single", "sum", "rows", "dora"]), use_bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_expansion_bit_identical_across_variants(r, n, m, storage, mode, use_bias, seed):
    """The expansion is specified exactly (rank r into FMA chain r % 4, (c0 + c1) + (c2 + c3),
    scale, DoRA factor, bias), so with a shrink that is exact in any summation order (each row of
    A one nonzero +-2^e: t[r] = +-2^e * x[j], a full-mantissa value, so the products and chain
    sums of 16-bit B round and a changed order shows) every variant returns the same bits, including the SIMD
    fast paths for full tiles (two at a time) and even ranks and the generic path for tails and
    odd ranks; at 1 thread the decode expansion covers all tiles in one call, at 2 one call per
    chunk of tiles."""
    rng = np.random.default_rng(seed)
    k = 64
    qt = make("q4_0", n, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)

    def ad(rank, dora=False):
        A = np.zeros((rank, k), np.float32)
        A[np.arange(rank), rng.integers(0, k, rank)] = (rng.choice([-1, 1], rank)
                                                        * 2.0 ** rng.integers(-3, 2, rank))
        B = (rng.standard_normal((n, rank)) * 0.05).astype(np.float32)
        mag = (np.abs(rng.standard_normal(n)) + 0.5).astype(np.float32) if dora else None
        return LoRA(A, B, alpha=1.7 * rank, magnitude=mag, storage=storage)

    bias = rng.standard_normal(n).astype(np.float32) if use_bias else None
    ids = None
    if mode == "single":
        lora = ad(r)
    elif mode == "dora":
        lora = ad(r, dora=True)
    elif mode == "sum":
        lora = [ad(r), ad(max(1, r // 2 + 1))]
    else:
        lora = [ad(r), ad(max(1, r - 1))]
        ids = rng.integers(-1, 2, m).astype(np.int32)
    before = pq.get_num_threads()
    try:
        outs = {}
        for th in (1, 2):
            pq.set_num_threads(th)
            outs.update({(v, th): pq.matmul(x, qt, bias, lora=lora, adapter_ids=ids, compute="int8", isa=v)
                         for v in VARIANTS})
    finally:
        pq.set_num_threads(before)
    ref = outs[("ref", 1)]
    for v, y in outs.items():
        assert np.array_equal(y, ref), (v, np.abs(y - ref).max())


def test_qlinear_direct_path_matches_matmul_and_checks_input():
    """QLinear sends a plain float32 [M, K] array straight to the kernel: same bits as
    pq.matmul (with and without one adapter, DoRA too) and the same errors for bad out / x."""
    rng = np.random.default_rng(11)
    n, k = 48, 128
    qt = make("int4", n, k, rng)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    for ad in (None, adapter(n, k, 6, rng), adapter(n, k, 4, rng, dora=True)):
        lin = pq.QLinear(qt, bias)
        if ad is not None:
            lin.add_adapter("a", ad)
        want = pq.matmul(x, qt, bias, lora=ad)
        assert np.array_equal(lin(x), want)
        out = np.empty((3, n), np.float32)
        assert lin(x, out=out) is out and np.array_equal(out, want)
        assert np.array_equal(lin(x[0]), want[0])           # 1-D x takes the general route
        assert np.array_equal(lin(np.asfortranarray(x)), want)  # non-contiguous: general route
    with pytest.raises(ValueError, match="shape"):
        lin(x, out=np.empty((2, n), np.float32))
    with pytest.raises(TypeError, match="float32"):
        lin(x, out=np.empty((3, n), np.float64))
    ro = np.empty((3, n), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        lin(x, out=ro)
    bad = x.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lin(bad)
    with pytest.raises(ValueError):
        lin(np.ones((3, k + 1), np.float32))


@pytest.mark.parametrize("compute", ["int8", "float"])
def test_decode_shared_shrink_thread_count_independent(compute):
    """Decode (M <= 8) on a weight large enough for several tile ranges per call (K = 2048, N =
    200: the float decode kernel splits from N*K > 262144 on): the shrink is shared by the
    ranges, each claiming rank-column tasks, so which thread computes a t column varies from
    call to call; the output must not. Single, summed (fp32 + bf16), per-row ids with DoRA."""
    rng = np.random.default_rng(14)
    n, k = 200, 2048
    qt = make("q4_0", n, k, rng)
    bias = rng.standard_normal(n).astype(np.float32)
    a16 = adapter(n, k, 16, rng)
    abf = LoRA(a16.A[:5], a16.B[:, :5], alpha=7.0, storage="bfloat16")
    cases = [(a16, None), ([a16, abf], None), ([a16, adapter(n, k, 9, rng, dora=True)], "ids")]
    before = pq.get_num_threads()
    try:
        for lora, ids in cases:
            for m in (1, 3, 8):
                x = rng.standard_normal((m, k)).astype(np.float32)
                row_ids = rng.integers(-1, 2, m).astype(np.int32) if ids else None
                outs = []
                for t in (1, 2, 3, 1, 2):
                    pq.set_num_threads(t)
                    outs.append(pq.matmul(x, qt, bias, lora=lora, adapter_ids=row_ids, compute=compute))
                assert all(np.array_equal(o, outs[0]) for o in outs), (m, ids)
    finally:
        pq.set_num_threads(before)


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("compute", ["int8", "float"])
def test_summed_adapters_thread_count_independent(compute, storage):
    """Two adapters summed on every row: the shrink's rank columns are split over threads in
    slices that cross adapter boundaries, so each column must come out the same whichever slice
    (4-row or single-row path) computed it, in every variant."""
    rng = np.random.default_rng(12)
    n, k = 32, 64
    qt = make("q8_0", n, k, rng)
    ads = [LoRA((rng.standard_normal((r, k)) * 0.05).astype(np.float32),
                (rng.standard_normal((n, r)) * 0.05).astype(np.float32), alpha=r, storage=storage)
           for r in (2, 5)]
    before = pq.get_num_threads()
    try:
        for m in (1, 9):
            x = rng.standard_normal((m, k)).astype(np.float32)
            for v in VARIANTS:
                outs = []
                for t in (1, 2, 3, 12):
                    pq.set_num_threads(t)
                    outs.append(pq.matmul(x, qt, lora=ads, compute=compute, isa=v))
                assert all(np.array_equal(o, outs[0]) for o in outs), (m, v)
    finally:
        pq.set_num_threads(before)


@pytest.mark.parametrize("compute", ["int8", "float"])
@pytest.mark.parametrize("threads", [1, 2])
def test_out_aliasing_x(compute, threads):
    """out=x (x overwritten by the result) gives the same answer as a separate out, adapters and
    all (Python copies x first; the C ABI copies it too, see test_cabi)."""
    rng = np.random.default_rng(13)
    n = k = 64
    qt = make("q4_0", n, k, rng)
    ad = adapter(n, k, 8, rng)
    before = pq.get_num_threads()
    try:
        pq.set_num_threads(threads)
        for m in (1, 3):
            x = rng.standard_normal((m, k)).astype(np.float32)
            want = pq.matmul(x.copy(), qt, lora=ad, compute=compute)
            got = pq.matmul(x, qt, lora=ad, compute=compute, out=x)
            assert got is x and np.array_equal(got, want)
            x = rng.standard_normal((m, k)).astype(np.float32)
            lin = pq.QLinear(qt, compute=compute)
            lin.add_adapter("a", ad)
            want = lin(x.copy())
            assert np.array_equal(lin(x, out=x), want)
    finally:
        pq.set_num_threads(before)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_lora_is_a_snapshot(storage):
    """A LoRA keeps read-only copies: editing the caller's arrays later changes nothing, and an
    edit through ad.A / ad.B raises (the kernels read a tiled copy of B and cached DoRA norms,
    so an in-place update was once half seen: new A with old B)."""
    rng = np.random.default_rng(8)
    n, k, r = 16, 64, 4
    qt = make("q4_0", n, k, rng)
    A = rng.standard_normal((r, k)).astype(np.float32)
    B = rng.standard_normal((n, r)).astype(np.float32)
    mg = (rng.random(n) + 0.5).astype(np.float32)
    x = rng.standard_normal((2, k)).astype(np.float32)
    for magnitude in (None, mg):
        ad = LoRA(A, B, alpha=r, magnitude=magnitude, storage=storage)
        before = pq.matmul(x, qt, lora=ad, compute="float")
        A2, B2 = A.copy(), B.copy()
        A *= 2.0
        B *= 3.0
        mg *= 5.0
        assert np.array_equal(pq.matmul(x, qt, lora=ad, compute="float"), before)
        for arr in (ad.A, ad.B) + ((ad.magnitude,) if magnitude is not None else ()):
            with pytest.raises(ValueError, match="read-only"):
                arr *= 2.0
        A[...], B[...] = A2, B2
        ref = pq.matmul(x, qt, lora=ad, compute="float", backend="reference")
        assert np.allclose(before, ref, rtol=1e-4, atol=1e-4)


def test_review_adapter_edges(tmp_path):
    """A review's cases: a blend weight survived scaled() only in .scale, so save -> load lost it;
    deep copies and pickles gave writeable arrays (an edit reached numba / reference but not the
    native kernels' tiled copy of B); a scale beyond float32 was accepted (native refused it,
    numba / reference gave inf); an empty batch skipped the adapter checks."""
    import copy
    import pickle

    rng = np.random.default_rng(0)
    n, k, r = 64, 128, 4
    qt = pq.quantize(rng.standard_normal((n, k)).astype(np.float32), "q4_0")
    ad = LoRA(rng.standard_normal((r, k)).astype(np.float32), rng.standard_normal((n, r)).astype(np.float32), alpha=8)
    for rs in (False, True):
        a = LoRA(ad.A, ad.B, alpha=8, rslora=rs)
        half = a.scaled(0.5)
        assert half.alpha == 4.0 and half.scale == LoRA(ad.A, ad.B, alpha=4, rslora=rs).scale
    half = ad.scaled(0.5)
    pq.io.save_peft_adapter(tmp_path, {"layer": half})
    assert pq.io.load_peft_adapter(tmp_path)["layer"].scale == half.scale
    for c in (copy.deepcopy(ad), pickle.loads(pickle.dumps(ad))):
        assert not (c.A.flags.writeable or c.B.flags.writeable or c.Bp.flags.writeable)
        x = rng.standard_normal((2, k)).astype(np.float32)
        assert np.array_equal(pq.matmul(x, qt, lora=c, compute="float"), pq.matmul(x, qt, lora=ad, compute="float"))
    with pytest.raises(ValueError, match="float32"):
        LoRA(ad.A, ad.B, alpha=1e40)
    with pytest.raises(ValueError, match="float32"):
        ad.scaled(1e39)
    wrong = LoRA(rng.standard_normal((r, 2 * k)).astype(np.float32), ad.B)
    x0 = np.zeros((0, k), np.float32)
    for backend in ("native", "numba", "reference"):
        for kw in (dict(lora=wrong), dict(lora=[ad, 7]), dict(lora=[ad], adapter_ids=[5])):
            with pytest.raises((ValueError, TypeError)):
                pq.matmul(x0, qt, backend=backend, compute="float", **kw)


@pytest.mark.parametrize("n, r, scale", [(40, 3, 0.5), (16, 1, 2.0), (33, 8, -1.25)])
def test_of_arrays_builds_what_the_constructor_builds(n, r, scale):
    """LoRA._of_arrays (pyqkern.torch's per-call adapter, a third of the constructor's time) makes
    the same object as LoRA(A, B, alpha=scale * r, storage="float32", _shared=True), and the same
    fused product; its checks refuse what the constructor refuses."""
    k = 64
    g = np.random.default_rng(r)
    A = g.standard_normal((r, k)).astype(np.float32)
    B = g.standard_normal((n, r)).astype(np.float32)
    fast = LoRA._of_arrays(A, B, scale)
    full = LoRA(A, B, alpha=scale * r, storage="float32", _shared=True)
    assert sorted(fast.__dict__) == sorted(full.__dict__)
    for name, v in full.__dict__.items():
        u = fast.__dict__[name]
        if isinstance(v, np.ndarray):
            assert u.dtype == v.dtype and u.shape == v.shape and np.array_equal(u, v)
            assert not u.flags.writeable and not v.flags.writeable
        elif name == "_native":
            assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(u[:2], v[:2])) and u[2] == v[2]
        else:
            assert u == v, name
    assert A.flags.writeable  # views: the caller's arrays stay as they were
    qt = pq.quantize(g.standard_normal((n, k)).astype(np.float32), "q8_0")
    x = g.standard_normal((3, k)).astype(np.float32)
    assert np.array_equal(pq.matmul(x, qt, lora=fast), pq.matmul(x, qt, lora=full))
    bad = A.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        LoRA._of_arrays(bad, B, scale)
    with pytest.raises(ValueError, match="rank mismatch"):
        LoRA._of_arrays(A, B[:, :-1].copy() if r > 1 else np.zeros((n, 2), np.float32), scale)
    with pytest.raises(TypeError, match="float32"):
        LoRA._of_arrays(A.astype(np.float64), B, scale)
    with pytest.raises(ValueError, match="float32's range"):
        LoRA._of_arrays(A, B, 1e39)
