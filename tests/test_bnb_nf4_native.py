"""bitsandbytes' own NF4 (CPU) against pyqkern's nf4: the same absmax and codes when quantizing,
bit-identical dequantized values, and its serialized quant states (plain and double quantized)
read losslessly and written back so that bitsandbytes dequantizes them to the same numbers."""
import numpy as np
import pytest

import pyqkern as pq

F32 = np.float32
torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")


def codes_of(qt):
    q = qt.sections()[0]
    return np.stack([q >> 4, q & 15], axis=-1).reshape(qt.shape)


@pytest.mark.parametrize("bs", [64, 128, 256])
def test_quantize_matches(bs):
    rng = np.random.default_rng(bs)
    w = (rng.standard_normal((24, 512)) * rng.uniform(0.01, 2, (24, 1))).astype(F32)
    w[0, :bs] = 0  # an all-zero block
    q, state = F.quantize_4bit(torch.from_numpy(w), blocksize=bs, quant_type="nf4")
    qt = pq.quantize(w, "nf4", group=bs)
    assert np.array_equal(state.absmax.numpy(), qt.sections()[1].view(F32).reshape(-1))
    theirs = q.numpy().reshape(-1)
    tc = np.stack([theirs >> 4, theirs & 15], axis=1).reshape(w.shape)
    assert np.array_equal(tc, codes_of(qt))
    assert np.array_equal(F.dequantize_4bit(q, state).numpy(), pq.dequantize(qt))


def test_quantize_matches_at_a_midpoint_and_for_subnormal_blocks():
    """bitsandbytes codes x * (1 / max(absmax, 1e-38)); pyqkern divided by absmax, which rounds a
    value near a code midpoint the other way (0.05791228 in a block of absmax 1.4554425) and
    spreads a block of subnormals over the whole code book. Every variant and backend."""
    w = np.zeros((2, 64), F32)
    w[0, 0], w[0, 1] = F32(1.4554425), F32(0.05791228)
    w[1] = (np.random.default_rng(0).standard_normal(64) * 1e-40).astype(F32)
    q, _ = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
    theirs = q.numpy().reshape(-1)
    for kw in [{"isa": v} for v in pq.variants()] + [{"backend": "numba"}, {"backend": "reference"}]:
        assert np.array_equal(pq.quantize(w, "nf4", group=64, **kw).sections()[0].reshape(-1), theirs), kw


@pytest.mark.parametrize("dq", [False, True])
def test_quant_state_round_trip(dq):
    from pyqkern.io import from_bnb, to_bnb

    rng = np.random.default_rng(7)
    w = rng.standard_normal((16, 1024)).astype(F32)
    q, state = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=dq)
    packed = {key: v.numpy() for key, v in state.as_dict(packed=True).items()}
    got = from_bnb(q.numpy(), packed)
    assert got.format == "nf4" and bool(got.params["double_quant"]) == dq
    assert np.array_equal(pq.dequantize(got), F.dequantize_4bit(q, state).numpy())
    x = rng.standard_normal((3, 1024)).astype(F32)
    ref = x @ F.dequantize_4bit(q, state).numpy().T
    np.testing.assert_allclose(pq.matmul(x, got, compute="float"), ref, rtol=1e-4, atol=1e-4)
    weight, ours = to_bnb(got, packed=True)
    back = F.QuantState.from_dict({key: torch.from_numpy(v) for key, v in ours.items()}, torch.device("cpu"))
    assert back.quant_type == "nf4" and back.nested == dq
    assert np.array_equal(F.dequantize_4bit(torch.from_numpy(weight), back).numpy(), pq.dequantize(got))
