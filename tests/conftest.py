"""Shared test configuration: hypothesis profiles and the variant / backend fixtures.

Hypothesis profile: ``HYPOTHESIS_PROFILE=ci`` (default: few examples, derandomized so CI is
reproducible) or ``HYPOTHESIS_PROFILE=dev`` (many more examples, random).

Fixtures
  native_variant  every native kernel variant compiled into this build, by name ("ref", "avx2",
                  ...); variants this CPU/OS cannot run are skipped with the
                  reason. Tests reach a variant with ``isa=native_variant``, never by changing
                  the process-wide choice.
  backend         "native" (the active variant), "numba", "reference".
  impl            (backend, isa) for every implementation: each native variant, numba, reference.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import pyqkern as pq
from pyqkern import _native

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", max_examples=300, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = ("native", "numba", "reference")

#: runnable native variants, best last (same as pq.variants())
NATIVE_VARIANTS = pq.variants()


def _variant_status():
    """[(name, skip_reason or None)] for every variant compiled into this build. Variants of
    another architecture (neon/dotprod on x86, avx* on Arm) are not compiled and are no test
    case at all; a compiled variant this CPU/OS cannot run is a case skipped with the reason."""
    out = []
    feats = _native.cpu_features()
    for i, name in enumerate(_native.isa_names()):
        if not _native.isa_compiled(i):
            continue
        if not _native.isa_runnable(i):
            out.append((name, f"variant {name!r} is compiled in but this CPU/OS cannot run it "
                              f"(detected features: {feats})"))
        else:
            out.append((name, None))
    return out


VARIANT_STATUS = _variant_status()
#: compiled into this build, but this CPU/OS cannot run them
UNRUNNABLE_VARIANTS = [n for n, why in VARIANT_STATUS if why is not None]
assert sorted(NATIVE_VARIANTS) == sorted(n for n, why in VARIANT_STATUS if why is None)

VARIANT_PARAMS = [pytest.param(n, id=n, marks=[pytest.mark.skip(reason=why)] if why else [])
                  for n, why in VARIANT_STATUS]

IMPL_PARAMS = ([pytest.param(("native", n), id=f"native-{n}", marks=[pytest.mark.skip(reason=why)] if why else [])
                for n, why in VARIANT_STATUS]
               + [pytest.param(("numba", None), id="numba"), pytest.param(("reference", None), id="reference")])


@pytest.fixture(scope="session", params=VARIANT_PARAMS)
def native_variant(request) -> str:
    return request.param


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="session", params=IMPL_PARAMS)
def impl(request) -> tuple:
    """(backend, isa): every implementation of an op, each native variant separately."""
    return request.param


def child_env():
    """(env, cwd) for a child Python that imports the same pyqkern as this process (the
    installed one in CI, the source tree in development), whatever the current directory."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(pq.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
    return env, pkg_parent


_RESIZE_PROBE = r"""
import numpy as np, pyqkern as pq
w = np.ones((256, 1024), np.float32)
for t in (1, 2, 3, 8, 2, 4, 1, 3):
    pq.set_num_threads(t)
    assert pq.get_num_threads() == t
    pq.quantize(w, "q8_0")
print("ok")
"""


@pytest.fixture(scope="session")
def pool_resize_probe():
    """(exit code, stderr tail) of a child process that resizes the thread pool between kernel
    calls: run there first so that a crash fails tests instead of killing the test run."""
    import subprocess
    import sys

    env, cwd = child_env()
    p = subprocess.run([sys.executable, "-c", _RESIZE_PROBE], env=env, capture_output=True, text=True,
                       timeout=300, cwd=cwd)
    return p.returncode, p.stderr[-1500:]


@pytest.fixture
def restore_threads(pool_resize_probe):
    """For tests that change the native thread count: restores it afterwards. Fails the test
    up front if changing it between calls crashes (checked in a child process)."""
    if pool_resize_probe[0] != 0:
        pytest.fail("not run in-process: set_num_threads between kernel calls crashes the process "
                    f"(exit {pool_resize_probe[0]}):\n{pool_resize_probe[1]}")
    n = pq.get_num_threads()
    yield n
    pq.set_num_threads(n)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's node id: reproducible, different per test."""
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
