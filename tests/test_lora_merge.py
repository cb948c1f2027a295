"""pyqkern.lora.merge / unmerge: requantized bytes, exact unmerge, the survival report, DoRA."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import pyqkern as pq
from pyqkern import lora

N, K, R = 24, 256, 4  # K = 256: a multiple of every block size (q4_k / q6_k need 256)

# (format, quantize kwargs): every format, plus the parameter variants that change the layout
CASES = [("q4_0", {}), ("q4_1", {}), ("q8_0", {}), ("q4_k", {}), ("q6_k", {}), ("iq4_nl", {}), ("nf4", {}),
         ("nf4", {"group": 128, "double_quant": True}), ("int4", {}), ("int4", {"group": 32, "sym": True}),
         ("int4", {"group": -1}), ("int8", {})]
IDS = [f + "".join(f"-{k}={v}" for k, v in kw.items()) for f, kw in CASES]


def _base(fmt, kw, seed=0, n=N, k=K):
    rng = np.random.default_rng(seed)
    return pq.quantize(rng.standard_normal((n, k)).astype(np.float32), fmt, **kw)


def _adapter(rel, seed=1, n=N, k=K, r=R, alpha=8.0, magnitude=None, rslora=False):
    """An adapter whose delta has roughly ``rel`` times the weights' RMS (weights ~ N(0, 1))."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((r, k)).astype(np.float32)
    b = rng.standard_normal((n, r)).astype(np.float32)
    scale = alpha / (np.sqrt(r) if rslora else r)
    b *= np.float32(rel / (scale * np.sqrt(r)))
    return pq.LoRA(a, b, alpha, rslora=rslora, magnitude=magnitude)


def _requant(x, qt):
    return pq.quantize(x, qt.format, group=qt.params["group"] or None, sym=qt.params["sym"] or None,
                       double_quant=qt.params.get("double_quant", False))


@pytest.mark.parametrize("fmt,kw", CASES, ids=IDS)
def test_merge_is_requantize_of_sum_and_unmerge_is_exact(fmt, kw):
    qt = _base(fmt, kw)
    before = qt.data.copy()
    ad = _adapter(0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        merged, rep = lora.merge(qt, ad, chunk_rows=5)  # 5 does not divide N: ragged last chunk
        whole, _ = lora.merge(qt, ad)                   # one chunk
    expect = _requant(pq.dequantize(qt) + lora.delta(ad), qt)
    assert merged == expect, "merged bytes differ from quantize(deq(base) + delta)"
    assert whole == merged, "row chunking changed the bytes"
    assert merged.params == qt.params and merged.format == qt.format and merged.shape == qt.shape
    np.testing.assert_array_equal(qt.data, before)  # the base is not modified
    back = lora.unmerge(merged, rep)
    assert back is qt and np.array_equal(back.data, before)


@pytest.mark.parametrize("fmt,kw", [CASES[0], CASES[3], CASES[7], CASES[9]], ids=[IDS[0], IDS[3], IDS[7], IDS[9]])
def test_report_numbers(fmt, kw):
    qt = _base(fmt, kw)
    ad = _adapter(0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        merged, rep = lora.merge(qt, ad, chunk_rows=7)
    d = ad.delta().astype(np.float64)  # the independent float32-BLAS delta, to float32 rounding
    applied = pq.dequantize(merged).astype(np.float64) - pq.dequantize(qt)
    assert rep.format == fmt and not rep.dora and rep.base is qt
    np.testing.assert_allclose(rep.delta_norm, np.linalg.norm(d), rtol=1e-6)
    np.testing.assert_allclose(rep.applied_norm, np.linalg.norm(applied), rtol=1e-12)
    np.testing.assert_allclose(rep.retained, np.sum(applied * d) / np.sum(d * d), rtol=1e-5)
    np.testing.assert_allclose(rep.rel_error, np.linalg.norm(applied - d) / np.linalg.norm(d), rtol=1e-5)
    row_rel = np.linalg.norm(applied - d, axis=1) / np.linalg.norm(d, axis=1)
    row_ret = np.sum(applied * d, axis=1) / np.sum(d * d, axis=1)
    np.testing.assert_allclose(rep.row_rel_error, row_rel, rtol=1e-4)
    np.testing.assert_allclose(rep.row_retained, row_ret, rtol=1e-4, atol=1e-6)
    assert rep.worst_row == int(np.argmax(row_rel))
    np.testing.assert_allclose(rep.worst_row_rel_error, row_rel.max(), rtol=1e-5)
    np.testing.assert_allclose(rep.worst_row_retained, row_ret[rep.worst_row], rtol=1e-4, atol=1e-6)
    assert " row_retained=" not in repr(rep) and "base=" not in repr(rep) and " retained=" in repr(rep)


@pytest.mark.parametrize("fmt,kw", CASES, ids=IDS)
def test_tiny_delta_is_erased_and_warns(fmt, kw):
    qt = _base(fmt, kw)
    ad = _adapter(1e-5)
    with pytest.warns(UserWarning, match="merging destroyed most of the fine-tune"):
        merged, rep = lora.merge(qt, ad)
    assert rep.rel_error > 0.9, rep
    if fmt == "iq4_nl" or kw.get("sym"):
        # requantization is not idempotent here (scale search / GPTQ symmetric range): the weights
        # drift by far more than the delta, so the projection onto the delta is noise of any sign
        assert rep.rel_error > 10, rep
    else:
        assert abs(rep.retained) < 0.1, rep


@pytest.mark.parametrize("fmt,kw", CASES, ids=IDS)
def test_big_delta_survives(fmt, kw):
    qt = _base(fmt, kw)
    ad = _adapter(20.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _, rep = lora.merge(qt, ad)
    assert abs(rep.retained - 1) < 0.05, rep
    assert rep.rel_error < 0.25, rep


def test_warn_below_threshold_and_none():
    qt = _base("q8_0", {})
    ad = _adapter(0.05)  # q8_0 keeps most of it
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _, rep = lora.merge(qt, ad)
        assert 0.5 < rep.retained < 1.2
        lora.merge(qt, _adapter(1e-6), warn_below=None)  # disabled
    with pytest.warns(UserWarning):
        lora.merge(qt, ad, warn_below=2.0)


def test_non_idempotent_requantization_warns_despite_retained():
    qt = _base("iq4_nl", {})
    with pytest.warns(UserWarning, match="relative error"):
        _, rep = lora.merge(qt, _adapter(1e-5))
    assert rep.retained > 0.5 and rep.rel_error > 2  # retained alone would not have warned


def test_zero_delta():
    qt = _base("q4_0", {})
    ad = pq.LoRA(np.ones((R, K), np.float32), np.zeros((N, R), np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        merged, rep = lora.merge(qt, ad)
    assert rep.delta_norm == 0 and np.isnan(rep.retained) and rep.worst_row == -1
    assert np.isnan(rep.row_retained).all()
    assert merged == _requant(pq.dequantize(qt), qt)


def test_zero_delta_that_moves_the_weights_warns():
    """A zero adapter merged into a format whose requantization is not idempotent: the weights
    move though nothing was asked for (rel_error inf), which the merge says (review)."""
    qt = _base("iq4_nl", {})
    ad = pq.LoRA(np.ones((R, K), np.float32), np.zeros((N, R), np.float32))
    with pytest.warns(UserWarning, match="asks for no change"):
        merged, rep = lora.merge(qt, ad)
    assert rep.delta_norm == 0 and rep.applied_norm > 0 and rep.rel_error == np.inf
    assert lora.unmerge(merged, rep) is qt


def test_overflowing_merge_reports_nan_not_inf():
    """A review: an adapter whose delta overflows q4_0's fp16 scales reported retained = inf and
    warned "retained inf%"; the merged weights hold Inf, so no fraction survived to speak of: NaN,
    rel_error Inf, and the warning says none, beside the fp16-range warning."""
    rng = np.random.default_rng(4)
    qt = pq.quantize(rng.standard_normal((16, 64)).astype(np.float32), "q4_0")
    ad = pq.LoRA(np.full((1, 64), 3000, np.float32), np.full((16, 1), 3000, np.float32), alpha=1)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        merged, rep = lora.merge(qt, ad)
    assert np.isnan(rep.retained) and rep.rel_error == np.inf and np.isnan(rep.row_retained).all()
    msgs = [str(m.message) for m in got]
    assert any("fp16 scales" in m for m in msgs) and any("retained none" in m for m in msgs), msgs
    assert lora.unmerge(merged, rep).data.tobytes() == qt.data.tobytes()


def test_delta_matches_float64_and_blas():
    ad = _adapter(1.0, alpha=5.0, rslora=True)
    exact = ad.scale * (ad.B.astype(np.float64) @ ad.A.astype(np.float64))
    d = lora.delta(ad)
    assert d.dtype == np.float32 and d.shape == (N, K)
    np.testing.assert_allclose(d, exact, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(d, ad.delta(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(lora.delta(ad, 3, 11), d[3:11])  # chunk-independent bits


def _dora(seed=2, rel=0.2):
    rng = np.random.default_rng(seed)
    m = (np.sqrt(K) * (1 + 0.3 * rng.standard_normal(N))).astype(np.float32)
    return _adapter(rel, seed=seed, magnitude=m)


@pytest.mark.parametrize("fmt,kw", [CASES[0], CASES[4], CASES[7], CASES[8], CASES[11]],
                         ids=[IDS[0], IDS[4], IDS[7], IDS[8], IDS[11]])
def test_dora_merge_matches_peft_formula(fmt, kw):
    qt = _base(fmt, kw)
    ad = _dora()
    # PEFT (dora.py / layer.py): W' = m / ||W + s*B@A||_row * (W + s*B@A), in float64
    w = pq.dequantize(qt).astype(np.float64)
    s = w + ad.scale * (ad.B.astype(np.float64) @ ad.A.astype(np.float64))
    want = ad.magnitude.astype(np.float64)[:, None] / np.linalg.norm(s, axis=1, keepdims=True) * s
    tgt = lora.merge_target(qt, ad)
    np.testing.assert_allclose(tgt, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        merged, rep = lora.merge(qt, ad, chunk_rows=5)
    assert merged == _requant(tgt, qt)
    assert rep.dora
    intended = want - w
    np.testing.assert_allclose(rep.delta_norm, np.linalg.norm(intended), rtol=1e-4)
    applied = pq.dequantize(merged).astype(np.float64) - w
    np.testing.assert_allclose(rep.retained, np.sum(applied * intended) / np.sum(intended ** 2), rtol=1e-3)
    assert lora.unmerge(merged, rep) is qt


def test_dora_merge_matches_peft_code():
    torch = pytest.importorskip("torch")
    dora_mod = pytest.importorskip("peft.tuners.lora.dora", reason="peft not installed (pip install peft)")
    qt = _base("q8_0", {})
    ad = _dora(seed=5)
    w = torch.from_numpy(pq.dequantize(qt).astype(np.float64))
    layer = dora_mod.DoraLinearLayer(fan_in_fan_out=False)
    lora_w = torch.from_numpy(ad.B.astype(np.float64) @ ad.A.astype(np.float64))
    norm = layer.get_weight_norm(w, lora_w, scaling=ad.scale).detach()
    want = (torch.from_numpy(ad.magnitude.astype(np.float64)) / norm).view(-1, 1) * (w + ad.scale * lora_w)
    np.testing.assert_allclose(lora.merge_target(qt, ad), want.numpy(), rtol=2e-6, atol=1e-6)


def test_unmerge_rejects_other_tensors():
    qt = _base("q4_k", {})
    ad = _adapter(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        merged, rep = lora.merge(qt, ad)
        merged2, rep2 = lora.merge(qt, _adapter(0.5, seed=9))
    with pytest.raises(ValueError, match="not the one this report"):
        lora.unmerge(qt, rep)  # the base, not the merged tensor
    with pytest.raises(ValueError, match="not the one this report"):
        lora.unmerge(merged2, rep)
    tampered = pq.QTensor.from_bytes("q4_k", qt.shape, merged.data.copy())
    tampered.data[5] ^= 1
    with pytest.raises(ValueError, match="not the one this report"):
        lora.unmerge(tampered, rep)
    # an identical copy of the merged bytes is accepted
    assert lora.unmerge(pq.QTensor.from_bytes("q4_k", qt.shape, merged.data.copy()), rep) is qt
    with pytest.raises(TypeError):
        lora.unmerge(merged, "report")
    with pytest.raises(TypeError):
        lora.unmerge(merged.data, rep)
    # the original modified after the merge: its bytes cannot be restored any more
    base = pq.QTensor.from_bytes("q4_k", qt.shape, qt.data.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        m3, rep3 = lora.merge(base, ad)
    base.data[0] ^= 1
    with pytest.raises(ValueError, match="modified"):
        lora.unmerge(m3, rep3)


def test_merge_bad_inputs():
    qt = _base("q4_0", {})
    ad = _adapter(0.1)
    with pytest.raises(TypeError, match="QTensor"):
        lora.merge(np.zeros((N, K), np.float32), ad)
    with pytest.raises(TypeError, match="LoRA"):
        lora.merge(qt, (ad.A, ad.B))
    with pytest.raises(ValueError, match="adapter is for"):
        lora.merge(qt, _adapter(0.1, n=N + 1))
    with pytest.raises(ValueError, match="adapter is for"):
        lora.merge(qt, _adapter(0.1, k=K + 32))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_rows"):
            lora.merge(qt, ad, chunk_rows=bad)
    with pytest.raises(ValueError, match="rows"):
        lora.delta(ad, 5, N + 1)
    # W + delta finite but beyond q4_0's fp16 scales: merged as quantize stores it, with its
    # warning (this raised before only because the report's argmax met an all-NaN slice)
    huge = pq.LoRA(ad.A, ad.B * np.float32(1e37))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.warns(UserWarning, match="fp16 scales"):
            lora.merge(qt, huge)
    beyond = pq.LoRA(ad.A, ad.B * np.float32(3e38), alpha=ad.alpha * 4)  # W + delta overflows float32
    with pytest.raises(ValueError, match="NaN or Inf"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lora.merge(qt, beyond)


def test_merge_reference_backend_matches_native():
    qt = _base("q4_1", {}, n=6)
    ad = _adapter(0.5, n=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a, _ = lora.merge(qt, ad, backend="reference")
        b, _ = lora.merge(qt, ad)
    assert a == b


def test_public_names():
    assert pq.LoRA is lora.LoRA
    assert {"LoRA", "lora", "io"} <= set(pq.__all__)


def test_dora_factor_cache_forgets_dead_weights():
    """Review: the per-weight DoRA factor cache (keyed by id) kept an [N] array for every base
    weight it had seen, dead or alive; an entry now goes with its weight."""
    import gc

    ad = _dora()
    keep = _base("q4_0", {})
    f = ad.dora_factor(keep)
    for i in range(20):
        ad.dora_factor(pq.quantize(np.full((N, K), i + 1.0, np.float32), "q4_0"))
    gc.collect()
    assert list(ad._dora_cache) == [id(keep)]
    assert ad.dora_factor(keep) is f  # the live one still cached
