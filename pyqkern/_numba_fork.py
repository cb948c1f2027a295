"""Whether this process is a child forked after its parent ran Numba parallel code on OpenMP: GNU
OpenMP (pip Numba's usual layer on Linux) kills such a child when it enters a parallel region, so
the Numba backend runs serial twins of its kernels there (numba_kernels/_par.py). The fork hook is
registered when pyqkern is imported, not with the backend (imported on first use): a parent that
ran only its own Numba code before forking counts too. numba is not imported here.

Not covered (Numba's own limits, no way to see them from here): a child that imports pyqkern only
after the fork (import it before forking, or use the "spawn" start method), and a fork while
another parent thread was compiling Numba code (the child's compile of a serial twin then waits
on Numba's compiler lock, held by a thread the child does not have)."""
from __future__ import annotations

import os
import sys

_from_omp = False


def forked_from_omp() -> bool:
    return _from_omp


def _after_fork_in_child():
    global _from_omp
    nb = sys.modules.get("numba")
    if _from_omp or nb is None:
        return
    try:
        _from_omp = nb.threading_layer() == "omp"
    except ValueError:  # no parallel code has run: the child starts its own layer
        pass


os.register_at_fork(after_in_child=_after_fork_in_child)
