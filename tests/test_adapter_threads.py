"""Adapters changed in one thread while others call the layer (hot-loading adapters in a server):
a call sees the adapters before or after a change, never half of one, and concurrent changes are
not lost. From a review that found KeyError / AttributeError in calls during another thread's
add_adapter / remove_adapter, and active adapters lost by two concurrent adds. The switch interval
is made tiny so that the interleavings that failed happen within a second."""
import sys
import threading

import numpy as np
import pytest

import pyqkern as pq


@pytest.fixture
def tiny_switch_interval():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def _churn(add, remove):
    """a thread adding and removing an adapter until stopped; returns stop()"""
    stop = threading.Event()
    errors = []

    def run():
        try:
            while not stop.is_set():
                add()
                remove()
        except Exception as e:  # pragma: no cover - reported by stop()
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()

    def finish():
        stop.set()
        t.join()
        assert not errors, errors

    return finish


def test_qlinear_calls_during_adapter_changes(tiny_switch_interval):
    rng = np.random.default_rng(0)
    n = k = 64
    lin = pq.QLinear(pq.quantize(rng.standard_normal((n, k)).astype(np.float32), "q4_0"))

    def mk():
        return pq.LoRA(rng.standard_normal((4, k)).astype(np.float32), rng.standard_normal((n, 4)).astype(np.float32))

    lin.add_adapter("a", mk(), active=False)
    tmp = mk()
    x = rng.standard_normal((2, k)).astype(np.float32)
    want = lin(x, adapter_ids=["a", None])
    finish = _churn(lambda: lin.add_adapter("tmp", tmp, active=False), lambda: lin.remove_adapter("tmp"))
    try:
        for _ in range(20000):
            assert np.array_equal(lin(x, adapter_ids=["a", None]), want)
    finally:
        finish()


def test_concurrent_adds_all_active(tiny_switch_interval):
    rng = np.random.default_rng(1)
    n = k = 32
    qt = pq.quantize(rng.standard_normal((n, k)).astype(np.float32), "q4_0")
    ad = pq.LoRA(rng.standard_normal((2, k)).astype(np.float32), rng.standard_normal((n, 2)).astype(np.float32))
    for _ in range(60):
        lin = pq.QLinear(qt)
        bar = threading.Barrier(2)

        def add(prefix):
            bar.wait()
            for i in range(20):
                lin.add_adapter(f"{prefix}{i}", ad)

        ts = [threading.Thread(target=add, args=(p,)) for p in "ab"]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert len(lin.adapter_names) == 40 and sorted(lin._active) == sorted(lin.adapter_names)


def test_quantlinear_forward_during_adapter_changes(tiny_switch_interval):
    torch = pytest.importorskip("torch")
    import pyqkern.torch as pqt

    torch.manual_seed(0)
    k = n = 64
    lin = pqt.QuantLinear.from_linear(torch.nn.Linear(k, n), format="q4_0")
    A, B = torch.randn(4, k), torch.randn(n, 4)
    lin.add_adapter("keep", A, B, active=False)
    x = torch.randn(2, k)
    with torch.no_grad():
        want_ids, want_base = lin(x, adapter_ids=["keep", None]), lin(x)
        lin.add_adapter("tmp", A, B)
        want_tmp = lin(x)
        lin.remove_adapter("tmp")
        finish = _churn(lambda: lin.add_adapter("tmp", A, B), lambda: lin.remove_adapter("tmp"))
        try:
            for _ in range(150):
                assert torch.equal(lin(x, adapter_ids=["keep", None]), want_ids)
                y = lin(x)
                assert torch.equal(y, want_base) or torch.equal(y, want_tmp)
        finally:
            finish()
